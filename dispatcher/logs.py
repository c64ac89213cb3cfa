"""Logging of every process: ``LOG_LEVEL`` applied to the dispatcher's own loggers, one format.

Log lines name ids, reasons and counts, never message bodies, tokens or keys.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The loggers ``LOG_LEVEL`` governs; libraries keep their own levels.
OWN = ("dispatcher", "workers", "devstack")


def configure(level: str) -> None:
    """Apply ``level`` to the dispatcher's loggers, and give a process that set up no logging
    (a worker whose root logger Celery leaves alone, a script) a stderr handler."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    for name in OWN:
        logging.getLogger(name).setLevel(level.upper())
