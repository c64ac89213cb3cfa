"""What operators' probes and Prometheus read: /healthz and /metrics (no bearer token)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text

from dispatcher import metrics
from dispatcher.api.deps import BrokerDep, RuntimeDep
from dispatcher.errors import QueueUnavailable
from dispatcher.monitoring import SnapshotCollector
from dispatcher.redisclient import ping

router = APIRouter()


@router.get(
    "/healthz", responses={503: {"description": "Redis, the database or the broker is down."}}
)
def healthz(rt: RuntimeDep, broker: BrokerDep) -> JSONResponse:
    """Redis (the credit counters), the database and the broker are reachable."""
    checks: dict[str, str] = {}
    try:
        if not ping(rt.redis):
            raise ConnectionError("no PONG")
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        with rt.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"error: {type(exc).__name__}"
    if broker is not None:
        try:
            broker.queues()
            checks["broker"] = "ok"
        except QueueUnavailable as exc:
            checks["broker"] = f"error: {exc.detail.partition(':')[0]}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "degraded", **checks}, status_code=200 if ok else 503
    )


@router.get("/metrics", response_class=Response)
def metrics_text(rt: RuntimeDep, broker: BrokerDep) -> Response:
    """Prometheus text: the counters and histograms of every process of this host that shares
    ``PROMETHEUS_MULTIPROC_DIR`` (of this process alone without it), and the gauges of the
    queues, the work in flight and the relay, read now (see the README's Metrics section)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(rt, broker))
    body = metrics.exposition() + generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
