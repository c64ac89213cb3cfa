"""The inbound SMTP server: unsubscribe requests by mail, bounces and complaints.

It routes each message by its recipient:

- the ``List-Unsubscribe`` mailto address: a mail client that cannot make the one-click POST
  sends a message with the subject ``unsubscribe <token>``; the token's signature is checked
  and the contact suppressed for the agent who sent the email, exactly as the one-click POST
  does; a forged or altered token is refused with a 550;
- a send's return path (``bounce+<send>-<tag>@``, :mod:`dispatcher.delivery.returnpath`):
  a DSN or a complaint report about that send, recorded by :mod:`dispatcher.delivery.feedback`;
  a forged or altered return path is refused at RCPT with a 550;
- the plain bounce mailbox (``bounce@``, for feedback loops): a report matched to its send by a
  signed reference in the attached original.

Anything else is refused at RCPT. Mail to a return path that is no report (an auto-reply) is
taken and dropped: refusing it would only bounce it back to nobody.
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

from dispatcher.delivery import feedback, reports, returnpath, unsubscribe
from dispatcher.errors import ConfigError, InvalidInput
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: An unsubscribe request is a few hundred bytes; a DSN or complaint report attaches the
#: original email, which can be as large as any email we send.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024


class InboundHandler:
    """aiosmtpd handler: the unsubscribe mailbox and the bounce addresses, routed by RCPT."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.mailbox = unsubscribe.mailbox(rt.settings).lower()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.lower() != self.mailbox:
            try:
                path = returnpath.parse(self.rt.settings, address)
            except InvalidInput as exc:
                log.info("mail to a bounce address refused: %s", exc.problem)
                return f"550 5.7.1 the return path {exc.problem}"
            if path is None:
                return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode()
        answers = []
        for rcpt in envelope.rcpt_tos:
            if rcpt.lower() == self.mailbox:
                answers.append(await self._unsubscribe(data))
            else:
                answers.append(await self._report(rcpt, data))
        # One answer for the message: the first refusal, else the last acceptance.
        return next((a for a in answers if not a.startswith("2")), answers[-1])

    async def _unsubscribe(self, data: bytes) -> str:
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

    async def _report(self, rcpt: str, data: bytes) -> str:
        """A DSN or complaint report at a bounce address (checked at RCPT)."""
        report = reports.parse(data)
        if report is None:
            log.info("mail to a bounce address that is no report dropped")
            return "250 2.0.0 taken (not a delivery or feedback report)"
        path = returnpath.parse(self.rt.settings, rcpt)
        try:
            if path is not None and path.send_id is not None:
                done = await asyncio.to_thread(feedback.record, self.rt, path.send_id, report)
            else:
                done = await asyncio.to_thread(feedback.handle, self.rt, report)
        except InvalidInput as exc:
            log.info("report refused: %s %s", exc.field, exc.problem)
            return f"550 5.7.1 the report's {exc.field} {exc.problem}"
        if done is None:
            return "250 2.0.0 taken (no email of ours matches)"
        return f"250 2.0.0 {report.kind.value} recorded"

    async def handle_exception(self, error: Exception) -> str:
        """Anything but a bad request (the database away, a bug): a temporary failure, so the
        sender's server tries again; the details go to our log, never to the peer."""
        log.error("inbound mail not processed", exc_info=error)
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
        InboundHandler(rt),
        hostname=host,
        port=port,
        ready_timeout=10,
        data_size_limit=MAX_MESSAGE_BYTES,
    )
    try:
        controller.start()
    except OSError as exc:
        raise ConfigError("--port", f"cannot listen on {host}:{port}: {exc.strerror}") from None
    log.info(
        "unsubscribe mailbox %s and bounce addresses @%s served on %s:%d",
        unsubscribe.mailbox(rt.settings),
        returnpath.domain(rt.settings),
        host,
        port,
    )
    return controller
