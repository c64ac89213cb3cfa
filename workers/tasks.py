"""Thin tasks: ids in, one use case called, and the one place exceptions become retry or not.

The error tree is the retry contract (``dispatcher.errors``):

- :class:`~dispatcher.errors.NotFound`: nothing to deliver; dropped.
- :class:`~dispatcher.errors.PermanentError` escaping a use case: never retried; the item is
  settled at once with the error's reason.
- :class:`~dispatcher.errors.SendBusy`: another delivery holds the lease; looked at again when
  the lease runs out.
- :class:`~dispatcher.errors.Yielded`: the item stopped at a safe point (its time is up, or
  this worker is stopping); enqueued again at once, for whichever worker is free.
- :class:`~dispatcher.errors.TransientError`: retried with capped exponential backoff and
  jitter, never sooner than its ``retry_after``; a wait longer than any countdown is parked
  in SQL for the beat's sweep.
- Redis, the database or the network unreachable: nothing was decided, so retried until back.
- Anything else is unforeseen: retried up to ``SEND_MAX_RETRIES`` times, then the item is
  settled as ``internal_error`` (credit back, timeline event, step outcome, alert): a poison
  message never loops.

A retry the broker does not take (it is down, or lost its data) is never dropped: its wait is
parked in SQL, and the beat's sweep enqueues the item once it is due (within a minute of it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from dispatcher import metrics, recovery
from dispatcher.backoff import backoff, honouring
from dispatcher.campaigns import compact, control, run, schedule
from dispatcher.credits import refunds, subscriptions
from dispatcher.delivery import events_webhook, smartplan, smartplan_batch, system_mail
from dispatcher.delivery.priority import Behind
from dispatcher.errors import (
    NotFound,
    PermanentError,
    QueueUnavailable,
    SendBusy,
    TransientError,
    Yielded,
)
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from workers.names import (
    PUBLISHED_AT,
    PUSH_EVENTS_TASK,
    RENEW_DUE_TASK,
    SEND_CAMPAIGN_CHUNK_TASK,
    SEND_SMARTPLAN_BATCH_TASK,
    SEND_SMARTPLAN_TASK,
    SEND_SYSTEM_EMAIL_TASK,
    START_SCHEDULED_TASK,
    SWEEP_OUTBOX_TASK,
)
from workers.queue import CeleryTaskQueue

log = logging.getLogger(__name__)

Deliver = Callable[[Runtime, str], StrEnum]  # a use case returning the item's status
GiveUp = Callable[[Runtime, str, str, str], StrEnum]  # settle an item that cannot go on
Park = Callable[[Runtime, str, float], None]  # store a long wait for the beat sweep

#: Errors of our own infrastructure: nothing was decided, every step is idempotent.
INFRASTRUCTURE = (RedisError, SQLAlchemyError, OSError)


def _park_chunk(rt: Runtime, item: str, seconds: float) -> None:
    recovery.park_campaign(rt, run.parse(item)[0], seconds)


def _observe_wait(task: Task, items: int = 1, behind: Behind | None = None) -> None:
    """How long a task's first delivery waited in its queue (a retry waits on purpose), once
    for each of the ``items`` it carries; ``behind`` (SmartPlan tasks) is told too, so that
    campaigns yield while SmartPlan steps wait (:mod:`dispatcher.delivery.priority`)."""
    published = getattr(task.request, PUBLISHED_AT, None)
    if published is not None and not task.request.retries:
        queue = (task.request.delivery_info or {}).get("routing_key") or "unknown"
        waited = max(0.0, time.time() - float(published))
        histogram = metrics.QUEUE_WAIT.labels(queue)
        for _ in range(items):
            histogram.observe(waited)
        if behind is not None:
            behind.waited(waited)


def _retry(
    task: Task, rt: Runtime, park: Park, item_id: str, countdown: float, **options: Any
) -> str:
    """Have the broker deliver the task again in ``countdown`` seconds (raises Celery's
    ``Retry``). Should the broker not take the retry, Celery would drop the message: the wait
    is parked in SQL instead, for the beat's sweep to enqueue the item when it is due.

    On RabbitMQ the wait is whole seconds, at least one: quorum queues cannot hold a task back
    in the worker, so the broker's delayed delivery holds it, and it counts in seconds."""
    if not rt.settings.broker_is_redis:
        countdown = max(1.0, _whole_seconds(rt.settings, countdown))
    try:
        raise task.retry(countdown=countdown, max_retries=None, **options)
    except Reject as exc:
        park(rt, item_id, countdown)
        log.warning(
            "%s %s: the broker did not take its retry (%s); parked for the sweep in %.1fs",
            *(task.name, item_id, exc.reason, countdown),
        )
        return "parked"


