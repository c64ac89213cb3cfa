"""Benchmark (not a test): a large Command Email campaign through the real stack.

Runs a private redis-server, an SMTP sink in its own process, the HTTP API (uvicorn) and
Celery workers (one pool for the campaign queue, one for SmartPlan sends) as subprocesses,
then POSTs one campaign and prints:

- messages/s end to end, and the same SMTP sink's raw ceiling measured in the same run
  (aiosmtplib on reused connections sending pre-flattened bytes, nothing else), with the ratio;
- time from POST /v1/campaigns to its acceptance and to the first message;
- campaign worker RSS at start and end;
- SmartPlan send latency p50/p99 (POST to arrival at the SMTP server) while the campaign runs.

Usage: python tests/bench_campaign.py [--recipients 100000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- SMTP sink


def _sink(port: int, ready: Any, count: Any, first: Any, last: Any, arrivals: Any) -> None:
    """An aiosmtpd server that counts messages and keeps only SmartPlan arrival times."""
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            now = time.time()
            with count.get_lock():
                count.value += 1
                if first.value == 0:
                    first.value = now
                last.value = now
            rcpt = envelope.rcpt_tos[0]
            if rcpt.startswith("sp-"):
                arrivals.put((rcpt, now))
            return "250 2.0.0 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    ready.set()
    signal.sigwait({signal.SIGTERM})
    controller.stop()


class Sink:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.port = free_port()
        self.count = ctx.Value("q", 0)
        self.first = ctx.Value("d", 0.0)
        self.last = ctx.Value("d", 0.0)
        self.arrivals: Any = ctx.Queue()
        ready = ctx.Event()
        self.proc = ctx.Process(
            target=_sink,
            args=(self.port, ready, self.count, self.first, self.last, self.arrivals),
            daemon=True,
        )
        self.proc.start()
        if not ready.wait(20):
            raise RuntimeError("SMTP sink did not start")

    def reset(self) -> None:
        with self.count.get_lock():
            self.count.value = 0
            self.first.value = 0.0
            self.last.value = 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


# --------------------------------------------------------------------------- ceiling


def raw_ceiling(port: int, messages: int, connections: int = 8) -> float:
    """Messages/s of aiosmtplib alone on reused connections, pre-flattened bytes."""
    body = (
        b"From: a@bench.example\r\nTo: r@bench.example\r\nSubject: ceiling\r\n"
        b"Message-ID: <c@bench.example>\r\n\r\n" + (b"x" * 70 + b"\r\n") * 48
    )

    async def lane(n: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30)
        await client.connect()
        for _ in range(n):
            await client.sendmail("a@bench.example", ["r@bench.example"], body)
        await client.quit()

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(lane(messages // connections) for _ in range(connections)))
        return (messages // connections * connections) / (time.perf_counter() - start)

    return asyncio.run(run())


# --------------------------------------------------------------------------- processes


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(log: Path, marker: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while marker not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log.name} never said {marker!r}:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--ceiling-messages", type=int, default=20_000)
    parser.add_argument("--campaign-concurrency", type=int, default=3)
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ced-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    sink = Sink()
    try:
        redis_port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    "--port",
                    str(redis_port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(work),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        api_port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "DATABASE_URL": args.database_url or f"sqlite:///{work / 'bench.db'}",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink.port),
            "API_TOKENS": TOKEN,
            "FREE_PLAN_CREDITS": str(args.recipients + 10_000),
            "MAIL_FROM": "Command Email <bounces@bench.example>",
            "LOG_LEVEL": "WARNING",
        }
        python = sys.executable
        subprocess.run(
            [python, "-m", "dispatcher.cli", "db", "upgrade"],
            env=env,
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )

        print(
            f"raw ceiling: {args.ceiling_messages:,} messages on 8 reused connections ...",
            flush=True,
        )
        ceiling = raw_ceiling(sink.port, args.ceiling_messages)
        print(f"  {ceiling:,.0f} msg/s", flush=True)
        sink.reset()

        campaign_log, smartplan_log, api_log = (
            work / "campaign.log",
            work / "smartplan.log",
            work / "api.log",
        )
        celery = [
            python,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "worker",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
        ]
        campaign_worker = start(
            [
                *celery,
                "-Q",
                "campaign",
                "-n",
                "campaign@%h",
                "--concurrency",
                str(args.campaign_concurrency),
            ],
            env,
            campaign_log,
        )
        procs.append(campaign_worker)
        procs.append(
            start(
                [
                    *celery,
                    "-Q",
                    "smartplan,system",
                    "-n",
                    "smartplan@%h",
                    "--pool",
                    "threads",
                    "--concurrency",
                    "4",
                ],
                env,
                smartplan_log,
            )
        )
        procs.append(
            start(
                [
                    python,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "workers.web:create_app",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                env,
                api_log,
            )
        )
        for log in (campaign_log, smartplan_log):
            wait_ready(log, "ready.")
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=600,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if api.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("API did not start")
            time.sleep(0.2)
        api.put("/v1/users/bench-agent", json={"platform_email": "agent@bench.example"})
        # Warm the SmartPlan path once.
        api.post("/v1/sends", json=smartplan_body(-1))
        time.sleep(1.0)
        rss_start = rss_mb(campaign_worker.pid)
        sink.reset()

        body = {
            "user_id": "bench-agent",
            "name": "bench",
            "message": {
                "subject": "New listings for you, {{ first_name }}",
                "html": HTML,
                "text": TEXT,
            },
            "recipients": [
                {
                    "id": f"c{i}",
                    "email": f"r{i}@bench.example",
                    "fields": {"first_name": f"Name{i}"},
                }
                for i in range(args.recipients)
            ],
        }
        payload = json.dumps(body).encode()
        print(
            f"campaign: {args.recipients:,} recipients ({len(payload) / 1e6:.1f} MB request) ...",
            flush=True,
        )

        posted: dict[str, float] = {}
        stop = threading.Event()

        def smartplan_probe() -> None:
            n = 0
            while not stop.is_set():
                posted[f"sp-{n}@bench.example"] = time.time()
                api.post("/v1/sends", json=smartplan_body(n))
                n += 1
                stop.wait(0.25)

        t_post = time.time()
        probe = threading.Thread(target=smartplan_probe, daemon=True)
        r = api.post("/v1/campaigns", content=payload, headers={"content-type": "application/json"})
        t_accepted = time.time()
        if r.status_code != 202:
            raise RuntimeError(f"campaign refused: {r.status_code} {r.text[:500]}")
        campaign_id = r.json()["id"]
        probe.start()
        last_report = 0.0
        while True:
            view = api.get(f"/v1/campaigns/{campaign_id}", params={"user_id": "bench-agent"}).json()
            if time.time() - last_report > 5:
                print(
                    f"  {view['done']:,}/{view['recipients']:,} "
                    f"({view['progress'] * 100:.0f}%), sink {sink.count.value:,}",
                    flush=True,
                )
                last_report = time.time()
            if view["status"] != "running":
                break
            time.sleep(0.5)
        t_done = time.time()
        stop.set()
        probe.join()
        time.sleep(1.0)
        rss_end = rss_mb(campaign_worker.pid)
        arrivals: dict[str, float] = {}
        while not sink.arrivals.empty():
            rcpt, at = sink.arrivals.get()
            arrivals[rcpt] = at
        latencies = sorted((arrivals[k] - posted[k]) * 1000 for k in posted if k in arrivals)

        sent = view["counts"]["sent"]
        end_to_end = sent / (t_done - t_post)
        sending = sent / max(sink.last.value - sink.first.value, 1e-9)
        print()
        print(
            f"campaign status            {view['status']}: {sent:,} sent, "
            f"{view['counts']['failed']:,} failed, {view['counts']['unknown']:,} unknown"
        )
        print(f"POST to acceptance         {(t_accepted - t_post) * 1000:,.0f} ms")
        print(f"POST to first message      {(sink.first.value - t_post) * 1000:,.0f} ms")
        print(
            f"end to end                 {end_to_end:,.0f} msg/s "
            f"({t_done - t_post:,.1f} s from POST to completion)"
        )
        print(f"first to last message      {sending:,.0f} msg/s")
        print(f"raw SMTP ceiling           {ceiling:,.0f} msg/s (same sink, same run)")
        print(f"ratio end to end / ceiling {end_to_end / ceiling:.2f}")
        print(f"ratio sending / ceiling    {sending / ceiling:.2f}")
        print(
            f"campaign worker RSS        {rss_start:,.0f} MB at start, {rss_end:,.0f} MB at "
            f"end ({rss_end - rss_start:+,.0f} MB)"
        )
        if latencies:
            p50 = statistics.median(latencies)
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(
                f"SmartPlan latency          p50 {p50:,.0f} ms, p99 {p99:,.0f} ms "
                f"({len(latencies)} sends during the campaign)"
            )
        return 0
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM) if p.pid else None
            except (ProcessLookupError, PermissionError):
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)


def smartplan_body(n: int) -> dict[str, Any]:
    return {
        "user_id": "bench-agent",
        "contact": {"id": f"sp-{n}", "email": f"sp-{n}@bench.example"},
        "smartplan": {"plan_id": "bench", "run_id": f"run-{n}", "step_id": "1"},
        "message": {"subject": "Checking in", "html": "<p>Hi there</p>"},
    }


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


if __name__ == "__main__":
    sys.exit(main())
