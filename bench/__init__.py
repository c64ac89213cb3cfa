"""Benchmarks of the dispatcher through real processes (not tests: pytest collects only tests/).

``python -m bench --help`` (or ``make bench``, ``make bench-quick``, ``make bench-scale``).
"""
