"""The Celery app, built from settings: at-least-once delivery, no duplicates, JSON only.

``celery -A workers.app worker -Q smartplan`` finds ``app`` here; it is built on first access
from the environment, so importing this module connects to nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_shutdown
from kombu.entity import Exchange, Queue
from prometheus_client import start_http_server

from dispatcher import db, logs, metrics
from dispatcher.errors import ConfigError, SchemaNotReady
from dispatcher.ports import OutboxOnly
from dispatcher.redisclient import is_cluster
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from workers import shutdown, tasks
from workers.names import (
    CAMPAIGN,
    PUSH_EVENTS_TASK,
    QUEUES,
    RENEW_DUE_TASK,
    SEND_CAMPAIGN_CHUNK_TASK,
    SEND_SMARTPLAN_BATCH_TASK,
    SEND_SMARTPLAN_TASK,
    SEND_SYSTEM_EMAIL_TASK,
    SMARTPLAN,
    START_SCHEDULED_TASK,
    SWEEP_OUTBOX_TASK,
    SYSTEM,
)
from workers.queue import CeleryTaskQueue

log = logging.getLogger(__name__)


def _beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The periodic tasks: renewals, the outbox sweep, scheduled campaigns' starts, and (with
    a webhook set) the events push, each push dropped when the next is due (a slow receiver
    never piles them up)."""
    schedule: dict[str, dict[str, Any]] = {
        "renew-due": {"task": RENEW_DUE_TASK, "schedule": settings.renewal_sweep_seconds},
        "sweep-outbox": {"task": SWEEP_OUTBOX_TASK, "schedule": 60.0},
        # Often enough that a scheduled campaign starts within a minute of its time.
        "start-scheduled": {
            "task": START_SCHEDULED_TASK,
            "schedule": float(settings.schedule_sweep_seconds),
        },
    }
    if settings.events_webhook_url is not None:
        schedule["push-events"] = {
            "task": PUSH_EVENTS_TASK,
            "schedule": settings.events_push_seconds,
            "options": {"expires": settings.events_push_seconds},
        }
    return schedule


def create_app(settings: Settings, runtime: Runtime | None = None) -> Celery:
    """A Celery app for ``settings``; ``runtime`` lets tests share collaborators with it."""
    if is_cluster(settings.broker):
        # kombu's Redis transport speaks to one server (its queues, unacked index and mutex
        # are keys in different slots): a cluster can hold the counters, never the broker.
        raise ConfigError(
            "BROKER_URL",
            "must be set when REDIS_URL is a Redis Cluster: the cluster can hold the credit "
            "counters but not the Celery broker (kombu cannot use one)",
        )
    app = Celery("dispatcher", set_as_current=False)
    app.conf.update(_configuration(settings))
    rt = runtime or Runtime(settings)
    if isinstance(rt.queue, OutboxOnly):
        # Follow-up work of the use cases (notices, receipts) goes to this app's broker.
        rt.queue = CeleryTaskQueue(app)
    tasks.register(app, rt)
    shutdown.install(app, rt)  # SIGTERM: long work hands back at its next safe point
    _on_worker_start_and_stop(app, rt, settings.metrics_port)
    return app


