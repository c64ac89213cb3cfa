"""Dependencies that hand a route the runtime, task queue and producer its app was built with."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request

from dispatcher.ports import TaskQueue
from dispatcher.producer import Producer
from dispatcher.runtime import Runtime


def attach(app: FastAPI, rt: Runtime, queue: TaskQueue) -> None:
    """Keep ``rt``, ``queue`` and a producer over both on ``app.state`` for the dependencies."""
    app.state.runtime = rt
    app.state.queue = queue
    app.state.producer = Producer(rt, queue)


def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def _queue(request: Request) -> TaskQueue:
    queue: TaskQueue = request.app.state.queue
    return queue


def _producer(request: Request) -> Producer:
    producer: Producer = request.app.state.producer
    return producer


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
QueueDep = Annotated[TaskQueue, Depends(_queue)]
ProducerDep = Annotated[Producer, Depends(_producer)]
