"""SMTP transport over aiosmtplib, with outcomes classified by where the conversation broke."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiosmtplib

from dispatcher.errors import DeliveryDeferred, DeliveryRejected, DeliveryUnknown
from dispatcher.message import Envelope
from dispatcher.transports.base import Delivery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SMTPConfig:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    timeout: float = 30.0


class SMTPTransport:
    """One connection per message; the SMTP conversation is driven step by step.

    Driving MAIL, RCPT and DATA ourselves tells a failure before the message was handed over
    (retry is safe) from one after the final dot (the server may have it: ``unknown``).
    """

    def __init__(self, config: SMTPConfig) -> None:
        self.config = config

    async def send(self, envelope: Envelope, message: bytes) -> Delivery:
        cfg = self.config
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            start_tls=cfg.starttls,
            use_tls=False,
            validate_certs=True,
        )
        try:
            await client.connect()
            if cfg.username and cfg.password:
                await client.login(cfg.username, cfg.password)
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify(exc, "connect") from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryDeferred("connect_failed", _describe(exc)) from None
        try:
            try:
                await client.mail(envelope.mail_from)
                for rcpt in envelope.recipients:
                    await client.rcpt(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                raise _classify(exc, "envelope") from None
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                raise DeliveryDeferred("connection_lost", _describe(exc)) from None
            try:
                response = await client.data(message)
            except aiosmtplib.SMTPResponseException as exc:
                # The server answered the final dot (or DATA itself) with a refusal.
                raise _classify(exc, "data") from None
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                # The bytes may have reached the server; resending risks a duplicate.
                raise DeliveryUnknown(f"connection lost during DATA: {_describe(exc)}") from None
            return Delivery(response.code, response.message)
        finally:
            try:
                if client.is_connected:
                    await client.quit()
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                log.debug("QUIT failed after the message was handled: %s", _describe(exc))
                client.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _classify(exc: aiosmtplib.SMTPResponseException, stage: str) -> Exception:
    detail = f"{exc.code} {exc.message} (at {stage})"
    if 400 <= exc.code < 500:
        return DeliveryDeferred("smtp_deferred", detail, exc.code)
    return DeliveryRejected("smtp_rejected", detail, exc.code)