def _whole_seconds(s: Settings, countdown: float) -> float:
    """A countdown as the broker takes it: RabbitMQ's delayed delivery counts whole seconds."""
    return countdown if s.broker_is_redis else float(math.ceil(countdown))


def _deliver(
    task: Task,
    rt: Runtime,
    deliver: Deliver,
    give_up: GiveUp,
    item_id: str,
    failures: int,
    *,
    park: Park,
    behind: Behind | None = None,
) -> str:
    """Run one delivery use case and map what it raises to retry or not (see the module).

    Sends, system emails, campaign recipients and MailChimp jobs count their own SMTP or API
    attempts in SQL; ``failures`` counts this item's unforeseen errors only.
    """
    s = rt.settings
    _observe_wait(task, behind=behind)
    countdown = backoff(task.request.retries, s.retry_backoff_seconds, s.retry_backoff_max_seconds)
    try:
        return deliver(rt, item_id).value
    except NotFound as exc:
        log.error("%s dropped: %s", task.name, exc)
        return "missing"
    except PermanentError as exc:
        log.warning("%s %s failed for good: %s", task.name, item_id, exc)
        return _settle(task, rt, give_up, park, item_id, exc.reason, str(exc), failures)
    except SendBusy as exc:
        # Another delivery holds the lease; look again when it has run out.
        return _retry(task, rt, park, item_id, exc.retry_after or countdown)
    except Yielded as exc:
        # Nothing failed: what is left goes on now, on another worker if this one is stopping.
        log.info("%s %s handed back: %s", task.name, item_id, exc.detail)
        return _retry(task, rt, park, item_id, 0.0)
    except TransientError as exc:
        wait = honouring(countdown, exc.retry_after, s.retry_backoff_max_seconds)
        if wait > s.retry_backoff_max_seconds:
            # Longer than any countdown may be (the broker would redeliver it): store the wait
            # in SQL; the beat sweep enqueues the item when it is due.
            park(rt, item_id, wait)
            log.info("%s %s parked for %.0fs: %s", task.name, item_id, wait, exc)
            return "parked"
        log.info("%s %s retry in %.1fs: %s", task.name, item_id, wait, exc)
        return _retry(task, rt, park, item_id, wait)
    except INFRASTRUCTURE as exc:
        log.warning(
            "%s %s: infrastructure error, retry in %.1fs: %s: %s",
            *(task.name, item_id, countdown, type(exc).__name__, exc),
        )
        return _retry(task, rt, park, item_id, countdown)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        if failures >= s.send_max_retries:
            log.exception(
                "%s %s failed unexpectedly %d times; giving up", task.name, item_id, failures + 1
            )
            return _settle(
                task, rt, give_up, park, item_id, Reason.INTERNAL_ERROR, detail, failures
            )
        log.exception("%s %s failed unexpectedly; retry in %.1fs", task.name, item_id, countdown)
        # Parked instead (the broker did not take it), the item starts a fresh budget.
        return _retry(
            task, rt, park, item_id, countdown, kwargs={"failures": failures + 1}, exc=exc
        )


def _settle(
    task: Task,
    rt: Runtime,
    give_up: GiveUp,
    park: Park,
    item_id: str,
    reason: str,
    detail: str,
    failures: int,
) -> str:
    """Settle an item that cannot go on; should our infrastructure fail meanwhile, try again."""
    try:
        return give_up(rt, item_id, reason, detail).value
    except INFRASTRUCTURE as exc:
        log.warning("%s %s: could not settle yet: %s", task.name, item_id, exc)
        countdown = rt.settings.retry_backoff_seconds
        return _retry(task, rt, park, item_id, countdown, kwargs={"failures": failures})


