"""A campaign worker yields the CPU to SmartPlan steps: started as the Procfile starts it, its
processes (main and pool) run at CAMPAIGN_WORKER_NICENESS below the others; a SmartPlan
worker's priority is left as it is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispatcher.settings import Settings
from tests.crashkit import Workers
from workers.names import CAMPAIGN, SMARTPLAN

pytestmark = pytest.mark.timeout(120)


def _group(pgid: int) -> list[int]:
    """Every live process of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def _niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_campaign_worker_runs_below_a_smartplan_worker(
    settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"campaign_worker_niceness": 7})  # SQLite: 0 unset
    own = _niceness(0)
    workers = Workers(settings, tmp_path)
    try:
        campaign = workers.start(CAMPAIGN, pool="prefork", concurrency=2, isolated=False)
        smartplan = workers.start(SMARTPLAN, pool="threads", concurrency=2, isolated=False)
        workers.wait_ready(2)
        campaign_group = _group(campaign.pid)
        assert len(campaign_group) >= 3  # the main process and its two pool processes
        assert {_niceness(p) for p in campaign_group} == {min(own + 7, 19)}
        assert {_niceness(p) for p in _group(smartplan.pid)} == {own}
    finally:
        workers.stop_all()
