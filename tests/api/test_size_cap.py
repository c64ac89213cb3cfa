"""The request size cap: a body over the limit is refused with 413 before auth and before it is
read, whether it declares its length or comes in chunks; a real web process stays flat."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from dispatcher import db
from dispatcher.api.app import create_api
from dispatcher.api.bodylimit import ANONYMOUS_LIMIT
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.conftest import free_port
from tests.helpers import statuses

HEADERS = {"Authorization": "Bearer test-token-123"}
CHUNK = b"x" * 65_536


class Chunks:
    """A chunked body of ``total`` bytes, handed to the app as ASGI ``http.request`` messages
    (no Content-Length), counting how much of it the app asked for."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    async def receive(self) -> dict[str, Any]:
        if self.pulled >= self.total:
            return {"type": "http.disconnect"}
        self.pulled += len(CHUNK)
        return {"type": "http.request", "body": CHUNK, "more_body": self.pulled < self.total}


def post_chunked(app: Any, path: str, body: Chunks, token: str | None = None) -> Any:
    """POST ``body`` to ``app`` over ASGI as a server would pass a chunked request; the
    answer as an ``httpx.Response``."""
    headers = [(b"host", b"test"), (b"content-type", b"application/json")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, body.receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return httpx.Response(start["status"], headers=start["headers"], content=content)


def assert_refused(r: Any, limit: int) -> None:
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "request_too_large"
    assert set(r.json()) == {"code", "detail", "field"}
    assert f"{limit:,}" in r.json()["detail"]


def test_default_cap_is_sized_for_the_largest_campaign() -> None:
    settings = Settings()
    # 100,000 recipients at 1 KiB each, three message parts, and room for the rest.
    assert settings.request_limit == 100_000 * 1024 + 3 * 1_000_000 + 65_536
    assert Settings(max_request_bytes=5_000_000).request_limit == 5_000_000


def test_an_unauthenticated_oversize_body_is_refused_before_it_is_read(runtime: Runtime) -> None:
    bare = TestClient(create_api(runtime, InlineQueue()))
    # Declared too long: refused at once, before auth (no token at all).
    r = bare.post(
        "/v1/sends",
        content=b"{}",
        headers={"Content-Length": str(ANONYMOUS_LIMIT + 1), "Content-Type": "application/json"},
    )
    assert_refused(r, ANONYMOUS_LIMIT)

    # Chunked, no length: the app stops reading past the cap; the generator is not exhausted.
    body = Chunks(total=50 * 1024 * 1024)
    r = post_chunked(bare.app, "/v1/sends", body)
    assert_refused(r, ANONYMOUS_LIMIT)
    assert r.headers["connection"] == "close"
    assert body.pulled <= ANONYMOUS_LIMIT + 2 * len(CHUNK)
    assert statuses(runtime, "agent-1") == {}


def test_a_producers_body_may_be_larger_up_to_max_request_bytes(make_runtime: Any) -> None:
    rt = make_runtime(max_request_bytes=300_000)
    client = TestClient(create_api(rt, InlineQueue()), headers=HEADERS)
    client.put(
        "/v1/users/agent-1",
        json={
            "platform_email": "agent1@kw.example.com",
            "postal_address": "350 Main St, Austin, TX 78701",
        },
    )
    send = {
        "user_id": "agent-1",
        "contact": {"id": "c-1", "email": "pat@example.org"},
        "smartplan": {"plan_id": "p", "run_id": "r", "step_id": "s"},
        "message": {"subject": "Hi", "html": "<p>" + "x" * 200_000 + "</p>"},
    }
    # Over the anonymous cap, under MAX_REQUEST_BYTES: read, and accepted.
    assert client.post("/v1/sends", json=send).status_code == 202
    too_big = json.dumps(send | {"message": {"subject": "Hi", "html": "x" * 400_000}})
    r = client.post("/v1/sends", content=too_big, headers={"Content-Type": "application/json"})
    assert_refused(r, 300_000)
    body = Chunks(total=10 * 1024 * 1024)
    r = post_chunked(client.app, "/v1/sends", body, token="test-token-123")
    assert_refused(r, 300_000)
    assert body.pulled <= 300_000 + 2 * len(CHUNK)
    assert statuses(rt, "agent-1") == {"queued": 1}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """The web process as the Procfile starts it (uvicorn, the workers.web factory)."""
    port = free_port()
    database_url = f"sqlite:///{tmp_path / 'web.db'}"
    engine = db.make_engine(database_url)
    db.upgrade(engine)  # migrated, as the release process leaves it (web waits for that)
    engine.dispose()
    env = {
        **os.environ,
        "API_TOKENS": "test-token-123",
        "DATABASE_URL": database_url,
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # never reached: nothing is sent
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "workers.web:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "web did not start"
            time.sleep(0.1)
    yield port, proc
    proc.terminate()
    proc.wait(10)


def _post_chunked(port: int, total: int) -> tuple[int, bytes]:
    """POST ``total`` bytes chunked with no token; stop as soon as the server answers or
    closes. Returns how many bytes were sent and the answer."""
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/campaigns HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        frame = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
        try:
            while sent < total:
                s.sendall(frame)
                sent += len(CHUNK)
                if select.select([s], [], [], 0)[0]:
                    break  # the server answered: stop sending
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65_536):
                answer += chunk
        except ConnectionResetError:
            pass
    return sent, answer


def test_the_web_process_stays_flat_under_a_200_mb_unauthenticated_body(
    web: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, proc = web
    _post_chunked(port, 1024 * 1024)  # warm up: first request's imports and buffers
    before = _rss_kib(proc.pid)
    total = 200 * 1024 * 1024
    sent, answer = _post_chunked(port, total)
    after = _rss_kib(proc.pid)
    print(f"web RSS before {before} KiB, after {after} KiB; sent {sent:,} of {total:,} bytes")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(body)["code"] == "request_too_large"
    assert sent < total // 10  # the server stopped the upload early
    assert after - before < 4 * 1024
