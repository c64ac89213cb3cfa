"""``dispatcher status``: run as ops run it, against a live worker, after real sends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from devstack.devsmtp import DevSMTPServer
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.helpers import make_user, statuses, wait_for, worker_env
from tests.test_smartplan_e2e import send_body

ROOT = Path(__file__).resolve().parent.parent.parent


def status(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", "status", *args],
        cwd=ROOT,
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_shows_the_worker_the_queues_and_the_last_minute(
    settings: Settings,
    runtime: Runtime,
    api_client: Any,
    worker: Any,
    smtp_server: DevSMTPServer,
) -> None:
    make_user(runtime)
    for n in range(5):
        assert api_client.post("/v1/sends", json=send_body(n)).status_code == 202
    wait_for(lambda: statuses(runtime, "agent-1").get("sent") == 5, what="5 sends sent")

    done = status(settings, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    by_queue = {q["name"]: q for q in report["queues"]}
    assert set(by_queue) == {"smartplan", "campaign", "system"}
    for q in by_queue.values():
        assert q["waiting"] == 0
        # the test's worker consumes every queue, with its 4 threads
        assert [(w["concurrency"], w["busy"]) for w in q["workers"]] == [(4, 0)]
    assert report["last_minute"] == {"smartplan sent": 5}
    assert report["in_flight"] == {"smartplan": 0, "campaign": 0}
    assert report["relay_halt"] is None

    runtime.relay.halt("535 5.7.8 authentication failed (at login)")
    text = status(settings)
    assert text.returncode == 0, text.stderr
    assert "smartplan sent 5" in text.stdout
    assert "relay:       HALTED for" in text.stdout
    assert "535 5.7.8 authentication failed" in text.stdout
