"""The local stack behind ``dispatcher run``: database, Redis, a .eml SMTP server, API, worker
and beat.

The API, the Celery worker and beat run as child processes (the core never imports Celery);
they get their configuration through the environment variables :meth:`Settings.from_env` reads.
Redis is ``REDIS_URL`` when it answers, else a private ``redis-server``, else an in-process
fakeredis TCP server (see :mod:`devstack.localredis`). Everything the stack starts is stopped
when it stops.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from devstack.devsmtp import DevSMTPServer
from devstack.localredis import PrivateRedisServer, RedisChoice, RedisHandle, choose_redis
from devstack.processes import (
    HOST,
    Child,
    Say,
    StackError,
    Stopped,
    StopSignal,
    port_in_use,
)
from dispatcher import db
from dispatcher.cli.stack import STACK_FILE, StackInfo
from dispatcher.db import redact
from dispatcher.settings import Settings

TOKEN_FILE = "api-token"
QUEUES = "smartplan,campaign,system"


@dataclass(frozen=True)
class RunOptions:
    """What ``dispatcher run`` was asked for."""

    directory: Path
    api_port: int = 8000
    smtp_port: int = 2525
    redis: RedisChoice = RedisChoice.AUTO
    database_url: str | None = None
    echo_children: bool = False
    ready_timeout: float = 90.0


def _configured(base: Settings, name: str) -> str | None:
    """The value of a variable the user set (environment or .env), else None."""
    value = os.environ.get(name.upper(), "").strip()
    if value:
        return value
    ours, default = getattr(base, name), getattr(Settings(), name)
    if ours != default:
        return ",".join(ours) if isinstance(ours, tuple) else str(ours)
    return None


def _token(base: Settings, directory: Path) -> tuple[str, str, bool]:
    """(API_TOKENS value for the children, token for clients, whether it was generated here)."""
    configured = _configured(base, "api_tokens")
    if configured:
        return configured, base.api_tokens[0], False
    path = directory / TOKEN_FILE
    if path.is_file():
        token = path.read_text().strip()
        if len(token) >= 8:
            return token, token, True
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, token, True


def _api_healthy(url: str) -> bool:
    """True when the API's /healthz answers 200 (Redis and the database reachable)."""
    try:
        return httpx.get(url + "/healthz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_ready(line: str) -> bool:
    """True for Celery's "celery@host ready." line, printed once the worker consumes."""
    return line.rstrip().endswith(" ready.")


def worker_command(name: str) -> list[str]:
    """The Celery worker of the local stack: every queue, threads, one node alone."""
    return [
        *(sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", QUEUES, "-n", name),
        *("--pool", "threads", "--concurrency", "4", "--loglevel", "INFO"),
        # One worker alone: no neighbours to synchronise (mingle) or gossip with.
        *("--without-mingle", "--without-gossip"),
    ]


def beat_command() -> list[str]:
    """Celery beat of the local stack: the Procfile's, schedule in memory (no file)."""
    return [
        *(sys.executable, "-m", "celery", "-A", "workers.app", "beat"),
        *("-S", "celery.beat:Scheduler", "--loglevel", "INFO"),
    ]


def _beat_ready(line: str) -> bool:
    """Beat's "beat: Starting..." line: it schedules from now on."""
    return "beat: Starting..." in line


def api_command(port: int) -> list[str]:
    """The HTTP API of the local stack, on loopback."""
    return [
        *(sys.executable, "-m", "uvicorn", "--factory", "workers.web:create_app"),
        *("--host", HOST, "--port", str(port)),
        "--no-access-log",  # the API logs each request itself, by route and client
    ]


def child_environment(base: Settings, **values: str) -> dict[str, str]:
    """This process's environment with the stack's settings; validated like a child will."""
    env = dict(os.environ)
    env.update(
        SMTP_USERNAME="",
        SMTP_PASSWORD="",
        SMTP_TLS="off",
        FREE_PLAN_CREDITS=str(base.free_plan_credits),
        MAIL_FROM=base.mail_from,
        PYTHONUNBUFFERED="1",
        **values,
    )
    Settings.from_env(env)  # a bad value stops us here, not in a child's log
    return env


class LocalStack:
    """Database, Redis, SMTP, worker, beat and API for one run directory, started and stopped
    in order."""

    def __init__(self, options: RunOptions, say: Say, stop: threading.Event) -> None:
        self.options = options
        self.say = say
        self.stop_event = stop
        self.directory = options.directory.expanduser().resolve()
        self.logs = self.directory / "logs"
        self.outbox = self.directory / "outbox"
        self.children: list[Child] = []
        self.redis: RedisHandle | None = None
        self.smtp: DevSMTPServer | None = None

    def start(self, base: Settings) -> StackInfo:
        """Start everything and wait until the API is healthy and the worker consumes."""
        opts, say = self.options, self.say
        for folder in (self.directory, self.logs, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        for flag, port in (("--api-port", opts.api_port), ("--smtp-port", opts.smtp_port)):
            if port_in_use(port):
                raise StackError(f"port {port} is in use on {HOST}; choose another with {flag}")

        database_url = (
            opts.database_url
            or _configured(base, "database_url")
            or f"sqlite:///{self.directory / 'dispatcher.db'}"
        )
        engine = db.make_engine(database_url)
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()
        say(f"database   {redact(database_url)} (migrated)")

        self.redis = choose_redis(
            opts.redis, _configured(base, "redis_url"), self.directory, self.logs / "redis.log", say
        )
        say(f"redis      {redact(self.redis.url)}: {self.redis.description}")

        # Started before the worker, so no send ever finds the relay missing.
        self.smtp = DevSMTPServer(HOST, opts.smtp_port, folder=self.outbox)
        self.smtp.start()
        say(f"smtp       {HOST}:{self.smtp.port}, writing every accepted message to {self.outbox}/")

        tokens, token, generated = _token(base, self.directory)
        # One metrics folder for the stack's processes, emptied at each start: the API's
        # /metrics serves the worker's counters too.
        metrics_dir = self.directory / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        env = child_environment(
            base,
            REDIS_URL=self.redis.url,
            DATABASE_URL=database_url,
            SMTP_HOST=HOST,
            SMTP_PORT=str(self.smtp.port),
            API_TOKENS=tokens,
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
            # Links in emails and portal links lead to this API unless configured otherwise.
            PUBLIC_BASE_URL=_configured(base, "public_base_url")
            or f"http://{HOST}:{opts.api_port}",
        )
        echo = sys.stdout if opts.echo_children else None
        worker = Child(
            "worker",
            worker_command(f"local-{opts.api_port}@%h"),
            env,
            self.logs / "worker.log",
            echo=echo,
            ready_marker=_worker_ready,
        )
        beat = Child(
            "beat",
            beat_command(),
            env,
            self.logs / "beat.log",
            echo=echo,
            ready_marker=_beat_ready,
        )
        api = Child("api", api_command(opts.api_port), env, self.logs / "api.log", echo=echo)
        for child in (worker, beat, api):
            child.start()
            self.children.append(child)
        api_url = f"http://{HOST}:{opts.api_port}"
        self._wait(lambda: _api_healthy(api_url), f"the API at {api_url}/healthz")
        self._wait(worker.ready.is_set, "the Celery worker")
        self._wait(beat.ready.is_set, "Celery beat")

        pids = {c.name: c.pid for c in self.children}
        if isinstance(self.redis, PrivateRedisServer):
            pids["redis"] = self.redis.child.pid
        info = StackInfo(
            api_url=api_url,
            token=token,
            database_url=database_url,
            redis_url=self.redis.url,
            redis_kind=self.redis.description,
            smtp_host=HOST,
            smtp_port=self.smtp.port,
            outbox=str(self.outbox),
            logs=str(self.logs),
            free_plan_credits=base.free_plan_credits,
            pid=os.getpid(),
            children=pids,
        )
        info.save(self.directory)
        say(_banner(opts, info, generated, demo_pages(info)))
        return info

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for ``condition``; a stop signal, a dead child or the timeout ends it."""
        timeout = self.options.ready_timeout
        deadline = time.monotonic() + timeout
        while not condition():
            if self.stop_event.is_set():
                raise Stopped("interrupted while starting")
            for child in self.children:
                if not child.alive():
                    raise StackError(
                        f"{child.name} exited with code {child.returncode()} while waiting for "
                        f"{what}; see {child.log_path}"
                    )
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.stop_event.wait(0.2)

    def supervise(self) -> int:
        """Wait for a stop signal (0); a child or Redis that dies stops the stack (1)."""
        while not self.stop_event.wait(0.5):
            for child in self.children:
                if not child.alive():
                    self.say(
                        f"{child.name} exited with code {child.returncode()}; stopping the stack "
                        f"(see {child.log_path})"
                    )
                    return 1
            if self.redis is not None and not self.redis.alive():
                self.say(f"Redis ({self.redis.description}) stopped; stopping the stack")
                return 1
        self.say("stopping: API, beat, worker, Redis, SMTP")
        return 0

    def stop(self) -> None:
        """Stop what was started, newest first; safe after a partial start."""
        (self.directory / STACK_FILE).unlink(missing_ok=True)
        started = bool(self.children) or self.redis is not None
        for child in reversed(self.children):
            child.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.smtp is not None:
            self.smtp.stop()
        if started:
            self.say("stopped")


def run(options: RunOptions, out: TextIO = sys.stdout) -> int:
    """Bring the local stack up and keep it in the foreground until a stop signal; exit code.

    Raises :class:`StackError` (after stopping whatever had started) when it cannot start.
    """

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    base = Settings.from_env()
    stopper = StopSignal()
    with stopper.installed() as stop:
        stack = LocalStack(options, say, stop)
        try:
            stack.start(base)
            say("ready")
            return stack.supervise()
        except Stopped:
            say("stopping (interrupted while starting)")
            return 130
        finally:
            stack.stop()


def _self_command() -> str:
    """How the person at the console invoked us (``.venv/bin/dispatcher``), for copy-paste."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 if Path(argv0).name == "dispatcher" else "dispatcher"


#: The agent whose Command Email pages the banner links to (the curl examples' agent too).
DEMO_AGENT = "agent-1"


def demo_pages(info: StackInfo) -> str:
    """A portal link to the demo agent's pages, made through the API as a producer makes one
    (the agent is created first when missing); a note instead when the API refuses."""
    auth = {"Authorization": f"Bearer {info.token}"}
    with httpx.Client(base_url=info.api_url, headers=auth, timeout=10.0) as client:
        link = client.post(f"/v1/users/{DEMO_AGENT}/portal-link")
        if link.status_code == 404:
            client.put(f"/v1/users/{DEMO_AGENT}", json={"platform_email": "jo@kw.example.com"})
            link = client.post(f"/v1/users/{DEMO_AGENT}/portal-link")
    if link.status_code != 200:
        return f"(no link: the API answered {link.status_code})"
    url: str = link.json()["url"]
    return url


def _banner(options: RunOptions, info: StackInfo, generated: bool, pages: str = "") -> str:
    """What to tell a newcomer once the stack is up: where things are and what to try."""
    api_url = info.api_url
    shown = info.token if generated else "(from API_TOKENS, not shown)"
    bearer = info.token if generated else "$TOKEN"
    logs = ", ".join(sorted(p.name for p in Path(info.logs).glob("*.log")))
    where = "" if options.echo_children else "   (--echo shows them here too)"
    auth = f'-H "Authorization: Bearer {bearer}" -H "content-type: application/json"'
    send = (
        '{"user_id": "agent-1", "contact": {"id": "c-1", "email": "pat@example.org"}, '
        '"smartplan": {"plan_id": "p", "run_id": "r1", "step_id": "s1"}, '
        '"message": {"subject": "Hello", "html": "<p>Hi Pat</p>"}}'
    )
    return "\n".join(
        [
            "",
            "Command Email dispatcher: local stack",
            f"  API      {api_url}   (OpenAPI: {api_url}/docs)",
            f"  pages    {pages}",
            f"           ({DEMO_AGENT}'s Command Email pages: usage, subscription, campaigns; "
            f"the link opens them for a few minutes, `{_self_command()} portal-link "
            f"{DEMO_AGENT}` makes another; operators: {api_url}/ops with an OPS_TOKENS token)",
            f"  token    {shown}",
            f"  outbox   {info.outbox}/   (every email the SMTP server accepts, as .eml)",
            f"  logs     {info.logs}/ ({logs}){where}",
            "",
            "Try it from another terminal:",
            f"  {_self_command()} demo --dir {options.directory}",
            f"  curl -s -X PUT {api_url}/v1/users/agent-1 {auth} \\",
            '    -d \'{"platform_email": "jo@kw.example.com",'
            ' "postal_address": "350 Main St, Austin, TX 78701"}\'',
            f"  curl -s -X POST {api_url}/v1/sends {auth} \\",
            f"    -d '{send}'",
            "",
            "Ctrl-C stops everything.",
        ]
    )
