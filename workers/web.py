"""The HTTP API's composition root: the core's API wired to the Celery queue.

``uvicorn --factory workers.web:create_app`` serves it; the core (``dispatcher``) never imports
Celery, so this is where the two meet.
"""

from __future__ import annotations

from fastapi import FastAPI

from dispatcher.api.app import create_api
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from workers.app import create_app as create_celery
from workers.queue import CeleryTaskQueue


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    runtime = Runtime(settings)
    queue = CeleryTaskQueue(create_celery(settings, runtime))
    return create_api(runtime, queue, broker=queue)
