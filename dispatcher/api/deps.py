"""Dependencies: the runtime, task queue and producer a route's app was built with, and the text
policy applied to path and query values.

They are ``async`` although none of them waits: FastAPI runs a plain ``def`` dependency in its
thread pool, a hand-off that cost an accepted send more than the dependency itself."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request

from dispatcher import validation
from dispatcher.ports import BrokerView, TaskQueue
from dispatcher.producer import Producer
from dispatcher.runtime import Runtime


def attach(app: FastAPI, rt: Runtime, queue: TaskQueue, broker: BrokerView | None) -> None:
    """Keep ``rt``, ``queue``, ``broker`` and a producer over the first two on ``app.state``
    for the dependencies."""
    app.state.runtime = rt
    app.state.queue = queue
    app.state.broker = broker
    app.state.producer = Producer(rt, queue)


async def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def _queue(request: Request) -> TaskQueue:
    queue: TaskQueue = request.app.state.queue
    return queue


async def _broker(request: Request) -> BrokerView | None:
    broker: BrokerView | None = request.app.state.broker
    return broker


async def _producer(request: Request) -> Producer:
    producer: Producer = request.app.state.producer
    return producer


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
QueueDep = Annotated[TaskQueue, Depends(_queue)]
#: The broker's queues as ops read them; None where the API was built without a broker.
BrokerDep = Annotated[BrokerView | None, Depends(_broker)]
ProducerDep = Annotated[Producer, Depends(_producer)]


async def plain_parameters(request: Request) -> None:
    """Path and query values follow the one-line text policy (no control characters, no lone
    surrogates), so a lookup never hands the database what it cannot compare."""
    validation.plain_parameters([*request.path_params.items(), *request.query_params.multi_items()])


#: Route dependency: the text policy on path and query values (after auth, so 401 comes first).
PLAIN_PARAMETERS = Depends(plain_parameters)
