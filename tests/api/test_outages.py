"""Outages at the API: Redis or the database away is answered 503 JSON with a code and a
Retry-After (never a bare 500), /healthz names the part that is down, and everything works
again once it is back. Redis is a private redis-server SIGKILLed and restarted; the database is
the real PostgreSQL behind a TCP proxy the test cuts and restores."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from fastapi.testclient import TestClient

from dispatcher.api.app import create_api
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from tests.crashkit import RestartableRedis
from tests.helpers import make_user

HEADERS = {"Authorization": "Bearer test-token-123"}
SEND = {
    "user_id": "agent-1",
    "contact": {"id": "c-1", "email": "pat@example.org"},
    "smartplan": {"plan_id": "p", "run_id": "r", "step_id": "s"},
    "message": {"subject": "Hi", "html": "<p>Hello</p>"},
}


class TcpProxy:
    """Forwards a local port to ``target``; :meth:`cut` refuses new connections and drops the
    open ones (the server is gone), :meth:`restore` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, []
        for s in [*sockets, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _client(rt: Runtime) -> TestClient:
    return TestClient(create_api(rt, InlineQueue()), headers=HEADERS)


def _assert_outage(response: object, code: str) -> None:
    r = response  # an httpx.Response
    assert r.status_code == 503, r.text  # type: ignore[attr-defined]
    assert r.json()["code"] == code  # type: ignore[attr-defined]
    assert r.headers["Retry-After"].isdigit()  # type: ignore[attr-defined]


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    with RestartableRedis(tmp_path / "redis") as server:
        yield server


def test_redis_down_is_answered_503_and_the_api_works_again_when_it_is_back(
    make_runtime: Callable[..., Runtime], restartable_redis: RestartableRedis
) -> None:
    rt = make_runtime(redis_url=restartable_redis.url)
    make_user(rt)
    with _client(rt) as client:
        assert client.get("/v1/users/agent-1/credits").status_code == 200
        restartable_redis.kill()
        _assert_outage(client.get("/v1/users/agent-1/credits"), "redis_unavailable")
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["database"] == "ok" and health.json()["redis"] != "ok"
        restartable_redis.start()  # empty: the credits are rebuilt from the ledger
        assert client.get("/v1/users/agent-1/credits").json()["used"] == 0
        assert client.post("/v1/sends", json=SEND).status_code == 202
        assert client.get("/healthz").status_code == 200


def test_database_down_is_answered_503_and_the_api_works_again_when_it_is_back(
    make_runtime: Callable[..., Runtime], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a database outage is played on PostgreSQL (SQLite is a local file)")
    parts = urlsplit(database_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    proxy.restore()
    netloc = parts.netloc.replace(f":{parts.port}", f":{proxy.port}")
    rt = make_runtime(database_url=urlunsplit(parts._replace(netloc=netloc)))
    make_user(rt)
    try:
        with _client(rt) as client:
            assert client.get("/v1/users/agent-1/credits").status_code == 200
            proxy.cut()
            _assert_outage(client.get("/v1/users/agent-1/credits"), "database_unavailable")
            _assert_outage(
                client.post("/v1/sends", json=SEND),
                "database_unavailable",
            )
            health = client.get("/healthz")
            assert health.status_code == 503
            assert health.json()["redis"] == "ok" and health.json()["database"] != "ok"
            proxy.restore()
            assert client.get("/v1/users/agent-1/credits").status_code == 200
            assert client.post("/v1/sends", json=SEND).status_code == 202
            assert client.get("/healthz").status_code == 200
    finally:
        proxy.cut()
        rt.engine.dispose()


def test_postgresql_statements_and_lock_waits_are_bounded(
    make_runtime: Callable[..., Runtime], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("statement and lock timeouts are PostgreSQL settings")
    rt = make_runtime(database_statement_timeout_seconds=1.5, database_lock_timeout_seconds=0.5)
    with rt.engine.connect() as conn:
        from_server = [
            conn.exec_driver_sql(f"SHOW {name}").scalar()
            for name in ("statement_timeout", "lock_timeout")
        ]
    assert from_server == ["1500ms", "500ms"]
