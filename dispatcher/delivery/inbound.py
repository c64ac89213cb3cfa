"""Unsubscribe requests by mail: the SMTP server behind the ``List-Unsubscribe`` mailto.

A mail client that cannot make the one-click POST sends a message to the mailto address with
the subject ``unsubscribe <token>``. This server accepts mail for that one address only,
checks the token's signature and suppresses the contact for the agent who sent the email,
exactly as the one-click POST does; a forged or altered token is refused with a 550.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from dispatcher.delivery import unsubscribe
from dispatcher.errors import ConfigError, InvalidInput
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: An unsubscribe request is a few hundred bytes; anything much larger is not one.
MAX_MESSAGE_BYTES = 256 * 1024


class UnsubscribeHandler:
    """aiosmtpd handler: mail to the unsubscribe mailbox only, one request per message."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.mailbox = unsubscribe.mailbox(rt.settings).lower()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.lower() != self.mailbox:
            return "550 5.1.1 this server only takes unsubscribe requests"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode()
        message = message_from_bytes(data, policy=default)
        token = unsubscribe.token_in(str(message.get("Subject", "")), _text_of(message))
        if token is None:
            log.info("unsubscribe mail without a token refused")
            return "550 5.7.1 no unsubscribe token in the subject"
        try:
            done = await asyncio.to_thread(unsubscribe.unsubscribe, self.rt, token, "mail")
        except InvalidInput as exc:
            log.info("unsubscribe mail refused: %s", exc.problem)
            return f"550 5.7.1 the unsubscribe token {exc.problem}"
        log.info("unsubscribed by mail user=%s contact=%s", done.user_id, done.contact_id)
        return "250 2.0.0 unsubscribed"

    async def handle_exception(self, error: Exception) -> str:
        """Anything but a bad request (the database away, a bug): a temporary failure, so the
        sender's server tries again; the details go to our log, never to the peer."""
        log.error("unsubscribe mail not processed", exc_info=error)
        return "451 4.3.0 temporary failure, try again later"


def _text_of(message: EmailMessage) -> str:
    """The plain-text body, if there is one (a fallback place for the token)."""
    part = message.get_body(preferencelist=("plain",))
    if part is None:
        return ""
    with contextlib.suppress(LookupError, UnicodeDecodeError):
        return str(part.get_content())[:10_000]
    return ""


def start(rt: Runtime, host: str = "127.0.0.1", port: int = 2526) -> Controller:
    """Start the server in its own thread; ``stop()`` the controller when done. Raises
    :class:`~dispatcher.errors.ConfigError` when the address cannot be listened on."""
    controller = Controller(
        UnsubscribeHandler(rt),
        hostname=host,
        port=port,
        ready_timeout=10,
        data_size_limit=MAX_MESSAGE_BYTES,
    )
    try:
        controller.start()
    except OSError as exc:
        raise ConfigError("--port", f"cannot listen on {host}:{port}: {exc.strerror}") from None
    log.info("unsubscribe mailbox %s served on %s:%d", unsubscribe.mailbox(rt.settings), host, port)
    return controller
