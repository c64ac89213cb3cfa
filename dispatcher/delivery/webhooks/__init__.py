"""Relays' webhooks about emails already sent: each relay's signature check, and its events as
:class:`~dispatcher.delivery.reports.Report` values (the same ones a DSN or ARF gives)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from dispatcher.delivery.reports import Report
from dispatcher.delivery.webhooks import mailgun, postmark, sendgrid, ses
from dispatcher.delivery.webhooks.common import Headers
from dispatcher.settings import Settings

#: A relay's reader: settings, request headers (lower-case names), raw body, the time now.
Reader = Callable[[Settings, Headers, bytes, datetime], list[Report]]

#: Every relay whose webhook the dispatcher takes, by the name in its URL.
PROVIDERS: dict[str, Reader] = {
    ses.NAME: ses.reports,
    sendgrid.NAME: sendgrid.reports,
    postmark.NAME: postmark.reports,
    mailgun.NAME: mailgun.reports,
}
