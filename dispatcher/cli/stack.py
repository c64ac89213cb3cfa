"""The local stack as the commands find it: ``stack.json`` in the stack's folder, and the rule
that points a command at it when no database or Redis is configured.

``dispatcher run`` (:mod:`devstack.localstack`) writes the file; every command reads it here,
since the core never imports devstack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dispatcher.db import redact
from dispatcher.errors import DispatcherError
from dispatcher.settings import Settings

STACK_FILE = "stack.json"
DEFAULT_DIR = Path(".dispatcher")
#: Where the local stack's folder is when no ``--dir`` is given.
DIR_VARIABLE = "DISPATCHER_DIR"


class StackNotFound(DispatcherError):
    """No usable ``stack.json``, and nothing else configured; the message says what to do."""


@dataclass(frozen=True)
class StackInfo:
    """What a running stack tells its clients, saved as ``stack.json``."""

    api_url: str
    token: str
    database_url: str
    redis_url: str
    redis_kind: str
    smtp_host: str
    smtp_port: int
    outbox: str
    logs: str
    free_plan_credits: int
    pid: int
    children: dict[str, int] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        """Write ``stack.json`` readable by the owner only (it holds the API token)."""
        path = directory / STACK_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: Path) -> StackInfo:
        """Read ``stack.json`` of the stack running in ``directory``."""
        path = directory / STACK_FILE
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise StackNotFound(
                f"no {path}: start the stack first with `dispatcher run --dir {directory}`"
            ) from None
        except ValueError as exc:
            raise StackNotFound(f"{path} is not valid JSON ({exc})") from None
        try:
            return cls(**raw)
        except TypeError as exc:
            raise StackNotFound(f"{path} is from another version of dispatcher ({exc})") from None

    def describe(self, directory: Path) -> str:
        """One line naming the stack: its folder, database and Redis."""
        return (
            f"the local stack in {directory} ({redact(self.database_url)}, redis "
            f"{redact(self.redis_url)}, pid {self.pid})"
        )


def stack_dir(args: argparse.Namespace | None = None) -> Path:
    """The local stack's folder: ``--dir``, else ``DISPATCHER_DIR``, else ``.dispatcher``."""
    given: Path | None = getattr(args, "dir", None)
    if given is not None:
        return given
    return Path(os.environ.get(DIR_VARIABLE) or DEFAULT_DIR)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _configured(name: str, env_file: Path) -> bool:
    """True when the variable is set in the environment or the .env file."""
    if os.environ.get(name, "").strip():
        return True
    if not env_file.is_file():
        return False
    for line in env_file.read_text().splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip() == name and value.strip().strip("'\""):
            return True
    return False


def command_settings(args: argparse.Namespace | None = None, err: TextIO | None = None) -> Settings:
    """The settings an ops command works with.

    ``DATABASE_URL``, ``REDIS_URL`` or ``BROKER_URL`` set (environment or ``.env``): the
    environment's settings, as every process of the Procfile reads them. None set: the running
    local stack's database, Redis and SMTP relay (its ``stack.json``), named in one line on
    stderr. None set and no stack: :class:`StackNotFound`, rather than a stray
    ``dispatcher.db`` in the working directory and whatever Redis answers on the default port.
    """
    env_file = Path(".env")
    if any(_configured(name, env_file) for name in ("DATABASE_URL", "REDIS_URL", "BROKER_URL")):
        return Settings.from_env()
    directory = stack_dir(args)
    if not (directory / STACK_FILE).is_file():
        raise StackNotFound(
            f"no DATABASE_URL or REDIS_URL set (environment or .env) and no local stack in "
            f"{directory} ({STACK_FILE}): start one with `dispatcher run`, point at one with "
            f"--dir or {DIR_VARIABLE}, or set DATABASE_URL and REDIS_URL"
        )
    info = StackInfo.load(directory)
    if not _running(info.pid):
        raise StackNotFound(
            f"{directory / STACK_FILE} is left from a stack that no longer runs (pid "
            f"{info.pid}): start it again with `dispatcher run --dir {directory}`"
        )
    print(f"using {info.describe(directory)}", file=err or sys.stderr, flush=True)
    stack = {
        "DATABASE_URL": info.database_url,
        "REDIS_URL": info.redis_url,
        "SMTP_HOST": info.smtp_host,
        "SMTP_PORT": str(info.smtp_port),
        # As the stack's workers reach its SMTP server: no login, no TLS.
        "SMTP_USERNAME": "",
        "SMTP_PASSWORD": "",
        "SMTP_TLS": "off",
        "FREE_PLAN_CREDITS": str(info.free_plan_credits),
    }
    if not _configured("PUBLIC_BASE_URL", env_file):
        stack["PUBLIC_BASE_URL"] = info.api_url  # links lead to the stack's API
    return Settings.from_env({**os.environ, **stack})
