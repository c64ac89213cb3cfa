"""A real SMTP server (aiosmtpd) for the local stack and tests.

It stores every accepted message in memory and, when given a folder, as a ``.eml`` file there;
it can be told to answer a recipient or a whole message with any reply, or to drop the
connection before or after DATA.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)

#: A fault decides how to answer, at two stages: "rcpt" (one recipient, no data yet) and
#: "data" (after the final dot). None goes on as normal; a string like "550 5.1.1 No such user"
#: is sent as the reply; DROP closes the connection without a reply (at "data": after the
#: message was read in full, so the client cannot know whether it was taken).
Fault = Callable[[str, "Received"], str | None]
DROP = "drop"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes

    @property
    def message_id(self) -> str:
        return str(message_from_bytes(self.data, policy=default)["Message-ID"] or "")

    def parsed(self) -> Any:
        return message_from_bytes(self.data, policy=default)


class RecordingHandler:
    """aiosmtpd handler that records (and optionally writes) every accepted message."""

    def __init__(self, folder: Path | None = None, fault: Fault | None = None) -> None:
        self.folder = folder
        self.fault = fault
        self.messages: list[Received] = []
        self.attempts = 0
        self._lock = threading.Lock()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.fault is not None:
            got = Received(str(envelope.mail_from), (*envelope.rcpt_tos, address), b"")
            answer = self.fault("rcpt", got)
            if answer == DROP:
                return self._drop(server)
            if answer is not None:
                return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode()
        got = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
        )
        with self._lock:
            self.attempts += 1
        answer = self.fault("data", got) if self.fault else None
        if answer == DROP:
            self._keep(got)  # the server has it; the client never hears so
            return self._drop(server)
        if answer is not None:
            return answer
        self._keep(got)
        return "250 2.0.0 OK: queued"

    @staticmethod
    def _drop(server: SMTP) -> str:
        if server.transport is not None:
            server.transport.close()
        return "421 4.3.0 closing"  # never reaches the client: the socket is closed

    def _keep(self, got: Received) -> None:
        with self._lock:
            self.messages.append(got)
            count = len(self.messages)
        if self.folder is not None:
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{count:06d}.eml"
            (self.folder / name).write_bytes(got.data)
            log.info("stored %s for %s", name, ",".join(got.rcpt_tos))

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()
            self.attempts = 0


class DevSMTPServer:
    """A threaded aiosmtpd server on loopback; ``start()`` returns the bound port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        folder: Path | None = None,
        fault: Fault | None = None,
    ) -> None:
        self.handler = RecordingHandler(folder, fault)
        self.host = host
        self._port = port
        self._controller: Controller | None = None

    @property
    def port(self) -> int:
        if self._controller is None:
            raise RuntimeError("server not started")
        return int(self._controller.port)

    def start(self) -> int:
        self._controller = Controller(
            self.handler,
            hostname=self.host,
            port=self._port or _free_port(self.host),
            ready_timeout=10,
            data_size_limit=50 * 1024 * 1024,
        )
        self._controller.start()
        return self.port

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_forever(host: str, port: int, folder: Path) -> None:
    """Run a .eml-writing server in the foreground until interrupted."""
    server = DevSMTPServer(host, port, folder)
    server.start()
    log.info("SMTP server on %s:%d writing .eml files to %s", host, server.port, folder)
    try:
        asyncio.run(_wait_forever())
    finally:
        server.stop()


async def _wait_forever() -> None:
    await asyncio.Event().wait()
