"""Connect a Python producer to the Celery broker."""

from __future__ import annotations

from dispatcher.producer import Producer
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from workers.app import create_app
from workers.queue import CeleryTaskQueue


def connect(settings: Settings | None = None) -> Producer:
    """A :class:`Producer` whose sends are enqueued for the workers (settings from the env)."""
    runtime = Runtime(settings or Settings.from_env())
    return Producer(runtime, CeleryTaskQueue(create_app(runtime.settings, runtime)))
