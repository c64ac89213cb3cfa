"""Thin tasks: ids in, one use case called, errors mapped to retry or no retry."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from enum import StrEnum

from celery import Celery, Task
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from dispatcher import recovery as outbox
from dispatcher.campaigns import chunks as campaign_delivery
from dispatcher.campaigns import service as campaigns
from dispatcher.credits import refunds, subscriptions
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery import system_mail
from dispatcher.errors import NotFound, SendBusy, TransientError
from dispatcher.runtime import Runtime
from workers.app import (
    RENEW_DUE_TASK,
    SEND_CAMPAIGN_CHUNK_TASK,
    SEND_SMARTPLAN_TASK,
    SEND_SYSTEM_EMAIL_TASK,
    SWEEP_OUTBOX_TASK,
    runtime_of,
)

log = logging.getLogger(__name__)

Deliver = Callable[..., StrEnum]  # a use case returning the item's status
Park = Callable[[Runtime, str, float], None]  # store a long wait for the beat sweep


def _park_chunk(rt: Runtime, item: str, seconds: float) -> None:
    outbox.park_campaign(rt, item.rpartition(":")[0], seconds)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with full jitter, in seconds."""
    return random.uniform(base / 2, min(cap, base * (2**attempt)))


def _deliver(
    task: Task,
    deliver: Deliver,
    item_id: str,
    *,
    park: Park | None = None,
) -> str:
    """Run one delivery use case; retry what may succeed later, never what cannot.

    Sends, system emails, campaign recipients and MailChimp jobs count their own attempts
    against ``SEND_MAX_RETRIES`` in SQL (a wait for a lease or for Redis must not use that
    budget up); the task's retries only pace the backoff.
    """
    rt: Runtime = runtime_of(task.app)
    settings = rt.settings
    retries: int = task.request.retries
    try:
        return deliver(rt, item_id).value
    except NotFound as exc:
        # Nothing to deliver (the row is gone): retrying cannot help.
        log.error("%s dropped: %s", task.name, exc)
        return "missing"
    except SendBusy as exc:
        # Another delivery holds the lease; look again when it has run out.
        raise task.retry(countdown=exc.retry_after, max_retries=None) from None
    except (RedisError, SQLAlchemyError, OSError) as exc:
        # Redis or the database is unreachable: nothing was decided, so try again until it is
        # back (every step is idempotent; a send caught mid-conversation is settled by its lease).
        countdown = backoff(
            retries, settings.retry_backoff_seconds, settings.retry_backoff_max_seconds
        )
        log.warning(
            "%s %s: infrastructure error, retry in %.1fs: %s: %s",
            task.name,
            item_id,
            countdown,
            type(exc).__name__,
            exc,
        )
        raise task.retry(countdown=countdown, max_retries=None) from None
    except TransientError as exc:
        countdown = backoff(
            retries, settings.retry_backoff_seconds, settings.retry_backoff_max_seconds
        )
        # A server that said when to come back (MailChimp's Retry-After) is not asked sooner.
        asked = getattr(exc, "retry_after", None)
        if isinstance(asked, int | float):
            if asked > settings.retry_backoff_max_seconds and park is not None:
                # Longer than any countdown may be (the broker would redeliver it): store the
                # wait in SQL; the beat sweep enqueues the item when it is due.
                park(rt, item_id, asked)
                log.info("%s %s parked for %.0fs: %s", task.name, item_id, asked, exc)
                return "parked"
            countdown = min(max(countdown, asked), settings.retry_backoff_max_seconds)
        log.info("%s %s retry %d in %.1fs: %s", task.name, item_id, retries + 1, countdown, exc)
        raise task.retry(countdown=countdown, max_retries=None) from None
    except Exception as exc:
        # Anything unforeseen (a bug, the soft time limit): retry rather than ack and strand
        # the item; leases and compare-and-set statuses make the retry safe.
        countdown = backoff(
            retries, settings.retry_backoff_seconds, settings.retry_backoff_max_seconds
        )
        log.exception("%s %s failed unexpectedly; retry in %.1fs", task.name, item_id, countdown)
        raise task.retry(countdown=countdown, exc=exc, max_retries=None) from None


def register(app: Celery) -> None:
    """Define the dispatcher's tasks on ``app``."""
    max_retries = runtime_of(app).settings.send_max_retries
    task = app.task  # shared=False: each app keeps its own tasks (tests build several apps)

    @task(
        name=SEND_SMARTPLAN_TASK,
        bind=True,
        shared=False,  # type: ignore[untyped-decorator]
        max_retries=max_retries,
    )
    def send_smartplan(self: Task, send_id: str) -> str:
        return _deliver(self, delivery.deliver, send_id, park=outbox.park_send)

    @task(
        name=SEND_SYSTEM_EMAIL_TASK,
        bind=True,
        shared=False,  # type: ignore[untyped-decorator]
        max_retries=max_retries,
    )
    def send_system_email(self: Task, email_id: str) -> str:
        return _deliver(self, system_mail.deliver, email_id)

    @task(  # type: ignore[untyped-decorator]
        name=SEND_CAMPAIGN_CHUNK_TASK, bind=True, shared=False, max_retries=max_retries
    )
    def send_campaign_chunk(self: Task, item: str) -> str:
        return _deliver(self, campaign_delivery.deliver_chunk, item, park=_park_chunk)

    @task(name=RENEW_DUE_TASK, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def renew_due(self: Task) -> int:
        return subscriptions.renew_due(runtime_of(self.app))

    @task(name=SWEEP_OUTBOX_TASK, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def sweep_outbox(self: Task) -> list[int]:
        rt = runtime_of(self.app)
        return [
            *outbox.sweep(rt),
            outbox.expire_reservations(rt),  # before recover_stale: see its docstring
            *outbox.recover_stale(rt),
            outbox.republish_outcomes(rt),
            campaigns.expire_reserving(rt),
            refunds.retry_due(rt),
        ]

    del (
        send_smartplan,
        send_system_email,
        send_campaign_chunk,
        renew_due,
        sweep_outbox,
    )  # kept by the app
