"""HTTP load on the API: SmartPlan sends (single, batch, paced) and campaigns."""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from .stack import Stack, Unavailable, cpu_seconds, rss_mb

TERMINAL = ("completed", "cancelled", "failed")


def smartplan_body(agent: str, tag: str, n: int) -> dict[str, Any]:
    """One SmartPlan step; the contact's address is tagged so the sink times its arrival."""
    return {
        "user_id": agent,
        "contact": {
            "id": f"{tag}-{n}",
            "email": f"{tag}-{n}@bench.example",
            "fields": {"first_name": f"Name{n}"},
        },
        "smartplan": {"plan_id": "bench", "run_id": f"run-{n}", "step_id": "1"},
        "message": {
            "subject": "Checking in, {{ first_name }}",
            "html": "<p>Hi {{ first_name }},</p><p>Any questions about the listing?</p>",
            "text": "Hi {{ first_name }},\n\nAny questions about the listing?\n",
        },
    }


def create_agent(stack: Stack, agent: str) -> None:
    with stack.api() as api:
        r = api.put(
            f"/v1/users/{agent}",
            json={
                "platform_email": f"{agent}@agents.example",
                "postal_address": "350 Main St, Austin, TX 78701",
            },
        )
        if r.status_code not in (200, 201):
            raise RuntimeError(f"PUT /v1/users/{agent}: {r.status_code} {r.text[:300]}")


def batch_available(stack: Stack) -> tuple[bool, str]:
    """Whether ``POST /v1/sends/batch`` exists (an empty batch is refused, not unknown)."""
    with stack.api() as api:
        r = api.post("/v1/sends/batch", json={"sends": []})
    if r.status_code in (404, 405):
        return False, f"POST /v1/sends/batch answers {r.status_code} on this build"
    return True, ""


@dataclass
class Accepted:
    steps: int = 0
    seconds: float = 0.0
    refused: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def post_singles(stack: Stack, agent: str, tag: str, numbers: range, threads: int) -> Accepted:
    """``POST /v1/sends`` for each number, from ``threads`` client threads (closed loop)."""
    todo = iter(numbers)
    lock = threading.Lock()
    out = Accepted()

    def client() -> None:
        with stack.api(timeout=60) as api:
            while True:
                with lock:
                    n = next(todo, None)
                if n is None:
                    return
                try:
                    r = api.post("/v1/sends", json=smartplan_body(agent, tag, n))
                    ok, why = r.status_code == 202, f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, why = False, f"{type(exc).__name__}: {exc}"
                with lock:
                    if ok:
                        out.steps += 1
                    else:
                        out.refused.append(why)

    start = time.perf_counter()
    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.seconds = time.perf_counter() - start
    return out


