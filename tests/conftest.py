"""Real components for tests: a private Redis, SQLite and PostgreSQL, an aiosmtpd server and an
in-process Celery worker. Factories clean up after themselves."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from amqp.exceptions import NotFound
from celery.signals import task_retry
from kombu import Connection

from devstack.devsmtp import DevSMTPServer
from dispatcher import db
from dispatcher.clock import FrozenClock
from dispatcher.redisclient import connect
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from workers.names import QUEUES

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free port, or REDIS_URL when the binary is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        url = os.environ.get("REDIS_URL")
        if not url:
            pytest.fail("neither redis-server on PATH nor REDIS_URL set: tests need a real Redis")
        yield url
        return
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"private redis-server on port {port} did not start")
            time.sleep(0.05)
    client.close()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The private Redis, empty at the start of the test."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    yield redis_server
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --------------------------------------------------------------------------- RabbitMQ

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")


def _rabbitmq_problem(url: str) -> str | None:
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[str]:
    """A virtual host of this test session's own on the RabbitMQ at RABBITMQ_URL (with
    ``rabbitmqctl``; else the default one, whose queues each test empties)."""
    problem = _rabbitmq_problem(RABBITMQ_URL + "//")
    if problem is not None:
        message = f"RabbitMQ not reachable at {RABBITMQ_URL} ({problem})"
        if IN_CI:
            pytest.fail(message + "; CI runs the broker tests on RabbitMQ too")
        pytest.skip(message)
    if shutil.which("rabbitmqctl") is None:
        yield RABBITMQ_URL + "//"
        return
    vhost = f"ced_test_{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"{RABBITMQ_URL}/{vhost}"
    _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> str | None:
    """The test's BROKER_URL: None (the test's Redis) unless a test is parametrized with
    ``@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)``; RabbitMQ's
    queues are emptied first."""
    kind = getattr(request, "param", "redis")
    if kind == "redis":
        return None
    url: str = request.getfixturevalue("rabbitmq_server")
    with Connection(url) as conn:
        channel = conn.channel()
        for name in QUEUES:
            try:
                channel.queue_purge(name)
            except NotFound:  # a queue not declared yet holds nothing (and closed the channel)
                channel = conn.channel()
    return url


CLUSTER_NODES = 3
#: A cluster node also listens on its port + 10000 (the cluster bus).
BUS_OFFSET = 10000


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and a valid port too."""
    while True:
        port = random.randrange(20000, 65536 - BUS_OFFSET)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + BUS_OFFSET))
            return port
        except OSError:
            continue


def _start_cluster(folder: Path) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """Three redis-server primaries in cluster mode, no persistence, each in its own folder,
    joined with ``redis-cli --cluster create`` and waited on until the cluster says ok."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert server is not None and cli is not None
    ports = [free_cluster_port() for _ in range(CLUSTER_NODES)]
    procs: list[subprocess.Popen[bytes]] = []
    for port in ports:
        node = folder / str(port)
        node.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    server,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node / "nodes.conf"),
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(node),
                    "--loglevel", "warning",
                ],
                stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
    nodes = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
    try:
        for port, node in zip(ports, nodes, strict=True):
            _wait_for(lambda n=node: bool(n.ping()), f"node {port} to start")
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port, node in zip(ports, nodes, strict=True):
            _wait_for(
                lambda n=node: n.cluster("INFO").get("cluster_state") == "ok",
                f"node {port} to see cluster_state:ok",
            )
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    finally:
        for node in nodes:
            node.close()
    return procs, ports


def _wait_for(ready: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"private Redis Cluster: gave up waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis Cluster of three primaries on free ports, as a ``redis+cluster://``
    URL naming all three; skipped without redis-server and redis-cli (failed when CI=true)."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        message = f"{' and '.join(missing)} not on PATH: the Redis Cluster tests need them"
        if IN_CI:
            pytest.fail(message + "; CI must run the suite on a Redis Cluster")
        pytest.skip(message)
    procs, ports = _start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(10)


@pytest.fixture
def redis_cluster_url(redis_cluster_server: str) -> Iterator[str]:
    """The private Redis Cluster, every primary empty at the start of the test."""
    client = connect(redis_cluster_server)
    client.flushall()  # on every primary
    yield redis_cluster_server
    client.close()


# --------------------------------------------------------------------------- Databases


def _postgres_available() -> str | None:
    engine = db.make_engine(PG_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated once."""
    problem = _postgres_available()
    if problem is not None:
        message = f"PostgreSQL not reachable at {PG_URL} ({problem})"
        if IN_CI:
            pytest.fail(message + "; CI must run the suite on PostgreSQL")
        pytest.skip(message)
    name = f"ced_test_{uuid.uuid4().hex[:10]}"
    admin = db.make_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()  # the last connection to close checkpoints the WAL into the file
    assert not path.with_name(path.name + "-wal").exists()
    return path


