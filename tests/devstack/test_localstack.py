"""`dispatcher run` brings the local stack up, `dispatcher demo` pushes the quota scenario
through it, and Ctrl-C stops every process the stack started."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.processes import free_port

DISPATCHER = [sys.executable, "-m", "devstack"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@dataclass
class Stack:
    """A `dispatcher run` subprocess and what it wrote into its run directory."""

    proc: subprocess.Popen[bytes]
    directory: Path
    output: Path
    info: dict[str, Any]
    env: dict[str, str]

    def console(self) -> str:
        return self.output.read_text(errors="replace")

    def demo(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DISPATCHER, "demo", "--dir", str(self.directory), "--timeout", "30"],
            env=self.env,
            cwd=self.directory.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def command(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        """A `dispatcher` command run from the stack's parent folder, as a newcomer would."""
        return subprocess.run(
            [*DISPATCHER, *argv],
            env={**self.env, **env},
            cwd=self.directory.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )


def _environment(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("REDIS_URL", "API_TOKENS", "DATABASE_URL", "SMTP_HOST", "SMTP_PORT"):
        env.pop(name, None)
    env["REDIS_URL"] = ""  # set but empty counts as unset: the stack brings its own Redis
    env.update(overrides)
    return env


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@contextmanager
def running_stack(tmp_path: Path, *args: str, **env: str) -> Iterator[Stack]:
    """Start `dispatcher run` in ``tmp_path``; on exit, SIGINT it and check nothing is left."""
    directory = tmp_path / "stack"
    output = tmp_path / "run.out"
    environment = _environment(**env)
    command = [
        *DISPATCHER,
        "run",
        "--dir",
        str(directory),
        "--api-port",
        str(free_port()),
        "--smtp-port",
        str(free_port()),
        *args,
    ]
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=environment, cwd=tmp_path
        )
    children: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 60
        while "\nready\n" not in output.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"dispatcher run exited with {proc.returncode}:\n{output.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"dispatcher run not ready after 60s:\n{output.read_text()}")
            time.sleep(0.2)
        info = json.loads((directory / "stack.json").read_text())
        children = info["children"]
        assert all(not _gone(pid) for pid in children.values()), children
        yield Stack(proc, directory, output, info, environment)

        # When Ctrl-C reaches `dispatcher run`
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, output.read_text()
        # Then it and every process it started have exited, and stack.json is gone
        deadline = time.monotonic() + 5
        while not all(_gone(pid) for pid in children.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {name: pid for name, pid in children.items() if not _gone(pid)}
        assert left == {}, f"still running after the stack stopped: {left}"
        assert not (directory / "stack.json").exists()
        assert output.read_text().rstrip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in children.values():
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(240)
def test_run_with_no_redis_configured_starts_its_own_and_the_demo_exhausts_the_quota(
    tmp_path: Path,
) -> None:
    # Given the stack started with no REDIS_URL, API token or database configured
    with running_stack(tmp_path) as stack:
        console = stack.console()
        if shutil.which("redis-server"):
            assert "private redis-server" in console
            assert set(stack.info["children"]) == {"api", "worker", "beat", "redis"}
        else:
            assert "embedded fakeredis" in console
        token = stack.info["token"]
        assert f"token    {token}" in console  # generated and printed
        assert stack.info["database_url"] == f"sqlite:///{stack.directory / 'dispatcher.db'}"

        # and the banner links to the demo agent's pages, which the link opens
        link = re.search(r"^  pages    (\S+)$", console, re.M)
        assert link is not None, console
        assert link[1].startswith(stack.info["api_url"] + "/portal/enter/")
        opened = httpx.get(link[1], follow_redirects=True, timeout=10)
        assert opened.status_code == 200 and "Usage this month" in opened.text
        again = stack.command("portal-link", "agent-1", DISPATCHER_DIR=str(stack.directory))
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.startswith(stack.info["api_url"] + "/portal/enter/")

        # When the demo runs: an agent with 3 credits left sends 5 SmartPlan emails
        demo = stack.demo()

        # Then 3 arrive in the outbox and 2 fail with quota_exhausted on the timeline
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "quota_exhausted" in demo.stdout
        assert "email_failed" in demo.stdout  # the failed contacts' timelines were printed
        to_contacts, to_agent = mail_by_recipient(stack.directory)
        assert len(to_contacts) == 3
        # and the agent was told in the app and by email (95% reached, then the limit)
        assert "limit reached" in demo.stdout.lower()
        assert len(to_agent) == 2
        # and `dispatcher status`, run where the stack runs, counts the demo's 3 sends, not the
        # 4,997 earlier ones it seeded into the ledger
        status = stack.command("status", "--json", DISPATCHER_DIR=str(stack.directory))
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["last_minute"] == {
            "smartplan sent": 3,
            "smartplan failed": 2,
        }
        # and the API's /metrics counts the worker's outcomes (one metrics folder for both)
        metrics = httpx.get(stack.info["api_url"] + "/metrics", timeout=10).text
        assert 'dispatcher_sends_total{kind="smartplan",outcome="sent",reason=""} 3.0' in metrics
        assert "dispatcher_broker_up 1.0" in metrics
        alerts = stack.command("alerts", DISPATCHER_DIR=str(stack.directory))
        assert alerts.returncode == 0, alerts.stdout + alerts.stderr

        # When a newcomer asks for the demo agent's credits (the stack's folder given after
        # the command) and upgrades the agent (the folder in DISPATCHER_DIR)
        user = re.search(r"^agent (demo-\S+) ", demo.stdout, re.M)
        assert user is not None, demo.stdout
        shown = stack.command("credits", "show", user[1], "--dir", str(stack.directory))
        upgraded = stack.command(
            "subscription", "upgrade", user[1], "25k", DISPATCHER_DIR=str(stack.directory)
        )
        upgraded_at = time.monotonic()

        # Then both talk to the running stack and say so
        for done in (shown, upgraded):
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"using the local stack in {stack.directory} (sqlite:///" in done.stderr
            assert "Traceback" not in done.stderr
        assert "0 remaining" in shown.stdout
        order = re.search(r"^order (CE-\S+):", upgraded.stdout, re.M)
        assert order is not None, upgraded.stdout
        # and the command handed the receipt to the broker: it is in the outbox within seconds
        # (beat's outbox sweep would take it after a minute otherwise)
        receipt: list[str] = []
        while not receipt and time.monotonic() - upgraded_at < 30:
            time.sleep(1)
            receipt = [s for s in subjects(stack.directory) if order[1] in s]
        assert receipt, f"no receipt for {order[1]} after 30s: {subjects(stack.directory)}"
        assert not list(tmp_path.glob("dispatcher.db*"))  # nothing stray where they ran

        # and neither the token nor a message body reached a log
        for log in (stack.directory / "logs").glob("*.log"):
            text = log.read_text(errors="replace")
            assert token not in text, log.name
            assert "listings" not in text, log.name


def test_run_with_embedded_redis_serves_the_demo_from_an_in_process_fakeredis(
    tmp_path: Path,
) -> None:
    # Given the stack forced onto the embedded Redis stand-in, with a small free plan
    with running_stack(tmp_path, "--redis", "embedded", FREE_PLAN_CREDITS="10") as stack:
        console = stack.console()
        assert "embedded fakeredis" in console
        assert "in-memory stand-in" in console
        assert set(stack.info["children"]) == {"api", "worker", "beat"}

        # When the demo runs twice (each run makes a new agent with 3 credits left)
        first, second = stack.demo(), stack.demo()

        # Then each time 3 are sent and 2 fail with quota_exhausted, through Celery on fakeredis
        for demo in (first, second):
            assert demo.returncode == 0, demo.stdout + demo.stderr
            assert "2 failed with quota_exhausted" in demo.stdout
        to_contacts, to_agent = mail_by_recipient(stack.directory)
        assert len(to_contacts) == 6
        assert len(to_agent) == 6  # 80%, 90% and the limit, for each agent


def mail_by_recipient(directory: Path) -> tuple[list[str], list[str]]:
    """Recipients of the .eml files in the outbox: (contacts, agents)."""
    to = [
        str(message_from_bytes(p.read_bytes(), policy=default)["To"])
        for p in (directory / "outbox").glob("*.eml")
    ]
    return [t for t in to if not t.endswith("@kw.example.com")], [
        t for t in to if t.endswith("@kw.example.com")
    ]


def subjects(directory: Path) -> list[str]:
    """Subjects of the .eml files in the outbox."""
    return [
        str(message_from_bytes(p.read_bytes(), policy=default)["Subject"])
        for p in (directory / "outbox").glob("*.eml")
    ]


def test_demo_without_a_running_stack_says_how_to_start_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [*DISPATCHER, "demo", "--dir", str(tmp_path)],
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "dispatcher run --dir" in result.stderr
