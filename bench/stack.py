"""The real processes a benchmark runs against: redis-server, the database, the API and the
Celery workers, each started as the ``Procfile`` starts it, each cleaned up on exit."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import make_url

from dispatcher import db
from dispatcher.settings import KNOWN_VARIABLES

from .sink import Sink, free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0001"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class Unavailable(Exception):
    """A figure cannot be measured here; the message says why (printed as n/a)."""


def _die_with_parent() -> None:
    # Linux: SIGTERM when the bench dies, even by SIGKILL, so nothing is left behind.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Child:
    """One process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = logs / f"{name}.log"
        self.started = time.time()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=logs,  # not the checkout: a developer's .env there must not configure the bench
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        # Whatever is left of the group (prefork children), and the leader if it hung.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def family(pid: int) -> list[int]:
    """A process and its children, whichever of its threads started them (a prefork pool
    replaces its processes from a supervisor thread)."""
    pids = [pid]
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(c) for c in children.read_text().split()]
    return pids


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (a prefork pool), in MB."""
    pids = family(pid)
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its children (a prefork pool)."""
    pids = family(pid)
    ticks = 0
    for p in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def procfile(variables: dict[str, str]) -> dict[str, list[str]]:
    """The Procfile's commands, ``${VAR:-default}`` filled in, run by this interpreter."""
    out: dict[str, list[str]] = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
            continue
        name, _, command = line.partition(":")
        command = re.sub(
            r"\$\{(\w+)(?::-([^}]*))?\}",
            lambda m: variables.get(m[1]) or (m[2] or ""),
            command,
        )
        argv = shlex.split(command)
        # A wrapper such as ``nice -n 10`` stays in front of the command it runs.
        at = 3 if argv[0] == "nice" and argv[1] == "-n" else 0
        head, argv = argv[:at], argv[at:]
        if argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        elif argv[0] in ("celery", "uvicorn"):
            argv = [sys.executable, "-m", *argv]
        out[name.strip()] = [*head, *argv]
    return out


def redis_server(work: Path, port: int, env: dict[str, str]) -> tuple[Child, redis.Redis]:
    """A private redis-server (no persistence) on ``port``, answering pings."""
    server = shutil.which("redis-server")
    if server is None:
        raise Unavailable("redis-server is not installed")
    argv = [server, "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(work)]
    child = Child("redis", argv, env, work)
    client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return child, client
        except redis.ConnectionError:
            if time.monotonic() > deadline or child.proc.poll() is not None:
                child.stop()
                raise RuntimeError(f"redis-server did not start:\n{child.tail()}") from None
            time.sleep(0.1)


class Database:
    """The database of one stack: a SQLite file in the work folder, or a private PostgreSQL
    database created on the given server and dropped afterwards."""

    def __init__(self, spec: str, work: Path) -> None:
        self.spec = spec
        self._admin: sa.Engine | None = None
        if spec == "sqlite":
            self.kind = "sqlite"
            self.url = f"sqlite:///{work / 'bench.db'}"
            self.name = str(work / "bench.db")
            return
        if spec.startswith("sqlite"):
            self.kind, self.url, self.name = "sqlite", spec, spec
            return
        if not spec.startswith("postgresql"):
            raise Unavailable(f"{spec}: not sqlite or a postgresql URL")
        self.kind = "postgresql"
        self.name = f"ced_bench_{os.getpid()}"
        admin = db.make_engine(spec, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
                conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            admin.dispose()
            first = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise Unavailable(f"PostgreSQL at {spec} not usable ({first})") from None
        self._admin = admin
        self.url = make_url(spec).set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        if self._admin is None:
            return
        with contextlib.suppress(Exception), self._admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()
        self._admin = None


class Stack:
    """redis-server, the database, and (on demand) the API and workers of the Procfile."""

    def __init__(
        self,
        database: Database,
        sink: Sink,
        work: Path,
        *,
        max_recipients: int,
        credits: int,
        say: Callable[[str], None],
    ) -> None:
        self.database = database
        self.sink = sink
        self.work = work
        self.say = say
        self.children: dict[str, Child] = {}
        self.campaigns_run = 0
        self.redis_port = free_port()
        self.api_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES and k != "PORT"}
        env.update(
            REDIS_URL=self.redis_url,
            DATABASE_URL=database.url,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(sink.port),
            SMTP_TLS="off",
            API_TOKENS=TOKEN,
            FREE_PLAN_CREDITS=str(credits),
            MAIL_FROM="Command Email <bounces@bench.example>",
            LOG_LEVEL="WARNING",
            PORT=str(self.api_port),
        )
        if max_recipients > 100_000:
            env["MAX_CAMPAIGN_RECIPIENTS"] = str(max_recipients)
        self.env = env
        self.commands = procfile(env)
        self._celery: Celery | None = None

    # ------------------------------------------------------------------ processes

    def start_redis(self) -> redis.Redis:
        child, client = redis_server(self.work, self.redis_port, self.env)
        self.children["redis"] = child
        self.redis = client
        return client

    def purge(self, queue: str) -> int:
        """Drop the tasks waiting on a broker queue (kombu's Redis lists ``<queue>`` and its
        priority lists); returns how many there were."""
        names = list(self.redis.scan_iter(match=f"{queue}*"))
        dropped = sum(int(self.redis.llen(n)) for n in names if self.redis.type(n) == b"list")
        lists = [n for n in names if self.redis.type(n) == b"list"]
        if lists:
            self.redis.delete(*lists)
        return dropped

    def migrate(self) -> None:
        argv = self.commands["release"]
        # As a platform runs it once per deploy: migrate, then exit (under honcho it stays up).
        env = {**self.env, "DYNO": "release.1"}
        done = subprocess.run(
            argv, env=env, cwd=self.work, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed:\n{done.stdout}{done.stderr}")

    def start(self, name: str) -> Child:
        """Start a Procfile process (``web``, ``worker_smartplan``, ...)."""
        argv = list(self.commands[name])
        if name == "web" and "--host" in argv:
            argv[argv.index("--host") + 1] = "127.0.0.1"
        child = Child(name, argv, self.env, self.work)
        self.children[name] = child
        return child

    def stop(self, name: str) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            child.stop()

    def stop_all(self) -> None:
        for name in [n for n in self.children if n != "redis"]:
            self.stop(name)
        self.stop("redis")

    def check_alive(self) -> None:
        for child in self.children.values():
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}"
                )

    def wait_api(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/healthz", timeout=5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{self.children['web'].tail()}")
            time.sleep(0.2)

    def wait_worker(self, name: str, timeout: float = 90) -> float:
        """Wait until the worker answers a ping (it consumes from then on); returns when."""
        node = self._node(name)
        if self._celery is None:
            self._celery = Celery("bench", broker=self.redis_url, set_as_current=False)
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            replies = self._celery.control.ping(destination=[node], timeout=0.3) or []
            if any(node in reply for reply in replies):
                return time.time()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{self.children[name].tail()}")

    def _node(self, name: str) -> str:
        argv = self.commands[name]
        options = argv[argv.index("worker") :]  # not a wrapper's -n (nice -n 10 celery ...)
        node = options[options.index("-n") + 1] if "-n" in options else "celery@%h"
        return node.replace("%h", socket.gethostname())

    def api(self, timeout: float = 600) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self.stop_all()
        if self._celery is not None:
            with contextlib.suppress(Exception):
                self._celery.close()
