"""Child processes of the local stack, its stop signals, errors and console-side helpers.

A child gets its own process group, its output copied to a log file, and (on Linux) a
SIGTERM when ``dispatcher run`` dies, so a stopped or killed stack leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from dispatcher.errors import DispatcherError

HOST = "127.0.0.1"

#: How the stack tells the person at the console what it is doing.
Say = Callable[[str], None]

# Linux only: the child asks to receive SIGTERM when `dispatcher run` dies (even by SIGKILL), then
# becomes the real command, so a killed stack leaves no orphan redis-server or worker behind.
_PARENT_DEATH_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class StackError(DispatcherError):
    """The local stack could not start or stopped unexpectedly; the message says what to do."""


class Stopped(DispatcherError):
    """Ctrl-C (or SIGTERM/SIGHUP) arrived while the stack was starting."""


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when ``host:port`` cannot be bound (something else listens there)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class Child:
    """One child process whose output goes to a log file (and, when asked, to the console)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        echo: TextIO | None = None,
        ready_marker: Callable[[str], bool] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.echo = echo
        self.ready = threading.Event()
        self._ready_marker = ready_marker
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self._proc.pid

    def start(self) -> None:
        """Start the child in its own process group and begin copying its output."""
        argv = self.argv
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-I", "-c", _PARENT_DEATH_LAUNCHER, str(os.getpid()), *argv]
        self._proc = subprocess.Popen(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C in the terminal reaches only `dispatcher run`,
            # which then stops the children in order (API, worker, Redis).
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._copy_output, name=f"log-{self.name}")
        self._pump.daemon = True
        self._pump.start()

    def _copy_output(self) -> None:
        """Copy output lines to the log (and console); watch for the ready marker."""
        assert self._proc is not None and self._proc.stdout is not None
        with self.log_path.open("ab") as log:
            for raw in self._proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                if self.echo is not None:
                    print(f"{self.name:<6} | {line}", file=self.echo, flush=True)
                if self._ready_marker is not None and self._ready_marker(line):
                    self.ready.set()

    def alive(self) -> bool:
        """True while the child runs."""
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        """The exit code once the child has exited, else None."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the child's process group, wait, then SIGKILL what is left."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        else:
            # The leader is gone; anything it left in its group goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._pump is not None:
            self._pump.join(5)


class StopSignal:
    """Turns SIGINT, SIGTERM and SIGHUP into an event for as long as the stack runs."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.event.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[threading.Event]:
        """The handlers in place for the ``with`` block; the event is set on any signal."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self.event
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
