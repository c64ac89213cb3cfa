"""Commands find the running local stack (its stack.json) when no database or Redis is
configured, say which one they talk to, and answer a newcomer's mistakes in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.cli.main import main
from dispatcher.cli.stack import StackInfo
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.helpers import make_user

#: Variables that would point the commands somewhere else than the stack under test.
_CONFIG = ("DATABASE_URL", "REDIS_URL", "SMTP_HOST", "SMTP_PORT", "DISPATCHER_DIR")


def _stack(settings: Settings, directory: Path, pid: int | None = None) -> StackInfo:
    directory.mkdir(parents=True, exist_ok=True)
    info = StackInfo(
        api_url="http://127.0.0.1:9",
        token="stack-token-123",
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        redis_kind="private redis-server",
        smtp_host=settings.smtp_host,
        smtp_port=settings.smtp_port,
        outbox=str(directory / "outbox"),
        logs=str(directory / "logs"),
        free_plan_credits=settings.free_plan_credits,
        pid=os.getpid() if pid is None else pid,
    )
    info.save(directory)
    return info


@pytest.fixture
def newcomer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shell with nothing configured, in an empty folder."""
    for name in _CONFIG:
        monkeypatch.delenv(name, raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


def test_commands_use_the_running_local_stack_and_say_so(
    runtime: Runtime, newcomer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a local stack running in .dispatcher and an agent in its database
    _stack(runtime.settings, newcomer / ".dispatcher")
    make_user(runtime, "agent-1")

    # When commands run with no DATABASE_URL or REDIS_URL
    assert main(["credits", "show", "agent-1"]) == 0
    out, err = capsys.readouterr()
    # Then they read the stack's database and Redis, naming the stack in one line
    assert "5,000 remaining" in out
    assert err.startswith("using the local stack in .dispatcher (") and "redis redis://" in err
    assert main(["relay", "status"]) == 0
    assert f"relay   {runtime.settings.smtp_host}:{runtime.settings.smtp_port}" in (
        capsys.readouterr().out
    )
    assert main(["suppression", "add", "agent-1", "gone@example.org"]) == 0
    assert main(["suppression", "list", "agent-1"]) == 0
    assert "gone@example.org" in capsys.readouterr().out
    # and no stray database appeared where they ran
    assert list(newcomer.glob("dispatcher.db*")) == []


def test_the_stack_folder_is_an_option_anywhere_or_a_variable(
    runtime: Runtime,
    newcomer: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _stack(runtime.settings, newcomer / "elsewhere")
    make_user(runtime, "agent-1")
    assert main(["--dir", "elsewhere", "credits", "show", "agent-1"]) == 0
    assert main(["credits", "show", "agent-1", "--dir", "elsewhere"]) == 0
    assert main(["credits", "--dir", "elsewhere", "show", "agent-1"]) == 0
    assert capsys.readouterr().err.count("using the local stack in elsewhere") == 3
    monkeypatch.setenv("DISPATCHER_DIR", "elsewhere")
    assert main(["reconcile"]) == 0
    assert "using the local stack in elsewhere" in capsys.readouterr().err


def test_configured_settings_win_over_a_running_stack(
    runtime: Runtime,
    newcomer: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a stack whose database is not the configured one
    other = runtime.settings.with_overrides(database_url=f"sqlite:///{newcomer / 'none.db'}")
    _stack(other, newcomer / ".dispatcher")
    make_user(runtime, "agent-1")
    monkeypatch.setenv("DATABASE_URL", runtime.settings.database_url)
    monkeypatch.setenv("REDIS_URL", runtime.settings.redis_url)
    assert main(["credits", "show", "agent-1"]) == 0
    assert "using" not in capsys.readouterr().err


def test_without_settings_or_a_stack_a_command_says_so_in_one_line(
    newcomer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["credits", "show", "agent-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no DATABASE_URL or REDIS_URL set" in err and "dispatcher run" in err
    assert list(newcomer.glob("dispatcher.db*")) == []


def test_a_stack_that_no_longer_runs_is_named_not_used(
    settings: Settings, newcomer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    _stack(settings, newcomer / ".dispatcher", pid=int(dead.stdout))
    assert main(["alerts"]) == 2
    assert "no longer runs" in capsys.readouterr().err


def test_a_missing_file_is_one_line_not_a_traceback(
    newcomer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (newcomer / "r.csv").write_text("id,email\nc-1,pat@example.org\n")
    argv = ["campaign", "send", "--user", "agent-1", "--subject", "Hi"]
    argv += ["--html", "missing.html", "--recipients", "r.csv"]
    assert main([*argv, "--api-url", "http://127.0.0.1:9", "--token", "t" * 12]) == 2
    err = capsys.readouterr().err
    assert err == "dispatcher campaign: missing.html: No such file or directory\n"


def test_db_upgrade_migrates_the_running_stack_s_database_not_a_stray_one(
    settings: Settings, newcomer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack_db = f"sqlite:///{newcomer / 'stack.db'}"
    _stack(settings.with_overrides(database_url=stack_db), newcomer / ".dispatcher")
    assert main(["db", "upgrade"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{stack_db} is at revision ") and "using the local stack" in err
    assert list(newcomer.glob("dispatcher.db*")) == []
