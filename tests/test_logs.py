"""LOG_LEVEL is applied in every process that builds a Runtime from its settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dispatcher.settings import Settings
from tests.helpers import worker_env

SCRIPT = (
    "import logging\n"
    "from dispatcher.runtime import Runtime\n"
    "from dispatcher.settings import Settings\n"
    "Runtime(Settings.from_env(env_file=None))\n"
    "logging.getLogger('dispatcher.delivery.smartplan').info('an info line')\n"
    "logging.getLogger('dispatcher.recovery').warning('a warning line')\n"
)


@pytest.mark.parametrize(
    ("level", "shown", "hidden"),
    [
        ("INFO", ["an info line", "a warning line"], []),
        ("WARNING", ["a warning line"], ["an info line"]),
    ],
)
def test_a_process_logs_at_its_log_level(
    settings: Settings, level: str, shown: list[str], hidden: list[str]
) -> None:
    env = worker_env(settings.with_overrides(log_level=level))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for line in shown:
        assert "dispatcher." in done.stderr and line in done.stderr
    for line in hidden:
        assert line not in done.stderr
