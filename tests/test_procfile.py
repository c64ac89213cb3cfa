"""The Procfile as ops run it: `honcho start` keeps every process up after the release
migrated, two stacks on one host do not collide, and stopping honcho leaves nothing behind;
on a platform (DYNO=release.N) the release process exits once it migrated."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devstack.processes import free_port, port_in_use
from dispatcher import db

ROOT = Path(__file__).resolve().parent.parent
HONCHO = Path(sys.executable).parent / "honcho"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

#: Variables of this shell that would change what the stack does.
_UNSET = ("PORT", "DYNO", "INBOUND_SMTP_PORT", "UNSUBSCRIBE_SMTP_PORT", "API_TOKENS")


def _environment(redis_url: str, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        # Few threads: the stack's processes share this machine with the test suite.
        SMARTPLAN_CONCURRENCY="2",
        CAMPAIGN_CONCURRENCY="1",
        SYSTEM_CONCURRENCY="1",
    )
    return env


def _base_port(processes: int) -> int:
    """A base port whose ``processes`` honcho ports (base + 100 * n) are all free now."""
    for _ in range(50):
        base = free_port()
        ports = [base + 100 * n for n in range(processes)]
        if ports[-1] < 65536 and not any(port_in_use(p) for p in ports):
            return base
    pytest.fail("no free run of ports for honcho")


def _group(pgid: int) -> list[int]:
    """Every live process of process group ``pgid`` (zombies count as gone)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


@dataclass
class Honcho:
    """A `honcho start` of the repo's Procfile and what it printed."""

    proc: subprocess.Popen[bytes]
    output: Path
    base: int

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def started(self) -> dict[str, int]:
        """Each process honcho started, by name (web.1, ...), with its pid (its group's id)."""
        return {m[0]: int(m[1]) for m in re.findall(r"(\S+) started \(pid=(\d+)\)", self.text())}

    def stopped(self) -> list[str]:
        return re.findall(r"(\S+) stopped \(rc=", self.text())


@contextmanager
def honcho(
    workdir: Path, env: dict[str, str], base: int, *processes: str, name: str
) -> Iterator[Honcho]:
    """`honcho start` in ``workdir``; on exit, SIGTERM it and check every child is gone."""
    output = workdir / f"{name}.out"
    command = [str(HONCHO), "-f", str(ROOT / "Procfile"), "start", "--no-colour", "-p", str(base)]
    with output.open("wb") as sink:
        # A session of its own: honcho's helper processes share its group, so a failed test
        # can stop them all.
        proc = subprocess.Popen(
            [*command, *processes],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
    run = Honcho(proc, output, base)
    try:
        yield run
        groups = list(run.started().values())
        # When honcho is told to stop, as Ctrl-C or the service manager would
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        # Then every process it started, and everything they started, has exited
        left = {pgid: _group(pgid) for pgid in groups if _group(pgid)}
        assert left == {}, f"still running after honcho stopped: {left}\n{run.text()}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        for pgid in [proc.pid, *run.started().values()]:
            if _group(pgid):
                os.killpg(pgid, signal.SIGKILL)
        proc.wait(10)


def _niceness(run: Honcho, process: str) -> set[int]:
    """The niceness of every Python process (the worker and its pool) honcho started as
    ``process``."""
    pgid = run.started()[f"{process}.1"]
    found = set()
    for pid in _group(pgid):
        with suppress(OSError):
            if "python" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.add(os.getpriority(os.PRIO_PROCESS, pid))
    return found


def _wait_healthy(run: Honcho, url: str, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if run.proc.poll() is not None or run.stopped():
            pytest.fail(f"honcho stopped a process before {url} answered:\n{run.text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer 200 within {timeout:.0f}s:\n{run.text()}")
        time.sleep(0.3)


def _smtp_answers(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        assert smtp.noop()[0] == 250


def test_honcho_keeps_the_stack_up_after_release_and_two_stacks_share_a_host(
    tmp_path: Path, redis_url: str
) -> None:
    # Given the repo's Procfile, a private Redis and a SQLite file nobody migrated yet
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    first_env = _environment(redis_url, f"sqlite:///{first_dir / 'dispatcher.db'}")
    first_base = _base_port(7)
    # When `honcho start` runs every process type
    with honcho(first_dir, first_env, first_base, name="all") as first:
        web = f"http://127.0.0.1:{first_base + 100}/healthz"
        _wait_healthy(first, web)

        # And a second stack, from the same Procfile, starts on another base port (its own
        # database and Redis database; release, web and the inbound SMTP server)
        second_env = _environment(
            redis_url.rsplit("/", 1)[0] + "/1", f"sqlite:///{second_dir / 'dispatcher.db'}"
        )
        second_base = _base_port(3)
        with honcho(
            second_dir, second_env, second_base, "release", "web", "unsubscribe", name="second"
        ) as second:
            _wait_healthy(second, f"http://127.0.0.1:{second_base + 100}/healthz")
            # Then each stack's inbound SMTP server listens on its own PORT (base + 100 * n)
            _smtp_answers(first_base + 600)
            _smtp_answers(second_base + 200)

        # Then the release migrated and stayed up, saying why, and nothing stopped
        assert "staying up until SIGTERM" in first.text()
        engine = db.make_engine(first_env["DATABASE_URL"])
        try:
            assert db.current_revision(engine) == db.head_revision(engine)
        finally:
            engine.dispose()
        names = set(first.started())
        assert {n.split(".")[0] for n in names} == {
            "release",
            "web",
            "worker_smartplan",
            "worker_campaign",
            "worker_system",
            "beat",
            "unsubscribe",
        }
        # and the campaign pool runs at a lower CPU priority than the rest (CAMPAIGN_NICE)
        assert _niceness(first, "worker_campaign") == {10}
        assert _niceness(first, "worker_smartplan") == {0}
        assert _niceness(first, "web") == {0}
        time.sleep(3)
        assert first.stopped() == [], first.text()
        assert [n for n, pid in first.started().items() if not _group(pid)] == []
        assert httpx.get(web, timeout=5).status_code == 200
    # and beat kept its schedule in memory: no schedule file where honcho ran
    assert not list(first_dir.glob("celerybeat-schedule*"))


def test_on_a_platform_the_release_process_migrates_and_exits(tmp_path: Path) -> None:
    # Given the release command as the platform runs it once per deploy
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env.update(DYNO="release.7", DATABASE_URL=f"sqlite:///{tmp_path / 'deploy.db'}")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "db", "upgrade", "--release"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it migrates and exits at once
    assert result.returncode == 0, result.stderr
    assert "is at revision" in result.stdout and "staying up" not in result.stdout
    assert time.monotonic() - started < 30
