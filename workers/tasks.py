"""Thin tasks: ids in, one use case called, errors mapped to retry or no retry."""

from __future__ import annotations

import logging
import random

from celery import Celery, Task

from dispatcher import delivery
from dispatcher.errors import NotFound, SendBusy, TransientError
from workers.app import SEND_SMARTPLAN_TASK, runtime_of

log = logging.getLogger(__name__)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with full jitter, in seconds."""
    return random.uniform(base / 2, min(cap, base * (2**attempt)))


def register(app: Celery) -> None:
    """Define the dispatcher's tasks on ``app``."""
    settings = runtime_of(app).settings

    @app.task(  # type: ignore[untyped-decorator]
        name=SEND_SMARTPLAN_TASK,
        bind=True,
        shared=False,
        max_retries=settings.send_max_retries,
    )
    def send_smartplan(self: Task, send_id: str) -> str:
        rt = runtime_of(self.app)
        retries: int = self.request.retries
        final = retries >= settings.send_max_retries
        try:
            return delivery.deliver(rt, send_id, final_attempt=final).value
        except NotFound as exc:
            # Nothing to deliver (the row is gone): retrying cannot help.
            log.error("send task dropped: %s", exc)
            return "missing"
        except SendBusy as exc:
            # Another delivery holds the lease; look again when it has run out.
            raise self.retry(countdown=exc.retry_after, max_retries=None) from None
        except TransientError as exc:
            countdown = backoff(
                retries, settings.retry_backoff_seconds, settings.retry_backoff_max_seconds
            )
            log.info("send %s retry %d in %.1fs: %s", send_id, retries + 1, countdown, exc)
            raise self.retry(countdown=countdown) from None

    del send_smartplan  # registered on the app by the decorator
