"""A real SMTP server (aiosmtpd) for the local stack and tests.

It stores every accepted message in memory and, when given a folder, as a ``.eml`` file there;
it can be told (by a :class:`FaultPlan`: by recipient or by schedule) to answer a recipient or a
whole message with any reply, to drop the connection before or after DATA, or to answer slowly.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

log = logging.getLogger(__name__)

#: A fault decides how to answer, at two stages: "rcpt" (one recipient, no data yet) and
#: "data" (after the final dot). None goes on as normal; a string like "550 5.1.1 No such user"
#: is sent as the reply; DROP closes the connection without a reply (at "data": after the
#: message was read in full, so the client cannot know whether it was taken).
Fault = Callable[[str, "Received"], "str | Action | None"]
DROP = "drop"


@dataclass(frozen=True)
class Action:
    """What the server does at one stage of one message: wait ``delay`` seconds, then drop the
    connection, answer ``reply``, or (neither) go on as normal."""

    stage: str  # "rcpt" (before DATA) or "data" (after the final dot)
    reply: str | None = None
    drop: bool = False
    delay: float = 0.0


def reply(text: str, stage: str = "rcpt") -> Action:
    """Answer ``text`` (e.g. "451 4.3.0 try later") at ``stage``."""
    return Action(stage, reply=text)


def slow(seconds: float, stage: str = "data") -> Action:
    """Answer normally, but only after ``seconds``."""
    return Action(stage, delay=seconds)


DROP_BEFORE_DATA = Action("rcpt", drop=True)
DROP_AFTER_DATA = Action("data", drop=True)  # the message was read in full: outcome unknown


class FaultPlan:
    """Faults by recipient (each arrival of that recipient's message takes the next action
    of its list; afterwards it is served normally) and by schedule (the n-th message overall
    takes ``schedule[n]``; None serves it normally). Thread-safe; usable as a :data:`Fault`."""

    def __init__(
        self,
        by_recipient: dict[str, list[Action]] | None = None,
        schedule: list[Action | None] | None = None,
    ) -> None:
        self._by_recipient = {k.lower(): list(v) for k, v in (by_recipient or {}).items()}
        self._schedule = list(schedule or [])
        self._count = 0
        self._for_data: dict[str, Action] = {}
        self._lock = threading.Lock()

    def __call__(self, stage: str, got: Received) -> Action | None:
        rcpt = got.rcpt_tos[-1].lower() if got.rcpt_tos else ""
        with self._lock:
            if stage == "rcpt":
                action: Action | None = None
                queue = self._by_recipient.get(rcpt)
                if queue:
                    action = queue.pop(0)
                elif self._count < len(self._schedule):
                    action = self._schedule[self._count]
                self._count += 1
                if action is not None and action.stage == "data":
                    self._for_data[rcpt] = action
                    return None
                return action
            return self._for_data.pop(rcpt, None)


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    #: The message came over an encrypted connection.
    tls: bool = False
    #: MAIL asked for SMTPUTF8 (RFC 6531).
    smtputf8: bool = False

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
        #: RSET commands read: a client taking back a MAIL and RCPT it will not follow with DATA.
        self.resets = 0
        #: When each MAIL command was read (unix seconds): the moment the relay starts taking
        #: a message, what a relay's own rate limit counts.
        self.mail_at: list[float] = []
        #: The client's address and port of each MAIL command: which connection carried it.
        self.mail_peers: list[Any] = []
        #: QUIT commands read: connections a client closed in good order.
        self.quits = 0
        #: Answer this many coming MAIL commands with "421 closing" (a relay shedding the
        #: connections clients keep).
        self.close_at_mail = 0
        self._live: set[SMTP] = set()
        self._lock = threading.Lock()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        with self._lock:
            self.mail_at.append(time.time())
            self.mail_peers.append(session.peer)
            self._live.add(server)
            closing = self.close_at_mail > 0
            self.close_at_mail -= closing
        if closing:
            return "421 4.4.2 closing this connection, come back on another"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.fault is not None:
            got = Received(str(envelope.mail_from), (*envelope.rcpt_tos, address), b"")
            answer = await self._act(server, self.fault("rcpt", got))
            if answer is not None:
                return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.quits += 1
            self._live.discard(server)
        return "221 Bye"

    def close_connections(self) -> int:
        """Close, from the server's side, every connection that carried a message and is still
        open (a relay dropping the connections clients keep); how many."""
        with self._lock:
            live, self._live = list(self._live), set()
        open_ = [s for s in live if s.transport is not None and not s.transport.is_closing()]
        for server in open_:
            server.loop.call_soon_threadsafe(server.transport.close)  # type: ignore[union-attr]
        return len(open_)

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.resets += 1
        return "250 OK"

    async def _act(self, server: SMTP, answer: str | Action | None) -> str | None:
        """Carry out a fault's answer; returns the reply to send, or None to go on."""
        if isinstance(answer, Action):
            if answer.delay:
                await asyncio.sleep(answer.delay)
            if answer.drop:
                return self._drop(server)
            return answer.reply
        if answer == DROP:
            return self._drop(server)
        return answer

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode()
        got = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            tls=server.transport is not None
            and server.transport.get_extra_info("ssl_object") is not None,
            smtputf8=envelope.smtp_utf8,
        )
        with self._lock:
            self.attempts += 1
        answer = self.fault("data", got) if self.fault else None
        dropping = answer == DROP or (isinstance(answer, Action) and answer.drop)
        if dropping:
            self._keep(got)  # the server has it; the client never hears so
        replied = await self._act(server, answer)
        if dropping:
            return replied or ""
        if replied is not None:
            return replied
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
            self.resets = 0
            self.mail_at.clear()


class DevSMTPServer:
    """A threaded aiosmtpd server on loopback; ``start()`` returns the bound port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        folder: Path | None = None,
        fault: Fault | None = None,
        credentials: tuple[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        smtputf8: bool = True,
    ) -> None:
        self.handler = RecordingHandler(folder, fault)
        #: Offer SMTPUTF8 (RFC 6531) in the EHLO answer, as common relays do.
        self.smtputf8 = smtputf8
        self.host = host
        self._port = port
        self._controller: Controller | None = None
        #: With credentials the server offers AUTH (plain text allowed on loopback) and
        #: answers 535 to any other user or password.
        self.credentials = credentials
        #: With a TLS context the server offers STARTTLS, or with ``implicit_tls`` speaks TLS
        #: from the first byte (port 465 style); AUTH is then offered over TLS only.
        self.tls = tls
        self.implicit_tls = implicit_tls

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
            enable_SMTPUTF8=self.smtputf8,
            **self._auth_options(),
            **self._tls_options(),
        )
        self._controller.start()
        return self.port

    def _auth_options(self) -> dict[str, Any]:
        if self.credentials is None:
            return {}

        def check(
            _server: SMTP, _session: Session, _envelope: Envelope, _mechanism: str, data: Any
        ) -> AuthResult:
            wanted = self.credentials
            given = (data.login.decode(), data.password.decode()) if data else None
            return AuthResult(success=given == wanted, handled=False)

        # STARTTLS first when it is offered; an implicit-TLS session is encrypted from the start
        # (aiosmtpd only knows about STARTTLS, so it must not ask for it then).
        require_tls = self.tls is not None and not self.implicit_tls
        return {"authenticator": check, "auth_require_tls": require_tls}

    def _tls_options(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        if self.implicit_tls:
            return {"ssl_context": self.tls}
        return {"tls_context": self.tls}

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


def _free_port(host: str) -> int:
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
