"""Drills: long runs against real processes, outside the test suite, that print figures."""