def post_batches(
    stack: Stack, agent: str, tag: str, numbers: range, size: int, threads: int
) -> Accepted:
    """``POST /v1/sends/batch`` of ``size`` steps each, from ``threads`` client threads."""
    batches = [numbers[i : i + size] for i in range(0, len(numbers), size)]
    todo = iter(batches)
    lock = threading.Lock()
    out = Accepted()

    def client() -> None:
        with stack.api(timeout=300) as api:
            while True:
                with lock:
                    batch = next(todo, None)
                if batch is None:
                    return
                body = {"sends": [smartplan_body(agent, tag, n) for n in batch]}
                try:
                    r = api.post("/v1/sends/batch", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        out.refused.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    with lock:
                        out.refused.append(f"batch: {r.status_code} {r.text[:200]}")
                    continue
                results = r.json().get("results", [])
                good = [x for x in results if x.get("status_code") == 202]
                with lock:
                    out.steps += len(good)
                    out.refused += [json.dumps(x)[:200] for x in results if x not in good]

    start = time.perf_counter()
    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.seconds = time.perf_counter() - start
    return out


class PacedSends:
    """Open-loop SmartPlan sends at a fixed rate: send ``i`` is due at ``start + i / rate``
    whatever became of the earlier ones; its latency counts from when it was due.

    Its HTTP clients are made, and their connections opened, before the first send is due,
    as a producer's would be long before: making an ``httpx.Client`` costs about 20 ms of
    this process's CPU, which 32 of them made as the first sends fell due spent inside the
    measured window."""

    CLIENTS = 32

    def __init__(self, stack: Stack, agent: str, rate: float, tag: str = "lat") -> None:
        self.stack, self.agent, self.rate, self.tag = stack, agent, rate, tag
        self.due: dict[str, float] = {}
        self.answered: dict[str, float] = {}  # when the API answered 202
        self.errors: list[str] = []
        self.max_lag = 0.0  # how late a POST started after it was due, at worst
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients = [stack.api(timeout=60) for _ in range(self.CLIENTS)]
        self._idle: queue.SimpleQueue[httpx.Client] = queue.SimpleQueue()
        for c in self._clients:
            c.get("/healthz").raise_for_status()  # each one's connection open
            self._idle.put(c)
        self._pool = ThreadPoolExecutor(max_workers=self.CLIENTS, thread_name_prefix="paced")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _post(self, n: int, due: float) -> None:
        lag = time.time() - due
        client = self._idle.get()  # one per pool thread: never waits
        try:
            r = client.post("/v1/sends", json=smartplan_body(self.agent, self.tag, n))
            problem = None if r.status_code == 202 else f"{r.status_code} {r.text[:200]}"
            if problem is None:
                self.answered[f"{self.tag}-{n}@bench.example"] = time.time()
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            self._idle.put(client)
        with self._lock:
            self.max_lag = max(self.max_lag, lag)
            if problem:
                self.errors.append(problem)

    def _run(self) -> None:
        start = time.time()
        n = 0
        while not self._stop.is_set():
            due = start + n / self.rate
            wait = due - time.time()
            if wait > 0 and self._stop.wait(wait):
                return
            self.due[f"{self.tag}-{n}@bench.example"] = due
            self._pool.submit(self._post, n, due)
            n += 1

    def start(self) -> None:
        self._started = time.time()
        self._thread.start()

    def stop(self) -> float:
        """Stop sending; returns the rate achieved (0 when it never started)."""
        self._stop.set()
        if not self._thread.is_alive():
            self._pool.shutdown(wait=False)
            self._close()
            return 0.0
        self._thread.join()
        elapsed = time.time() - self._started
        self._pool.shutdown(wait=True)
        self._close()
        return len(self.due) / elapsed if elapsed > 0 else 0.0

    def _close(self) -> None:
        for c in self._clients:
            c.close()


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, math.ceil(len(sorted_values) * p) - 1)]


# --------------------------------------------------------------------------- campaigns

SUBJECT = "New listings for you, {{ first_name }}"
HTML = (
    """<!doctype html><html><body style="font-family:Arial,sans-serif">
<h1>New listings near you</h1>
<p>Hi {{ first_name }},</p>
"""
    + "\n".join(
        f"<p>Listing {i}: 3 bed, 2 bath, a lovely home with a garden and a garage, close to "
        f'schools and parks. <a href="https://example.com/listing/{i}">See it</a></p>'
        for i in range(14)
    )
    + "\n<p>Best regards,<br>Your agent</p></body></html>"
)
TEXT = "Hi {{ first_name }},\n\nNew listings near you: https://example.com/listings\n"


def campaign_payload(agent: str, recipients: int) -> bytes:
    """The request body, built as text (a million recipients as dicts would cost gigabytes)."""
    head = json.dumps(
        {
            "user_id": agent,
            "name": f"bench {recipients}",
            "message": {"subject": SUBJECT, "html": HTML, "text": TEXT},
        }
    )
    rows = ",".join(
        f'{{"id":"c{i}","email":"cmp-{i}@bench.example","fields":{{"first_name":"Name{i}"}}}}'
        for i in range(recipients)
    )
    return f'{head[:-1]}, "recipients": [{rows}]}}'.encode()


@dataclass
class CampaignRun:
    recipients: int
    status: str = ""
    sent: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    accepted_s: float = math.nan  # POST to its 202
    first_s: float = math.nan  # POST to the first message at the sink
    seconds: float = math.nan  # POST to the last message at the sink
    sending_s: float = math.nan  # first to last message at the sink
    rss_start: float = math.nan
    rss_peak: float = math.nan
    rss_end: float = math.nan
    cpu_s: float = math.nan  # CPU time of worker_campaign (parent and pool) during the run
    web_rss_start: float = math.nan  # the API process before the POST
    web_rss_peak: float = math.nan  # ... and at its highest while the POST was answered
    problem: str | None = None

    @property
    def web_growth(self) -> float:
        """How much the API process grew to accept the campaign (MB)."""
        return self.web_rss_peak - self.web_rss_start

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else math.nan

    @property
    def sending_rate(self) -> float:
        return self.sent / self.sending_s if self.sending_s > 0 else math.nan

    @property
    def rss_growth(self) -> float:
        return max(self.rss_peak, self.rss_end) - self.rss_start


