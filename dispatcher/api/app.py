"""HTTP API under /v1: producers submit sends and manage users; ops read health and metrics."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from dispatcher import __version__
from dispatcher.api import campaigns, health, ops, problems, recipients, sends, users, webhooks
from dispatcher.api.access import AccessLog
from dispatcher.api.bodylimit import BodySizeLimit
from dispatcher.api.deps import attach
from dispatcher.api.openapi import document
from dispatcher.api.problems import answers
from dispatcher.ports import BrokerView, TaskQueue
from dispatcher.runtime import Runtime
from dispatcher.web import site

#: In the order their routes are matched and listed in the OpenAPI document.
ROUTERS = (
    sends.router,
    users.router,
    campaigns.router,
    ops.router,
    recipients.router,
    webhooks.router,
    health.router,
)

#: Where /docs and /redoc load Swagger UI's and ReDoc's files from: this server, not a CDN.
DOCS_ASSETS = "/docs/assets"


def create_api(rt: Runtime, queue: TaskQueue, broker: BrokerView | None = None) -> FastAPI:
    """The FastAPI application over ``rt``; sends are handed to ``queue`` after they commit.
    ``broker`` is what /healthz and /metrics read of the broker's queues."""
    app = FastAPIOffline(
        title="Command Email dispatcher",
        version=__version__,
        description=(
            "Credits-aware email sending for SmartPlan steps and campaigns. Every error answer "
            "is a Problem `{code, detail, field}` (invalid input also lists every bad field in "
            "`errors`); a request body larger than `MAX_REQUEST_BYTES` (64 KiB without a "
            "token) is refused with 413 before it is read."
        ),
        responses=answers(413, 500, 503),
        static_url=DOCS_ASSETS,
    )
    attach(app, rt, queue, broker)
    for router in ROUTERS:
        app.include_router(router)
    problems.install(app)
    site.install(app, rt.settings)
    app.add_middleware(AccessLog)
    # Outermost: the size cap runs before auth and before any byte of the body is read.
    app.add_middleware(BodySizeLimit, settings=rt.settings)
    document(app, bodies=campaigns.BODIES)
    return app