def _deliver_batch(
    task: Task,
    rt: Runtime,
    queue: CeleryTaskQueue,
    send_ids: list[str],
    together: smartplan_batch.Coalescer | None,
) -> str:
    """Deliver SmartPlan steps submitted together; each send that cannot go on in the batch
    is published as its own task with the wait it needs (its retries are the single send's).

    Our infrastructure failing retries the whole batch (every step is idempotent; a rerun hands
    on what already moved). An unforeseen error hands every send on as its own task, each with
    its own budget of unforeseen errors: a poison batch never loops."""
    s = rt.settings
    _observe_wait(task, len(send_ids), rt.behind)
    metrics.SMARTPLAN_BATCH_STEPS.labels("submitted").observe(len(send_ids))
    try:
        if together is None or task.request.retries:
            back = smartplan_batch.deliver_batch(rt, send_ids).handed_back
        else:
            back = together.deliver_many(rt, send_ids).handed_back
    except INFRASTRUCTURE as exc:
        countdown = backoff(
            task.request.retries, s.retry_backoff_seconds, s.retry_backoff_max_seconds
        )
        log.warning(
            "%s of %d: infrastructure error, retry in %.1fs: %s: %s",
            *(task.name, len(send_ids), countdown, type(exc).__name__, exc),
        )
        return _retry(task, rt, _park_sends, ",".join(send_ids), countdown)
    except Exception:
        log.exception(
            "%s of %d failed unexpectedly; each send goes on its own", task.name, len(send_ids)
        )
        back = [(send_id, 0.0) for send_id in send_ids]
    # As a single send's retry: a wait longer than any countdown is parked for the sweep.
    parked = [(i, c) for i, c in back if c > s.retry_backoff_max_seconds]
    now = [(i, c) for i, c in back if c <= s.retry_backoff_max_seconds]
    now = [(i, _whole_seconds(s, c)) for i, c in now]
    try:
        queue.publish_sends(now)
    except QueueUnavailable as exc:
        log.warning("%s: %d sends parked for the sweep: %s", task.name, len(now), exc)
        parked += [(i, max(c, 1.0)) for i, c in now]
    for send_id, wait in parked:
        recovery.park_send(rt, send_id, wait)
    return f"{len(send_ids) - len(back)} settled, {len(back)} handed on"


def _park_sends(rt: Runtime, item: str, seconds: float) -> None:
    for send_id in item.split(","):
        recovery.park_send(rt, send_id, seconds)


def register(app: Celery, rt: Runtime) -> None:
    """Define the dispatcher's tasks on ``app``, running use cases against ``rt``."""
    task = app.task  # shared=False: each app keeps its own tasks (tests build several apps)

    # Steps this worker's threads deliver at the same moment go as one batch, single steps
    # and small batch tasks alike; a retry (or a step whose delivery failed unexpectedly)
    # goes alone. Batch size 1: always alone.
    size = int(app.conf.get("smartplan_batch_size") or 1)
    together = smartplan_batch.Coalescer(size) if size > 1 else None

    @task(name=SEND_SMARTPLAN_TASK, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def send_smartplan(self: Task, send_id: str, failures: int = 0) -> str:
        return _deliver(
            self,
            rt,
            smartplan.deliver
            if together is None or self.request.retries or failures
            else together.deliver,
            smartplan.give_up,
            send_id,
            failures,
            park=recovery.park_send,
            behind=rt.behind,
        )

    handing = CeleryTaskQueue(app)

    @task(name=SEND_SMARTPLAN_BATCH_TASK, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def send_smartplan_batch(self: Task, send_ids: list[str]) -> str:
        return _deliver_batch(self, rt, handing, send_ids, together)

    @task(name=SEND_SYSTEM_EMAIL_TASK, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def send_system_email(self: Task, email_id: str, failures: int = 0) -> str:
        return _deliver(
            self,
            rt,
            system_mail.deliver,
            system_mail.give_up,
            email_id,
            failures,
            park=recovery.park_system_email,
        )

    @task(name=SEND_CAMPAIGN_CHUNK_TASK, bind=True, shared=False)  # type: ignore[untyped-decorator]
    def send_campaign_chunk(self: Task, item: str, failures: int = 0) -> str:
        return _deliver(self, rt, run.deliver, run.give_up, item, failures, park=_park_chunk)

    @task(name=RENEW_DUE_TASK, shared=False)  # type: ignore[untyped-decorator]
    def renew_due() -> int:
        return subscriptions.renew_due(rt)

    @task(name=START_SCHEDULED_TASK, shared=False)  # type: ignore[untyped-decorator]
    def start_scheduled() -> int:
        return schedule.start_due(rt)

    @task(name=SWEEP_OUTBOX_TASK, shared=False)  # type: ignore[untyped-decorator]
    def sweep_outbox() -> list[int]:
        return [
            *recovery.sweep(rt),
            recovery.expire_reservations(rt),  # before recover_stale: see its docstring
            *recovery.recover_lost(rt),
            *recovery.recover_stale(rt),
            recovery.republish_outcomes(rt),
            control.expire_reserving(rt),
            compact.sweep(rt),
            refunds.retry_due(rt),
        ]

    @task(name=PUSH_EVENTS_TASK, shared=False)  # type: ignore[untyped-decorator]
    def push_events() -> str:
        pushed = events_webhook.push(rt)
        return f"{pushed.stopped}: {pushed.delivered} events in {pushed.posts} posts"

    del (
        push_events,
        send_smartplan,
        send_smartplan_batch,
        send_system_email,
        send_campaign_chunk,
        renew_due,
        start_scheduled,
        sweep_outbox,
    )  # kept by the app
