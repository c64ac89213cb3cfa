"""The Grafana dashboard and the Prometheus alert rules name only metrics /metrics exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient

from dispatcher.api.app import create_api
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from workers.app import create_app
from workers.queue import CeleryTaskQueue

OPS = Path(__file__).resolve().parent.parent / "docs" / "ops"
NAME = re.compile(r"\b(dispatcher_[a-z_]+)")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported(runtime: Runtime) -> set[str]:
    """Every metric family /metrics describes (with a broker, so the queue gauges are there)."""
    queue = CeleryTaskQueue(create_app(runtime.settings, runtime))
    text = TestClient(create_api(runtime, InlineQueue(), broker=queue)).get("/metrics").text
    return {family(n) for n in re.findall(r"^# TYPE (dispatcher_[a-z_]+) ", text, re.MULTILINE)}


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_alert_rules_and_dashboard_use_exported_metrics(runtime: Runtime) -> None:
    names = exported(runtime)
    assert {
        "dispatcher_sends",
        "dispatcher_queue_oldest_seconds",
        "dispatcher_relay_halted",
    } <= names
    rules = (OPS / "prometheus-alerts.yml").read_text()
    exprs = re.findall(r"expr: (?:\|\n)?((?:.+\n?)+?)\s+(?:for|labels):", rules)
    assert len(exprs) == rules.count("- alert:") >= 6
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {family(n) for e in exprs for n in NAME.findall(e)}
    assert used, "no metric named"
    assert used <= names, f"not exported: {sorted(used - names)}"