TABLES = (
    "alerts",
    "event_cursors",
    "suppressions",
    "campaign_exclusions",
    "campaigns",
    "system_emails",
    "notifications",
    "orders",
    "grants",
    "timeline_events",
    "feedback_events",
    "sends",
    "users",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated database: every test that uses it runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "dispatcher.db"
        shutil.copy(template, path)
        yield f"sqlite:///{path}"
        return
    url: str = request.getfixturevalue("postgres_template")
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    yield url


# --------------------------------------------------------------------------- SMTP


@pytest.fixture
def smtp_server() -> Iterator[DevSMTPServer]:
    """A real aiosmtpd server on loopback; set ``smtp_server.handler.fault`` to misbehave."""
    server = DevSMTPServer()
    server.start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- Runtime


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2026, 11, 10, 15, 0, tzinfo=UTC))


@pytest.fixture
def settings(
    redis_url: str,
    database_url: str,
    smtp_server: DevSMTPServer,
    clock: FrozenClock,
    broker: str | None,
) -> Settings:
    """The test's settings. Every runtime built from them without a clock of its own (a
    forked child, a worker process, a CLI command) reads the test's clock: the same offset
    from the wall clock, so they all land in the test's period whatever today's date is."""
    return Settings(
        clock_offset_seconds=(clock.now() - datetime.now(UTC)).total_seconds(),
        redis_url=redis_url,
        broker_url=broker,
        database_url=database_url,
        smtp_host="127.0.0.1",
        smtp_port=smtp_server.port,
        smtp_timeout=5.0,
        api_tokens=("test-token-123",),
        retry_backoff_seconds=0.05,
        retry_backoff_max_seconds=0.2,
        send_max_retries=3,
        mail_from="Command Email <bounces@mail.example.com>",
    )


@pytest.fixture
def make_runtime(settings: Settings, clock: FrozenClock) -> Iterator[Callable[..., Runtime]]:
    """Build runtimes over the test's settings; all are closed at the end."""
    built: list[Runtime] = []

    def make(**overrides: Any) -> Runtime:
        transport = overrides.pop("transport", None)
        rt = Runtime(
            settings.with_overrides(**overrides) if overrides else settings,
            clock=clock,
            transport=transport,
        )
        built.append(rt)
        return rt

    yield make
    for rt in built:
        rt.close()


@pytest.fixture
def runtime(make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime()


@pytest.fixture
def fake_ledger() -> Iterator[Callable[[int], Any]]:
    """QuotaLedger factories over fakeredis, for fast unit tests of the Lua logic only."""
    import fakeredis

    from dispatcher.credits.quota import LedgerSnapshot, QuotaLedger

    client = fakeredis.FakeRedis()

    def make(total: int) -> QuotaLedger:
        return QuotaLedger(client, lambda _g: LedgerSnapshot(total=total, charged_keys=[]))

    yield make
    client.close()


# --------------------------------------------------------------------------- Celery


@pytest.fixture
def celery_app(runtime: Runtime) -> Any:
    from workers.app import create_app

    app = create_app(runtime.settings, runtime)
    # No AMQP heartbeats for the in-process worker: its event loop otherwise sleeps up to 10 s
    # between heartbeat checks before it notices the fixture stopping it (RabbitMQ tests).
    app.conf.broker_heartbeat = 0
    return app


@pytest.fixture
def worker(celery_app: Any) -> Iterator[Any]:
    """A real Celery worker, in-process, consuming every queue of ``celery_app``."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        celery_app,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        shutdown_timeout=30,
        loglevel="WARNING",
    ) as w:
        yield w


@pytest.fixture
def retries() -> Iterator[list[str]]:
    """Every retry the worker schedules, by item id."""
    seen: list[str] = []

    def on_retry(request: Any = None, **_: Any) -> None:
        seen.append(request.args[0] if request is not None else "?")

    task_retry.connect(on_retry, weak=False)
    yield seen
    task_retry.disconnect(on_retry)


@pytest.fixture
def api_client(runtime: Runtime, celery_app: Any) -> Iterator[Any]:
    """The HTTP API wired to the Celery queue, as `workers.web` wires it."""
    from fastapi.testclient import TestClient

    from dispatcher.api.app import create_api
    from workers.queue import CeleryTaskQueue

    queue = CeleryTaskQueue(celery_app)
    app = create_api(runtime, queue, broker=queue)
    with TestClient(app, headers={"Authorization": "Bearer test-token-123"}) as client:
        yield client
