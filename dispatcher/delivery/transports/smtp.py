"""SMTP transport over aiosmtplib, with outcomes classified by where the conversation broke."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from dispatcher import metrics
from dispatcher.delivery.message import Envelope
from dispatcher.delivery.relay import RelayGuard
from dispatcher.delivery.transports.base import DataMarks, Delivery, Outcome, Pace, Stop
from dispatcher.delivery.transports.classify import classify
from dispatcher.errors import (
    DeliveryDeferred,
    DeliveryRejected,
    DeliveryUnknown,
    NotAttempted,
    Yielded,
)
from dispatcher.reasons import Reason

log = logging.getLogger(__name__)


#: ``SMTP_TLS`` as aiosmtplib's (use_tls, start_tls): start_tls None upgrades when offered.
_TLS_MODES: dict[str, tuple[bool, bool | None]] = {
    "opportunistic": (False, None),
    "starttls": (False, True),
    "implicit": (True, False),
    "off": (False, False),
}


@dataclass(frozen=True)
class SMTPConfig:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    #: ``opportunistic``, ``starttls``, ``implicit`` or ``off`` (see ``SMTP_TLS``).
    tls: str = "opportunistic"
    #: PEM bundle of the CAs trusted to sign the relay's certificate (None: the system's).
    ca_file: str | None = None
    #: Log in over a connection that is not encrypted.
    allow_plaintext_auth: bool = False
    timeout: float = 30.0


class ConnectionGone(DeliveryDeferred):
    """The connection failed at MAIL, the first command of a message: lost, timed out or
    closing (421). Nothing of the message was sent, so on a kept connection it is tried once
    more on a fresh one."""


#: Replies to AUTH that mean our credentials (or the relay's account) are refused.
AUTH_REFUSED = (530, 534, 535, 538)


class SMTPTransport:
    """SMTP with the conversation driven step by step.

    Driving MAIL, RCPT and DATA ourselves tells a failure before the message was handed over
    (retry is safe) from one after the final dot (the server may have it: ``unknown``).
    :meth:`send` keeps up to ``pool_size`` connections open across calls on one event loop
    (:class:`SMTPPool`); :meth:`bulk` gives a sender that reuses ``pool_size`` connections
    across the batches of one run.
    """

    def __init__(
        self,
        config: SMTPConfig,
        pool_size: int = 8,
        guard: RelayGuard | None = None,
        *,
        idle_check_seconds: float = 5.0,
        idle_close_seconds: float = 30.0,
    ) -> None:
        self.config = config
        self.pool_size = pool_size
        self.guard = guard
        self.idle_check_seconds = idle_check_seconds
        self.idle_close_seconds = idle_close_seconds
        self._pool: SMTPPool | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        cfg = self.config
        use_tls, start_tls = _TLS_MODES[cfg.tls]
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            start_tls=start_tls,
            use_tls=use_tls,
            validate_certs=True,
            cert_bundle=cfg.ca_file,
        )
        try:
            await client.connect()
            await _greet(client)
        except aiosmtplib.SMTPResponseException as exc:
            # A refusal at greeting is about the relay, not this message: retry with backoff.
            client.close()
            raise DeliveryDeferred(
                Reason.SMTP_CONNECT_REFUSED, f"{exc.code} {exc.message} (at connect)", exc.code
            ) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise DeliveryDeferred(Reason.CONNECT_FAILED, _describe(exc)) from None
        if cfg.username and cfg.password:
            if client.get_transport_info("ssl_object") is None and not cfg.allow_plaintext_auth:
                # Every message would meet the same relay: stop all workers and alert.
                client.close()
                why = (
                    "the relay offers no TLS, so our login is not sent (set SMTP_TLS=implicit "
                    "for port 465, or SMTP_ALLOW_PLAINTEXT_AUTH=true for a trusted network)"
                )
                if self.guard is not None:
                    raise self.guard.halt(why)
                raise DeliveryDeferred(Reason.SMTP_LOGIN_REFUSED, why)
            try:
                await client.login(cfg.username, cfg.password)
            except aiosmtplib.SMTPResponseException as exc:
                client.close()
                detail = f"{exc.code} {exc.message} (at login)"
                if exc.code in AUTH_REFUSED and self.guard is not None:
                    # Our credentials are refused: every message would fail the same way.
                    # Stop all workers on this relay and alert, instead of burning retries.
                    raise self.guard.halt(f"the relay refused our credentials: {detail}") from None
                raise DeliveryDeferred(Reason.SMTP_LOGIN_REFUSED, detail, exc.code) from None
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                client.close()
                raise DeliveryDeferred(Reason.CONNECT_FAILED, _describe(exc)) from None
        return client

    async def send(self, envelope: Envelope, message: bytes) -> Delivery:
        """Send one message on a pooled connection; raises the delivery errors, or
        :class:`NotAttempted` when the relay's guard held it back.

        Connections are kept open across calls made on the same event loop (the process's
        :class:`~dispatcher.aio.LoopThread`): up to ``pool_size`` at once, checked with NOOP
        after ``idle_check_seconds`` unused, closed after ``idle_close_seconds`` unused and by
        :meth:`shutdown`. A kept connection the relay dropped before DATA costs one reconnect
        for the message on it; once DATA started, a lost connection is ``unknown`` as ever."""
        if self.guard is not None:
            self.guard.check()
        pool = self._pool_here()
        async with pool.slot:
            client, reused = await pool.acquire()
            try:
                if self.guard is not None:
                    # Admitted once connected: MAIL follows at once, so the relay sees the
                    # message within the limiter's margin of its admission.
                    await self.guard.admit()
                try:
                    delivery = await _converse(client, envelope, message)
                except ConnectionGone as exc:
                    if not reused:
                        raise
                    # Nothing of this message reached DATA: one fresh connection is tried.
                    log.info("a kept SMTP connection was dropped (%s); reconnecting", exc.detail)
                    client.close()
                    client = await pool.connect()
                    delivery = await _converse(client, envelope, message)
            except DeliveryUnknown:
                client.close()  # the conversation's state is unknown: never reused
                raise
            except (DeliveryDeferred, DeliveryRejected):
                pool.release(await _reset(client))
                raise
            except NotAttempted:
                pool.release(client)  # held back before MAIL: the connection is as it was
                raise
            except BaseException:
                client.close()
                raise
            pool.release(client)
            return delivery

    def _pool_here(self) -> SMTPPool:
        """The pool of the running event loop (a connection belongs to the loop it was opened
        on); a pool left on another loop is dropped with its connections."""
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool.loop is not loop:
            if self._pool is not None:
                self._pool.abandon()
            self._pool = SMTPPool(self, loop)
        return self._pool

    async def shutdown(self) -> None:
        """QUIT the pooled connections (call on the loop they were opened on)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def pool(self) -> SMTPPool | None:
        """The current pool, if a message was sent (for monitoring and tests)."""
        return self._pool

    def bulk(self) -> SMTPBulk:
        """A sender that keeps up to ``pool_size`` connections open across batches."""
        return SMTPBulk(self)