def _configuration(settings: Settings) -> dict[str, Any]:
    """The app's Celery settings: at-least-once delivery, JSON only, no result backend."""
    return dict(
        broker_url=settings.broker,
        broker_connection_retry_on_startup=True,
        # At least once: ack after the task ran, requeue if the worker process dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=_transport_options(settings),
        task_time_limit=settings.task_time_limit,
        # After a campaign chunk's own deadline (half the limit), so a chunk yields between
        # messages first: a soft limit raised mid-batch leaves its messages in DATA unknown.
        task_soft_time_limit=max(settings.task_time_limit - 30, settings.task_time_limit * 3 // 4),
        # Outcomes live in SQL and on the step-outcome stream, never in a result backend.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_queues=_queues(settings),
        task_default_queue=SMARTPLAN,
        task_routes={
            SEND_SMARTPLAN_TASK: {"queue": SMARTPLAN},
            SEND_SMARTPLAN_BATCH_TASK: {"queue": SMARTPLAN},
            SEND_SYSTEM_EMAIL_TASK: {"queue": SYSTEM},
            SEND_CAMPAIGN_CHUNK_TASK: {"queue": CAMPAIGN},
            RENEW_DUE_TASK: {"queue": SYSTEM},
            SWEEP_OUTBOX_TASK: {"queue": SYSTEM},
            PUSH_EVENTS_TASK: {"queue": SYSTEM},
            START_SCHEDULED_TASK: {"queue": SYSTEM},
        },
        # Exactly one beat process schedules these (Procfile `beat`).
        beat_schedule=_beat_schedule(settings),
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        # Task events (received, started, succeeded, ...) for Flower and `celery events`, from
        # the workers only: a "task-sent" event from the publisher doubled the broker messages
        # of every send the API accepts (about 1.7 ms of its 10 ms), and Flower learns of each
        # task from "task-received" anyway.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=False,
        task_track_started=False,
        broker_pool_limit=10,
        # Not Celery's: how many SmartPlan steps submitted together go to one task
        # (CeleryTaskQueue.enqueue_sends).
        smartplan_batch_size=settings.smartplan_batch_size,
    )


def _on_worker_start_and_stop(app: Celery, rt: Runtime, port: int | None) -> None:
    """A worker of ``app`` serves its metrics on ``port`` when it starts (``METRICS_PORT``)
    and closes ``rt`` when it stops."""

    def serve_metrics(sender: Any, **_: Any) -> None:
        # In the worker's main process, before a prefork pool forks: the children write to
        # PROMETHEUS_MULTIPROC_DIR, which this server reads.
        if getattr(sender, "app", None) is not app or port is None:
            return
        try:
            start_http_server(port, registry=metrics.registry())
        except OSError as exc:
            # Sending matters more than its metrics: the worker goes on, and says so.
            log.error("metrics not served: port %d: %s", port, exc)
            return
        log.info("metrics served on port %d", port)

    def close(sender: Any, **_: Any) -> None:
        # After the last task: QUIT the SMTP connections this process kept, stop its event
        # loop, release the database and Redis pools.
        if getattr(sender, "app", None) is app:
            rt.close()

    worker_init.connect(serve_metrics, weak=False)
    worker_shutdown.connect(close, weak=False)


def wait_for_schema(settings: Settings) -> None:
    """Return once the database is migrated to the code's revision; a process started beside
    a release still migrating (``honcho start``) waits ``SCHEMA_WAIT_SECONDS``, saying so,
    then exits 1 with one line saying what to run."""
    # An engine of its own, disposed before any fork: a prefork pool's children must not
    # inherit its connections.
    engine = db.make_engine(settings.database_url)
    try:
        db.wait_until_migrated(engine, settings.schema_wait_seconds)
    except SchemaNotReady as exc:
        log.error("not starting: %s", exc)
        raise SystemExit(1) from None
    finally:
        engine.dispose()


def connect_broker(rt: Runtime) -> None:
    """Have ``rt`` enqueue its follow-up work (receipts, notices) on the broker at once, as a
    worker's does, instead of leaving it to beat's outbox sweep (the ``dispatcher`` command)."""
    create_app(rt.settings, rt)


def _transport_options(settings: Settings) -> dict[str, Any]:
    """The broker transport's options: how an unacknowledged message comes back."""
    if settings.broker_is_redis:
        return {
            # A task's message becomes visible again only after every time limit has passed.
            "visibility_timeout": settings.visibility_timeout,
            # Workers look for the messages of dead workers every interval x throttle seconds
            # (10 x 10 by default): without these a task comes back some 100 s after its
            # worker died, however short the visibility timeout.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
        }
    # RabbitMQ gives a message back as soon as its consumer's connection closes; a publish
    # returns once the broker has confirmed it, so an accepted send is in the queue.
    return {"confirm_publish": True}


def _queues(settings: Settings) -> list[Queue]:
    """One queue per pool. On RabbitMQ they are quorum queues (replicated, durable), each
    behind a topic exchange of its name, which Celery's native delayed delivery needs for
    retries with a countdown (quorum queues cannot hold a task back in the worker)."""
    if settings.broker_is_redis:
        return [Queue(name) for name in QUEUES]  # type: ignore[no-untyped-call]
    return [
        Queue(  # type: ignore[no-untyped-call]
            name,
            Exchange(name, type="topic"),  # type: ignore[no-untyped-call]
            routing_key=name,
            queue_arguments={"x-queue-type": "quorum"},
        )
        for name in QUEUES
    ]


_default: Celery | None = None


def __getattr__(name: str) -> Any:
    # `celery -A workers.app` reads `app`: build it from the environment on first access,
    # once the database is migrated (a worker or beat process is starting).
    global _default
    if name == "app":
        if _default is None:
            try:
                settings = Settings.from_env()
                logs.configure(settings.log_level)
                wait_for_schema(settings)
                _default = create_app(settings)
            except ConfigError as exc:
                # One line naming the variable, not a traceback, and the process stops.
                raise SystemExit(f"dispatcher: {exc}") from None
        return _default
    raise AttributeError(name)
