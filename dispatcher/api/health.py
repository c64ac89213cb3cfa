"""What operators' probes and Prometheus read: /healthz and /metrics (no bearer token)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from dispatcher.api.deps import RuntimeDep
from dispatcher.models import Send, SendKind

router = APIRouter()


@router.get("/healthz", responses={503: {"description": "Redis or the database is down."}})
def healthz(rt: RuntimeDep) -> JSONResponse:
    """Redis (quota store and broker) and the database are reachable."""
    checks: dict[str, str] = {}
    try:
        rt.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        with rt.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "degraded", **checks}, status_code=200 if ok else 503
    )


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(rt: RuntimeDep) -> str:
    """Prometheus text: sends by status (imported usage left out) and the step-outcome stream
    length."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.status, func.count())
            .where(Send.kind != SendKind.IMPORTED)
            .group_by(Send.status)
        ).all()
    lines = [
        "# HELP dispatcher_sends Sends by status (imported usage, such as demo seeds, left out).",
        "# TYPE dispatcher_sends gauge",
        *(f'dispatcher_sends{{status="{s.value}"}} {n}' for s, n in rows),
        "# HELP dispatcher_outcome_stream_length Entries on the step-outcome stream.",
        "# TYPE dispatcher_outcome_stream_length gauge",
        f"dispatcher_outcome_stream_length {rt.redis.xlen(rt.settings.outcome_stream)}",
    ]
    return "\n".join(lines) + "\n"
