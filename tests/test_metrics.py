"""/metrics as ops scrape it: the API, a threads pool and a prefork pool as separate processes
sharing PROMETHEUS_MULTIPROC_DIR, after SmartPlan sends and a campaign through the HTTP API."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.devsmtp import DevSMTPServer
from devstack.localstack import api_command
from devstack.processes import Child, free_port
from dispatcher.settings import Settings
from tests.campaigns.test_campaigns import campaign_body
from tests.crashkit import Stack
from tests.helpers import make_user, statuses, wait_for
from tests.test_smartplan_e2e import send_body
from workers.names import CAMPAIGN, SMARTPLAN

SMARTPLAN_SENDS = 200
RECIPIENTS = 1000
TOKEN = "test-token-123"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by name and labels (sorted)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(
    scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and want <= set(ls))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_metrics_count_what_the_sink_received_across_processes(
    settings: Settings, smtp_server: DevSMTPServer, tmp_path: Path
) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    settings = settings.with_overrides(campaign_chunk_size=250)
    with Stack(settings, tmp_path) as stack:
        stack.workers.env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
        make_user(stack.rt)
        worker_port = free_port()
        stack.workers.env["METRICS_PORT"] = str(worker_port)
        stack.workers.start(SMARTPLAN, pool="threads", concurrency=4, isolated=False)
        del stack.workers.env["METRICS_PORT"]
        stack.workers.start(CAMPAIGN, pool="prefork", concurrency=2, isolated=False)
        port = free_port()
        web = Child("web", api_command(port), stack.workers.env, tmp_path / "web.log")
        web.start()
        try:
            base = f"http://127.0.0.1:{port}"
            client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"})
            wait_for(lambda: _answers(client), timeout=60, what="the API answering")
            stack.workers.wait_ready(2, timeout=60)

            # When 200 SmartPlan steps and a 1,000-recipient campaign go through the API
            batch = {"sends": [send_body(n) for n in range(SMARTPLAN_SENDS)]}
            assert client.post("/v1/sends/batch", json=batch).status_code == 200
            campaign = client.post("/v1/campaigns", json=campaign_body(RECIPIENTS))
            assert campaign.status_code == 202
            wait_for(
                lambda: statuses(stack.rt, "agent-1").get("sent") == SMARTPLAN_SENDS + RECIPIENTS,
                timeout=120,
                what="every send sent",
            )
            wait_for(lambda: _drained(client), timeout=30, what="the queues drained")
            scrape = samples(client.get("/metrics").text)
            # A worker serves the same host-wide figures on its METRICS_PORT
            served = httpx.get(f"http://127.0.0.1:{worker_port}/metrics").text
            assert total(samples(served), "dispatcher_sends_total") == total(
                scrape, "dispatcher_sends_total"
            )
        finally:
            web.stop()

    # Then the counters match what the SMTP server received, exactly
    received = len(smtp_server.messages)
    assert received == SMARTPLAN_SENDS + RECIPIENTS
    sent = ("dispatcher_sends_total", {"outcome": "sent"})
    assert total(scrape, sent[0], kind="smartplan", **sent[1]) == SMARTPLAN_SENDS
    assert total(scrape, sent[0], kind="campaign", **sent[1]) == RECIPIENTS
    assert total(scrape, "dispatcher_sends_total") == received
    assert total(scrape, "dispatcher_smtp_replies_total", reply="2xx") == received
    assert total(scrape, "dispatcher_smtp_replies_total") == received
    assert total(scrape, "dispatcher_credits_reserved_total") == received
    assert total(scrape, "dispatcher_credits_refunded_total") == 0
    # and the histograms hold one observation per send, message and render
    latency = "dispatcher_send_latency_seconds_count"
    assert total(scrape, latency, kind="smartplan") == SMARTPLAN_SENDS
    assert total(scrape, latency, kind="campaign") == RECIPIENTS
    assert total(scrape, "dispatcher_smtp_conversation_seconds_count") == received
    assert total(scrape, "dispatcher_render_seconds_count") >= received
    assert total(scrape, "dispatcher_reserve_seconds_count") >= SMARTPLAN_SENDS + 1
    waits = "dispatcher_queue_wait_seconds_count"
    assert total(scrape, waits, queue=SMARTPLAN) == SMARTPLAN_SENDS
    # and the steps submitted together were delivered as batch tasks, each step in one
    assert total(scrape, "dispatcher_smartplan_batch_steps_sum", source="submitted") == (
        SMARTPLAN_SENDS
    )
    assert total(scrape, waits, queue=CAMPAIGN) == RECIPIENTS // 250
    # and the gauges read zero once everything is drained
    for queue in (SMARTPLAN, CAMPAIGN, "system"):
        assert total(scrape, "dispatcher_queue_messages", queue=queue) == 0
        assert total(scrape, "dispatcher_queue_oldest_seconds", queue=queue) == 0
    assert total(scrape, "dispatcher_sends_in_flight") == 0
    assert total(scrape, "dispatcher_campaigns_running") == 0
    assert total(scrape, "dispatcher_broker_up") == 1
    assert total(scrape, "dispatcher_relay_halted") == 0


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _drained(client: httpx.Client) -> bool:
    scrape = samples(client.get("/metrics").text)
    return (
        total(scrape, "dispatcher_queue_messages") == 0
        and total(scrape, "dispatcher_sends_in_flight") == 0
        and total(scrape, "dispatcher_campaigns_running") == 0
    )