class _Peak:
    """The highest resident memory of a process while a request is answered, sampled every
    20 ms on a thread of its own."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.mb = rss_mb(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            self.mb = max(self.mb, rss_mb(self.pid))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.mb = max(self.mb, rss_mb(self.pid))

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done.is_set():
            self.stop()


def run_campaign(
    stack: Stack,
    agent: str,
    recipients: int,
    say: Callable[[str], None],
    *,
    on_accepted: Callable[[], None] | None = None,
    stall_seconds: float = 180,
) -> CampaignRun:
    """POST one Command Email campaign and follow it to its end; the sink's ``cmp`` arrivals
    and the campaign worker's RSS (parent and pool) are recorded."""
    out = CampaignRun(recipients)
    payload = campaign_payload(agent, recipients)
    worker = stack.children["worker_campaign"]
    sink = stack.sink
    say(f"  POST /v1/campaigns: {recipients:,} recipients ({len(payload) / 1e6:.1f} MB) ...")
    time.sleep(1.0)  # let the previous phase's stragglers settle before the RSS baseline
    sink.reset("cmp")
    out.rss_start = out.rss_peak = rss_mb(worker.pid)
    cpu_start = cpu_seconds(worker.pid)
    web = stack.children["web"].pid
    out.web_rss_start = rss_mb(web)
    with stack.api() as api, _Peak(web) as web_peak:
        t_post = time.time()
        r = api.post("/v1/campaigns", content=payload, headers={"content-type": "application/json"})
        t_accepted = time.time()
        web_peak.stop()
        out.web_rss_peak = web_peak.mb
        if r.status_code != 202:
            raise Unavailable(f"campaign refused: {r.status_code} {r.text[:300]}")
        out.accepted_s = t_accepted - t_post
        campaign_id = r.json()["id"]
        say(
            f"  accepted in {out.accepted_s * 1000:,.0f} ms; the API process grew "
            f"{out.web_growth:,.1f} MB meanwhile ({out.web_rss_start:,.0f} -> peak "
            f"{out.web_rss_peak:,.0f} MB)"
        )
        if on_accepted is not None:
            on_accepted()
        last_report = time.time()
        last_done, last_change = -1, time.time()
        while True:
            time.sleep(1.0)
            stack.check_alive()
            out.rss_peak = max(out.rss_peak, rss_mb(worker.pid))
            view = api.get(f"/v1/campaigns/{campaign_id}", params={"user_id": agent}).json()
            now = time.time()
            if view["done"] != last_done:
                last_done, last_change = view["done"], now
            if now - last_report >= 5:
                rate = sink.count("cmp") / max(now - t_post, 1e-9)
                say(
                    f"  {view['done']:,}/{view['recipients']:,} done ({view['progress']:.0%}), "
                    f"sink {sink.count('cmp'):,} ({rate:,.0f} msg/s), "
                    f"worker RSS {rss_mb(worker.pid):,.0f} MB"
                )
                last_report = now
            if view["status"] in TERMINAL:
                break
            if now - last_change > stall_seconds:
                out.problem = f"no progress for {stall_seconds:.0f} s at {view['done']:,} done"
                break
    time.sleep(1.0)
    stack.campaigns_run += 1
    out.cpu_s = cpu_seconds(worker.pid) - cpu_start
    out.rss_end = rss_mb(worker.pid)
    out.status = view["status"]
    out.counts = dict(view["counts"])
    out.sent = int(view["counts"].get("sent", 0))
    if sink.count("cmp"):
        out.first_s = sink.first("cmp") - t_post
        out.seconds = sink.last("cmp") - t_post
        out.sending_s = sink.last("cmp") - sink.first("cmp")
    if out.problem is None and (out.status != "completed" or out.sent != recipients):
        out.problem = f"status {out.status}, counts {out.counts}"
    say(
        f"  {out.status}: {out.sent:,} sent in {out.seconds:,.1f} s "
        f"({out.rate:,.0f} msg/s end to end, {out.sending_rate:,.0f} msg/s first to last); "
        f"worker RSS {out.rss_start:,.0f} -> peak {out.rss_peak:,.0f} MB, "
        f"CPU {out.cpu_s * 1000 / max(out.sent, 1):.2f} ms per message"
        + (f"; PROBLEM: {out.problem}" if out.problem else "")
    )
    return out
