"""`dispatcher campaign` against the HTTP API served by uvicorn, with a real worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from devstack.devsmtp import DevSMTPServer
from dispatcher.api.app import create_api
from dispatcher.cli.main import main
from dispatcher.runtime import Runtime
from tests.conftest import free_port
from tests.helpers import make_user, wait_for
from workers.queue import CeleryTaskQueue


@pytest.fixture
def api_url(runtime: Runtime, celery_app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_api(runtime, CeleryTaskQueue(celery_app)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_campaign_send_follow_and_show(
    runtime: Runtime,
    api_url: str,
    worker: Any,
    smtp_server: DevSMTPServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_user(runtime)
    (tmp_path / "body.html").write_text("<p>Hello {{ first_name }}</p>")
    rows = ["id,email,first_name"] + [f"c{i},p{i}@example.org,P{i}" for i in range(40)]
    rows.append("c40,broken-address,Bad")
    (tmp_path / "people.csv").write_text("\n".join(rows) + "\n")
    base = ["campaign", "--api-url", api_url, "--token", "test-token-123", "--dir", str(tmp_path)]
    assert (
        main(
            [
                *base,
                "send",
                "--user",
                "agent-1",
                "--subject",
                "Hi {{ first_name }}",
                "--html",
                str(tmp_path / "body.html"),
                "--recipients",
                str(tmp_path / "people.csv"),
                "--follow",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "40 recipients, 1 invalid" in out
    assert "invalid: row 41 'broken-address'" in out
    assert "100.0% 40/40  sent 40" in out and "completed" in out
    campaign_id = out.split()[1].rstrip(":")
    assert main([*base, "show", campaign_id, "--user", "agent-1"]) == 0
    assert "sent 40" in capsys.readouterr().out
    assert main([*base, "pause", campaign_id, "--user", "agent-1"]) == 2
    assert "is completed; it cannot pause" in capsys.readouterr().err
    wait_for(lambda: len(smtp_server.messages) == 40)
