"""The HTTP API's composition root: the core's API wired to the Celery queue.

``uvicorn --factory workers.web:create_app`` serves it; the core (``dispatcher``) never imports
Celery, so this is where the two meet.
"""

from __future__ import annotations

from fastapi import FastAPI

from dispatcher import logs
from dispatcher.api.app import create_api
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from workers.app import create_app as create_celery
from workers.app import wait_for_schema
from workers.queue import CeleryTaskQueue


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; started without ``settings`` (the ``web`` process), it reads the environment
    and waits until the database is migrated."""
    if settings is None:
        settings = Settings.from_env()
        logs.configure(settings.log_level)
        wait_for_schema(settings)
    runtime = Runtime(settings)
    queue = CeleryTaskQueue(create_celery(settings, runtime))
    return create_api(runtime, queue, broker=queue)