class SMTPPool:
    """The connections :meth:`SMTPTransport.send` keeps open on one event loop.

    At most ``pool_size`` conversations at once (``slot``); an idle connection is reused last in,
    first out (the warmest), checked with NOOP when it sat longer than ``idle_check_seconds``,
    and closed when it sat longer than ``idle_close_seconds``.
    """

    def __init__(self, transport: SMTPTransport, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slot = asyncio.Semaphore(transport.pool_size)
        #: Connections opened so far (reconnects included).
        self.opened = 0
        self._transport = transport
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._reaper: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> int:
        """Connections open and waiting for a message."""
        return len(self._idle)

    async def acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        """An open connection, and whether it was used before."""
        while self._idle:
            client, since = self._idle.pop()
            if not client.is_connected:
                continue
            if time.monotonic() - since > self._transport.idle_check_seconds:
                try:
                    await client.noop()
                except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                    log.info("a kept SMTP connection failed its check: %s", _describe(exc))
                    client.close()
                    continue
            return client, True
        return await self.connect(), False

    async def connect(self) -> aiosmtplib.SMTP:
        client = await self._transport._connect()
        self.opened += 1
        return client

    def release(self, client: aiosmtplib.SMTP | None) -> None:
        """Keep ``client`` for the next message (when it is still open)."""
        if client is None or not client.is_connected:
            return
        self._idle.append((client, time.monotonic()))
        if self._reaper is None:
            self._reaper = self.loop.call_later(self._transport.idle_close_seconds, self._reap)

    def _reap(self) -> None:
        """Close the connections that sat unused longer than ``idle_close_seconds``."""
        self._reaper = None
        cutoff = time.monotonic() - self._transport.idle_close_seconds
        stale = [client for client, since in self._idle if since <= cutoff]
        self._idle = [(client, since) for client, since in self._idle if since > cutoff]
        for client in stale:
            self.loop.create_task(_quit(client))
        if self._idle:
            self._reaper = self.loop.call_later(self._transport.idle_close_seconds, self._reap)

    async def close(self) -> None:
        """QUIT every idle connection."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(client) for client, _ in idle))

    def abandon(self) -> None:
        """Drop the connections of a pool whose loop is gone or elsewhere, without a QUIT."""
        idle, self._idle = self._idle, []
        for client, _ in idle:
            try:
                client.close()
            except RuntimeError as exc:  # its loop is closed: the socket goes with it
                log.debug("dropping a connection of a closed loop: %s", exc)


class SMTPBulk:
    """Reused SMTP connections for a run of batches; close it when done."""

    def __init__(self, transport: SMTPTransport) -> None:
        self._transport = transport
        self._clients: list[aiosmtplib.SMTP | None] = [None] * transport.pool_size

    async def send_many(
        self,
        items: Sequence[tuple[Envelope, bytes]],
        deadline: float | None = None,
        marks: DataMarks | None = None,
        stop: Stop | None = None,
        pace: Pace | None = None,
    ) -> list[Outcome]:
        """Send every message over the pooled connections; one outcome per item, in order
        (delivery errors are returned, not raised). ``marks`` is told of each message that
        reaches DATA. Items not started by ``deadline`` (a ``time.monotonic()`` reading), or
        after ``stop`` answered a NotAttempted for an outcome, are returned as such (see
        :class:`~dispatcher.delivery.transports.base.BulkSender`)."""
        results: list[Outcome | None] = [None] * len(items)
        pending = iter(range(len(items)))
        guard = self._transport.guard
        held: NotAttempted | None = None
        if guard is not None:
            try:
                guard.check()
            except NotAttempted as exc:
                held = exc

        async def lane(slot: int) -> None:
            nonlocal held
            client = self._clients[slot]
            for i in pending:  # shared by the lanes: each item goes to the first free one
                if held is None and pace is not None:
                    await pace()
                if held is None and deadline is not None and time.monotonic() > deadline:
                    held = Yielded("the task's time is up")
                if held is not None:
                    results[i] = held  # halted, rate-limited or out of time: not attempted
                    continue
                envelope, message = items[i]
                try:
                    if client is None or not client.is_connected:
                        client = None
                        client = await self._transport._connect()
                    if guard is not None and guard.limited:
                        await guard.admit()  # once connected: MAIL follows at once
                    results[i] = await _converse(client, envelope, message, i, marks)
                except NotAttempted as exc:
                    held = exc  # this one and the rest are held back
                    results[i] = exc
                    # A mark refused before DATA leaves MAIL and RCPT pending on the connection.
                    client = await _reset(client)
                except (DeliveryDeferred, DeliveryRejected, DeliveryUnknown) as exc:
                    results[i] = exc
                    client = await _reset(client)
                outcome = results[i]
                if stop is not None and held is None and outcome:
                    held = stop(outcome)
            self._clients[slot] = client

        lanes = max(1, min(len(self._clients), len(items)))
        await asyncio.gather(*(lane(slot) for slot in range(lanes)))
        done = [r for r in results if r is not None]
        assert len(done) == len(items), "every item has an outcome"
        return done

    async def close(self) -> None:
        for client in self._clients:
            if client is not None:
                await _quit(client)
        self._clients = [None] * len(self._clients)


async def _converse(
    client: aiosmtplib.SMTP,
    envelope: Envelope,
    message: bytes,
    item: int = 0,
    marks: DataMarks | None = None,
) -> Delivery:
    """:func:`_conversation`, timed, with its outcome counted by reply class (a message
    held back before DATA, never offered, is neither)."""
    started = time.perf_counter()
    reply: str | None = "lost"
    try:
        delivery = await _conversation(client, envelope, message, item, marks)
        reply = "2xx"
        return delivery
    except DeliveryRejected:
        reply = "5xx"
        raise
    except DeliveryDeferred as exc:
        reply = "lost" if exc.reason == Reason.CONNECTION_LOST else "4xx"
        raise
    except NotAttempted:
        reply = None
        raise
    finally:
        if reply is not None:
            metrics.SMTP_SECONDS.observe(time.perf_counter() - started)
            metrics.SMTP_REPLIES.labels(reply).inc()


async def _conversation(
    client: aiosmtplib.SMTP,
    envelope: Envelope,
    message: bytes,
    item: int = 0,
    marks: DataMarks | None = None,
) -> Delivery:
    """One message on an open connection, outcomes classified by where it broke.

    Recipients are offered one by one and each reply is read: refused ones are reported in
    :attr:`Delivery.refused` while the message still goes to the accepted ones; only when
    every recipient is refused does the refusal become the message's outcome. ``marks`` is told
    of ``item`` once a recipient was accepted, immediately before DATA, and of how DATA ended
    (:class:`~dispatcher.delivery.transports.base.DataMarks`); its NotAttempted is raised with
    MAIL and RCPT left pending.
    """
    refused: dict[str, tuple[int, str]] = {}
    options, encoding = _utf8_options(client, envelope)
    try:
        reply = await client.execute_command(
            b"MAIL", b"FROM:" + _quoted(envelope.mail_from, encoding), *options
        )
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        raise ConnectionGone(Reason.CONNECTION_LOST, _describe(exc)) from None
    if reply.code != 250:
        if reply.code == 421:  # the server is closing this connection
            detail = f"{reply.code} {reply.message} (at mail)"
            raise ConnectionGone(Reason.CONNECTION_LOST, detail)
        raise classify(reply.code, reply.message, "mail")
    try:
        for rcpt in envelope.recipients:
            reply = await client.execute_command(b"RCPT", b"TO:" + _quoted(rcpt, encoding))
            if reply.code not in (250, 251):
                refused[rcpt] = (reply.code, reply.message)
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        raise DeliveryDeferred(Reason.CONNECTION_LOST, _describe(exc)) from None
    if len(refused) == len(envelope.recipients):
        code, text = refused[envelope.recipients[0]]
        raise classify(code, text, "rcpt")
    if marks is not None:
        await marks.before_data(item)
    outcome: Outcome
    try:
        response = await client.data(message)
    except aiosmtplib.SMTPResponseException as exc:
        # The server answered the final dot (or DATA itself) with a refusal.
        outcome = classify(exc.code, exc.message, "data")
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        # The bytes may have reached the server; resending risks a duplicate.
        outcome = DeliveryUnknown(f"connection lost during DATA: {_describe(exc)}")
    else:
        outcome = Delivery(response.code, response.message, refused)
    if marks is not None:
        marks.after_data(item, outcome)
    if isinstance(outcome, Delivery):
        return outcome
    raise outcome


async def _reset(client: aiosmtplib.SMTP | None) -> aiosmtplib.SMTP | None:
    """After a failed message: RSET to reuse the connection, or drop it."""
    if client is None or not client.is_connected:
        return None
    try:
        await client.rset()
        return client
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        client.close()
        return None


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await client.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        log.debug("QUIT failed after the messages were handled: %s", _describe(exc))
        client.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO (HELO when the relay refuses it) on a new connection, unless connecting already
    did (it does to look for STARTTLS): the relay's extensions are known before the first
    MAIL, which is sent as a plain command (:func:`_quoted`)."""
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


def _quoted(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL and RCPT. The addresses were checked when the send was accepted
    (:func:`dispatcher.validation.address`: a dot-atom, no spaces or brackets), where they
    are what aiosmtplib's ``quote_address`` would give, without parsing each again (50 us a
    call on a slow day, twice a message); line breaks are refused by aiosmtplib as ever."""
    return f"<{address}>".encode(encoding)


def _utf8_options(client: aiosmtplib.SMTP, envelope: Envelope) -> tuple[list[bytes], str]:
    """MAIL's options and the envelope's encoding: SMTPUTF8 for a non-ASCII address, refused
    for good (before MAIL, nothing sent) when the relay does not offer it."""
    if not envelope.smtputf8:
        return [], "ascii"
    if not client.supports_extension("smtputf8"):
        raise DeliveryRejected(
            Reason.SMTP_REJECTED,
            "the relay does not offer SMTPUTF8, which an address with non-ASCII characters "
            "before the @ needs",
        )
    return [b"SMTPUTF8"], "utf-8"
