"""Every performance figure of the dispatcher in one table, each beside its ceiling and goal.

Everything runs through real processes: a private redis-server on a free port, an aiosmtpd
SMTP sink in its own process, the API (uvicorn, ``workers.web:create_app``) and the Celery
workers started with the Procfile's commands (worker_smartplan, worker_campaign, worker_system),
on each database given. The raw ceiling is measured against the same sink in the same run:
aiosmtplib on 8 reused connections sending pre-flattened bytes.

Sections (--sections, default all):
  delivery    10,000 SmartPlan steps queued while worker_smartplan is stopped, then the worker
              started: msg/s from the worker's start (it answers a ping) to the last arrival at
              the sink, against the ceiling (goal >= 0.5)
  acceptance  the same steps as they are queued: POST /v1/sends/batch steps/s (batches of 1,000
              from 2 threads; goal >= 2,000/s) and single POST /v1/sends/s from 16 threads (goal
              >= 300/s); n/a for batches when the endpoint answers 404 (all steps go singly)
  latency     p50/p99 from POST /v1/sends (when it was due) to arrival at the sink, at a paced
              open-loop 100 sends/s while a 100,000-recipient campaign runs (goal p99 < 250 ms)
  campaign    100,000 recipients: msg/s from POST to the last arrival against the ceiling
              (goal >= 0.8), POST to acceptance (goal < 1.5 s), campaign worker RSS growth (parent
              and pool; peak minus start; goal < 20 MB)
  scale       campaigns of 10,000 and 100,000 recipients (and 1,000,000 with --million, on
              PostgreSQL): seconds and RSS growth per 1,000 recipients, flat within 20%
  credits     reservations/s of QuotaLedger.reserve (1 credit, and --bulk-credits) against raw
              EVALSHA of reserve.lua with the same keys and arguments through redis-py, same Redis
              (goal >= 0.5)

Figures are printed as they are measured, then the table, which is also written as markdown
(--results). Processes, temporary folders and PostgreSQL databases are removed on exit, Ctrl-C
included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from . import credits as credit_bench
from .load import (
    CampaignRun,
    PacedSends,
    batch_available,
    create_agent,
    percentile,
    post_batches,
    post_singles,
    run_campaign,
)
from .sink import Sink, free_port, raw_ceiling
from .stack import DEFAULT_POSTGRES, ROOT, Database, Stack, Unavailable, cpu_seconds, redis_server
from .table import Row, markdown, na_row, num, ratio_row, settle, yes

SECTIONS = ("delivery", "acceptance", "latency", "campaign", "scale", "credits")
MILLION = 1_000_000
QUICK = {
    "ceiling_messages": 3_000,
    "steps": 600,
    "singles": 200,
    "batch_size": 100,
    "latency_campaign": 3_000,
    "latency_wait": 10.0,
    "campaign_recipients": 3_000,
    "scale_sizes": "1000,3000",
    "credit_reservations": 2_000,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=doc.split("\n\n")[0],
        epilog="\n\n".join(doc.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--database-url",
        action="append",
        dest="databases",
        metavar="URL",
        help="a database to run on, repeatable: 'sqlite' (a file in a temporary folder), a "
        "sqlite:/// URL, or a PostgreSQL server URL (postgresql+psycopg://user@host:port/db: a "
        "private database ced_bench_<pid> is created there and dropped afterwards; the URL's "
        f"database is only connected to). Default: sqlite and {DEFAULT_POSTGRES}",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every section with small sizes (a couple of minutes): "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    p.add_argument("--ceiling-messages", type=int, default=20_000, help="default 20,000")
    p.add_argument(
        "--steps", type=int, default=10_000, help="SmartPlan steps queued (default 10,000)"
    )
    p.add_argument(
        "--singles",
        type=int,
        default=2_000,
        help="of those, sent singly when the batch endpoint exists (default 2,000; the rest "
        "in batches); without it every step is sent singly",
    )
    p.add_argument("--single-threads", type=int, default=16, help="default 16")
    p.add_argument("--batch-size", type=int, default=1_000, help="default 1,000")
    p.add_argument("--batch-threads", type=int, default=2, help="default 2")
    p.add_argument(
        "--latency-rate", type=float, default=100.0, help="SmartPlan sends/s (default 100)"
    )
    p.add_argument(
        "--latency-campaign",
        type=int,
        default=100_000,
        help="recipients of the campaign running meanwhile (default 100,000)",
    )
    p.add_argument(
        "--latency-wait",
        type=float,
        default=30.0,
        help="seconds the last SmartPlan sends may take to arrive after the campaign ends "
        "(default 30; later ones count as not arrived, and the queue is emptied)",
    )
    p.add_argument("--campaign-recipients", type=int, default=100_000, help="default 100,000")
    p.add_argument(
        "--scale-sizes",
        default="10000,100000",
        help="campaign sizes of the scale curve (default 10000,100000; a size equal to "
        "--campaign-recipients reuses that campaign)",
    )
    p.add_argument(
        "--million",
        action="store_true",
        help="add a 1,000,000-recipient campaign to the scale curve (PostgreSQL only; long)",
    )
    p.add_argument("--credit-reservations", type=int, default=10_000, help="per round, 3 rounds")
    p.add_argument(
        "--bulk-credits",
        type=int,
        default=500,
        help="credits per bulk reservation (default 500, a campaign chunk)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench" / "results.md",
        help="where the markdown table is written (default bench/results.md)",
    )
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the processes' logs here")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.databases = args.databases or ["sqlite", DEFAULT_POSTGRES]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    args.scale_sizes = sorted({int(s) for s in args.scale_sizes.split(",") if s.strip()})
    if args.million:
        args.scale_sizes.append(MILLION)
    args.singles = min(args.singles, args.steps)
    return args


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.rows: list[Row] = []
        self.want = set(args.sections)
        self.pending: list[Row] = []  # rates whose ceiling is measured at the end
        self.ceiling = math.nan

    def smtp_row(
        self, section: str, figure: str, label: str, rate: float, goal: float, notes: str
    ) -> None:
        """A msg/s figure against the ceiling, settled when the database's run ends (the
        ceiling is measured before and after it, and the higher one is taken)."""
        row = Row(section, figure, label, num(rate, " msg/s"), goal=f">= {goal:.1f} x ceiling")
        row.notes, row.rate, row.goal_ratio, row.unit = notes, rate, goal, " msg/s"
        self.pending.append(row)
        self.rows.append(row)

    def settle(self, ceiling: float) -> None:
        for row in self.pending:
            settle(row, ceiling)
        self.pending.clear()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f}s] {message}", flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    # ------------------------------------------------------------------ credits

    def credits(self, work: Path) -> None:
        a = self.args
        self.say(f"credits: {a.credit_reservations:,} reservations x 3 rounds per side ...")
        child, client = redis_server(work, free_port(), dict(os.environ))
        try:
            for n in (1, a.bulk_credits):
                cost = credit_bench.measure(client, a.credit_reservations, n)
                self.say(
                    f"  credits={n}: QuotaLedger.reserve {cost.python:,.0f}/s, "
                    f"raw EVALSHA {cost.raw:,.0f}/s ({cost.python / cost.raw:.2f})"
                )
                label = "single credit" if n == 1 else f"bulk, credits={n}"
                self.add(
                    ratio_row(
                        "6",
                        f"Credit reservations, {label} (ceiling: raw EVALSHA)",
                        "redis",
                        cost.python,
                        cost.raw,
                        0.5,
                        unit="/s",
                        notes="distinct keys, unpipelined, best of 3",
                    )
                )
        finally:
            client.close()
            child.stop()

    # ------------------------------------------------------------------ one database

    def database(self, spec: str, work: Path, cleanup: list[Callable[[], None]]) -> None:
        a = self.args
        label = "postgresql" if spec.startswith("postgresql") else "sqlite"
        want_db = self.want - {"credits"}
        if not want_db:
            return
        try:
            database = Database(spec, work)
        except Unavailable as exc:
            self.say(f"{label}: n/a ({exc})")
            for section in sorted(want_db):
                self.add(na_row("-", section, label, str(exc)))
            return
        cleanup.append(database.drop)
        self.say(f"== {label}: {database.name}")
        stack = Stack(
            database,
            self.sink,
            work,
            max_recipients=max([a.campaign_recipients, a.latency_campaign, *a.scale_sizes]),
            credits=10 * MILLION + 2 * max(a.scale_sizes, default=0),
            say=self.say,
        )
        cleanup.append(stack.close)
        ceiling = math.nan
        try:
            stack.start_redis()
            self.say(f"raw ceiling: {a.ceiling_messages:,} messages on 8 reused connections ...")
            ceiling = self.ceiling = raw_ceiling(self.sink.port, a.ceiling_messages)
            self.say(f"  {ceiling:,.0f} msg/s (measured again at the end; the higher one counts)")
            stack.migrate()
            stack.start("web")
            stack.start("worker_campaign")
            stack.start("worker_system")
            stack.wait_api()
            stack.wait_worker("worker_campaign")
            stack.wait_worker("worker_system")
        except Exception as exc:  # noqa: BLE001 - the stack did not start: n/a, not a crash
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            self.say(f"{label}: the stack did not start: {exc}")
            for section in sorted(want_db):
                self.add(na_row("-", section, label, f"stack did not start: {why}"))
            return
        self.say("API and workers ready (worker_smartplan not started)")

        if {"delivery", "acceptance"} & self.want:
            self.guard("1/2", "SmartPlan", label, lambda: self.smartplan(stack, label, ceiling))
        if "worker_smartplan" not in stack.children:
            try:
                stack.start("worker_smartplan")
                stack.wait_worker("worker_smartplan")
            except Exception as exc:  # noqa: BLE001
                self.say(f"worker_smartplan did not start: {exc}")
        if "latency" in self.want:
            self.guard("3", "SmartPlan latency", label, lambda: self.latency(stack, label))
        runs: dict[int, CampaignRun] = {}
        if "campaign" in self.want:
            self.guard("4", "Campaign", label, lambda: self.campaign(stack, label, runs))
        if "scale" in self.want:
            self.guard("5", "Scale", label, lambda: self.scale(stack, label, runs))
        if self.pending:
            stack.stop_all()  # the sink alone, as at the start
            self.say(f"raw ceiling again: {a.ceiling_messages:,} messages ...")
            end = raw_ceiling(self.sink.port, a.ceiling_messages)
            self.say(f"  {end:,.0f} msg/s (start {ceiling:,.0f}): ceiling {max(ceiling, end):,.0f}")
            self.settle(max(ceiling, end))
        stack.close()
        database.drop()
        if a.keep_logs:
            a.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in work.glob("*.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(log, a.keep_logs / f"{label}-{log.name}")

    def guard(self, section: str, figure: str, label: str, run: Callable[[], None]) -> None:
        """Run a section; a failure becomes an n/a row with its reason, not a crash."""
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - any failure is reported as n/a, not a crash
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            self.say(f"  {figure}: n/a: {exc}")
            self.add(na_row(section, figure, label, why))

    # ------------------------------------------------------------------ sections 1 and 2

    def smartplan(self, stack: Stack, label: str, ceiling: float) -> None:
        a = self.args
        sink = self.sink
        agent = "bench-dl"
        create_agent(stack, agent)
        has_batch, why = batch_available(stack)
        singles = range(a.singles) if has_batch else range(a.steps)
        self.say(
            f"SmartPlan acceptance: {len(singles):,} single POST /v1/sends from "
            f"{a.single_threads} threads (worker_smartplan stopped) ..."
        )
        # The web process's CPU per accepted send: steadier than sends/s on a noisy machine.
        web = stack.children["web"].pid
        web_cpu = cpu_seconds(web)
        single = post_singles(stack, agent, "dl", singles, a.single_threads)
        web_ms = (cpu_seconds(web) - web_cpu) * 1000 / max(single.steps, 1)
        self.say(
            f"  {single.rate:,.0f} sends/s ({single.steps:,} accepted in {single.seconds:.1f} s;"
            f" web CPU {web_ms:.1f} ms per send)"
        )
        batch = None
        if has_batch:
            numbers = range(a.singles, a.steps)
            self.say(
                f"  {len(numbers):,} steps in batches of {a.batch_size:,} from "
                f"{a.batch_threads} threads ..."
            )
            batch = post_batches(stack, agent, "dlb", numbers, a.batch_size, a.batch_threads)
            self.say(f"  {batch.rate:,.0f} steps/s ({batch.steps:,} in {batch.seconds:.1f} s)")
        else:
            self.say(f"  batch: n/a ({why})")
        refused = single.refused + (batch.refused if batch else [])
        if refused:
            self.say(f"  {len(refused):,} refused, e.g. {refused[0]}")
        if "acceptance" in self.want:
            if batch is None:
                self.add(na_row("2", "SmartPlan batch acceptance", label, why))
            else:
                self.add(
                    Row(
                        "2",
                        f"SmartPlan batch acceptance ({a.batch_size:,} per batch, "
                        f"{a.batch_threads} threads)",
                        label,
                        num(batch.rate, " steps/s"),
                        goal=">= 2,000 steps/s",
                        met=yes(batch.rate >= 2000 and not batch.refused),
                        notes=f"{batch.steps:,} accepted, {len(batch.refused)} refused",
                    )
                )
            self.add(
                Row(
                    "2",
                    f"SmartPlan single acceptance ({a.single_threads} threads)",
                    label,
                    num(single.rate, " sends/s"),
                    goal=">= 300 sends/s",
                    met=yes(single.rate >= 300 and not single.refused),
                    notes=f"{single.steps:,} accepted, {len(single.refused)} refused; web "
                    f"CPU {web_ms:.1f} ms per send",
                )
            )

        queued = single.steps + (batch.steps if batch else 0)
        if not queued:
            raise Unavailable("no step was accepted")
        self.say(f"SmartPlan delivery: starting worker_smartplan on {queued:,} queued steps ...")
        sink.reset("dl")
        sink.reset("dlb")
        child = stack.start("worker_smartplan")
        ready = stack.wait_worker("worker_smartplan")
        self.say(f"  worker ready {ready - child.started:.1f} s after its process started")
        self.wait_sink("dlb", batch.steps if batch else 0, stack)
        self.wait_sink("dl", single.steps, stack)
        count = sink.count("dl") + sink.count("dlb")
        cpu_ms = cpu_seconds(child.pid) * 1000 / max(count, 1)
        first = min(t for t in (sink.first("dl"), sink.first("dlb")) if t) if count else 0.0
        last = max(sink.last("dl"), sink.last("dlb"))
        batched = _group_rate(sink, "dlb")
        singly = _group_rate(sink, "dl")
        self.say(
            f"  steps sent singly: {singly:,.0f} msg/s first to last; in batches: "
            f"{batched:,.0f} msg/s first to last (both groups share the worker)"
        )
        start = min(ready, first) if first else ready
        rate = count / (last - start) if last > start else math.nan
        first_to_last = count / (last - first) if last > first else math.nan
        from_spawn = count / (last - child.started) if last > child.started else math.nan
        self.say(
            f"  {count:,} delivered: {rate:,.0f} msg/s from worker ready, {first_to_last:,.0f} "
            f"first to last, {from_spawn:,.0f} from process start; ceiling {ceiling:,.0f}; "
            f"worker CPU {cpu_ms:.1f} ms per message (start-up included)"
        )
        if "delivery" in self.want:
            notes = (
                f"first to last {num(first_to_last)} msg/s; from process start "
                f"{num(from_spawn)} msg/s; worker CPU {cpu_ms:.1f} ms/msg; "
                f"{'batch' if batch else 'single'} enqueue; the steps submitted singly "
                f"{num(singly)} msg/s and in batches {num(batched)} msg/s, each first to last"
            )
            if count != queued:
                notes += f"; {count:,} arrived of {queued:,}"
            self.smtp_row(
                "1",
                f"SmartPlan delivery, {queued:,} queued steps (worker ready to last arrival)",
                label,
                rate if count >= queued else math.nan,
                0.5,
                notes,
            )

    def wait_sink(self, tag: str, expected: int, stack: Stack, stall: float = 120) -> None:
        last_count, last_change, last_report = -1, time.time(), time.time()
        while True:
            count = self.sink.count(tag)
            now = time.time()
            if count >= expected:
                return
            if count != last_count:
                last_count, last_change = count, now
            if now - last_change > stall:
                self.say(f"  stalled at {count:,} of {expected:,} for {stall:.0f} s")
                return
            if now - last_report >= 5:
                self.say(f"  {count:,}/{expected:,} at the sink")
                last_report = now
            stack.check_alive()
            time.sleep(0.2)

    # ------------------------------------------------------------------ section 3

    def latency(self, stack: Stack, label: str) -> None:
        a = self.args
        agent, campaign_agent = "bench-lat", "bench-lat-campaign"
        create_agent(stack, agent)
        create_agent(stack, campaign_agent)
        self.sink.drain_arrivals(2.0)
        self.say(
            f"SmartPlan latency: {a.latency_rate:g} sends/s paced while a "
            f"{a.latency_campaign:,}-recipient campaign runs ..."
        )
        paced = PacedSends(stack, agent, a.latency_rate, tag=f"lat-{label}")
        try:
            run = run_campaign(
                stack, campaign_agent, a.latency_campaign, self.say, on_accepted=paced.start
            )
        finally:
            achieved = paced.stop()
        due = paced.due
        arrivals: dict[str, float] = {}
        deadline = time.time() + a.latency_wait
        while len(arrivals) < len(due) - len(paced.errors) and time.time() < deadline:
            arrivals.update(self.sink.drain_arrivals(1.0))
        time.sleep(1.0)
        dropped = stack.purge("smartplan")
        if dropped:
            self.say(
                f"  {dropped:,} SmartPlan sends still queued: dropped (the next section runs alone)"
            )
        latencies = sorted(
            (arrivals[k] - at) * 1000 if k in arrivals else math.inf for k, at in due.items()
        )
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)

        def ms(value: float) -> str:
            return num(value, " ms") if math.isfinite(value) else f"> {a.latency_wait:g} s"

        missing = sum(1 for v in latencies if v == math.inf)
        self.say(
            f"  {len(due):,} sends at {achieved:,.1f}/s: p50 {ms(p50)}, p99 {ms(p99)}, "
            f"{missing:,} not arrived, {len(paced.errors)} refused, POST start lag at worst "
            f"{paced.max_lag * 1000:,.0f} ms"
        )
        self.say(f"  p99 by {SPAN:g} s of the run (where the tail is): {spans(due, arrivals)}")
        self.say(f"  {split(due, paced.answered, arrivals)}")
        notes = (
            f"{len(due):,} sends at {achieved:,.0f}/s during a {a.latency_campaign:,} campaign "
            f"({num(run.rate)} msg/s); {missing:,} not arrived {a.latency_wait:g} s after it, "
            f"{len(paced.errors)} refused"
        )
        if not due:
            raise Unavailable("no SmartPlan send was made during the campaign")

        self.add(Row("3", "SmartPlan latency p50 under campaign load", label, ms(p50), notes=notes))
        self.add(
            Row(
                "3",
                "SmartPlan latency p99 under campaign load",
                label,
                ms(p99),
                goal="< 250 ms",
                met=yes(p99 < 250),
                notes="POST (when due) to arrival at the sink; open loop",
            )
        )

    # ------------------------------------------------------------------ sections 4 and 5

    def campaign(self, stack: Stack, label: str, runs: dict[int, CampaignRun]) -> None:
        n = self.args.campaign_recipients
        agent = f"bench-campaign-{n}"
        create_agent(stack, agent)
        self.warm_up(stack)
        self.say(f"Campaign: {n:,} recipients ...")
        run = run_campaign(stack, agent, n, self.say)
        runs[n] = run
        problem = f"; PROBLEM: {run.problem}" if run.problem else ""
        self.smtp_row(
            "4",
            f"Campaign {n:,} recipients, POST to last arrival",
            label,
            run.rate if not run.problem else math.nan,
            0.8,
            f"first to last {num(run.sending_rate)} msg/s; POST to first message "
            f"{num(run.first_s * 1000, ' ms')}; worker CPU "
            f"{run.cpu_s * 1000 / max(run.sent, 1):.2f} ms/msg{problem}",
        )
        self.add(
            Row(
                "4",
                f"Campaign {n:,}: POST to acceptance",
                label,
                num(run.accepted_s, " s", 2),
                goal="< 1.5 s",
                met=yes(run.accepted_s < 1.5),
                notes=f"the API process grew {run.web_growth:,.1f} MB answering it",
            )
        )
        self.add(
            Row(
                "4",
                f"Campaign {n:,}: worker_campaign RSS growth",
                label,
                num(run.rss_growth, " MB", 1),
                goal="< 20 MB",
                met=yes(run.rss_growth < 20),
                notes=f"{run.rss_start:,.0f} MB at start, peak {run.rss_peak:,.0f}, "
                f"end {run.rss_end:,.0f} (parent + pool)",
            )
        )

    def warm_up(self, stack: Stack) -> None:
        """The first campaign of a worker loads what every later one reuses: not growth."""
        if not stack.campaigns_run:
            create_agent(stack, "bench-warm-up")
            self.say("a 1,000-recipient warm-up campaign first ...")
            run_campaign(stack, "bench-warm-up", 1000, self.say)

    def scale(self, stack: Stack, label: str, runs: dict[int, CampaignRun]) -> None:
        points: dict[int, CampaignRun] = {}
        for n in self.args.scale_sizes:
            if n >= MILLION and label != "postgresql":
                self.add(na_row("5", f"Scale: {n:,} recipients", label, "PostgreSQL only"))
                continue
            run = runs.get(n)
            if run is None:
                self.warm_up(stack)
                agent = f"bench-scale-{n}"
                create_agent(stack, agent)
                self.say(f"Scale: {n:,} recipients ...")
                run = run_campaign(stack, agent, n, self.say, stall_seconds=300)
            if run.problem:
                self.add(na_row("5", f"Scale: {n:,} recipients", label, run.problem))
                continue
            points[n] = run
            per_k = run.seconds / (n / 1000)
            rss_k = run.rss_growth / (n / 1000)
            self.say(f"  {n:,}: {per_k:.3f} s per 1,000, RSS {rss_k:+.3f} MB per 1,000")
            self.add(
                Row(
                    "5",
                    f"Scale: {n:,} recipients",
                    label,
                    f"{per_k:.3f} s/1k; {rss_k:+.3f} MB/1k",
                    notes=f"{run.seconds:,.1f} s, RSS {run.rss_growth:+,.1f} MB; accepted in "
                    f"{run.accepted_s:,.2f} s, the API process growing {run.web_growth:,.1f} MB",
                )
            )
        if len(points) < 2:
            return
        sizes = sorted(points)
        secs = {n: points[n].seconds / (n / 1000) for n in sizes}
        spread = max(secs.values()) / min(secs.values())
        self.add(
            Row(
                "5",
                "Scale: seconds per 1,000, slowest / fastest",
                label,
                num(spread, digits=2),
                goal="<= 1.2 (flat)",
                met=yes(spread <= 1.2),
                notes=", ".join(f"{n:,}: {secs[n]:.3f}" for n in sizes),
            )
        )
        rss = {n: points[n].rss_growth / (n / 1000) for n in sizes}
        base = rss[sizes[0]]
        worst = max(rss[n] for n in sizes[1:])
        # Growth below 1 MB over the smallest campaign is noise (pages, allocator arenas).
        floor = max(base, 1.0 / (sizes[0] / 1000))
        ok = all(rss[n] <= 1.2 * floor for n in sizes[1:])
        self.add(
            Row(
                "5",
                "Scale: RSS growth per 1,000, largest size vs smallest",
                label,
                f"{worst:+.3f} vs {base:+.3f} MB/1k",
                goal="<= 1.2 x smallest (>= 1 MB)",
                met=yes(ok),
                notes="memory may not grow faster than the campaign; the smallest campaign's "
                "growth counts as at least 1 MB (noise)",
            )
        )

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        a = self.args
        work = Path(tempfile.mkdtemp(prefix="ced-bench-"))
        cleanup: list[Callable[[], None]] = []
        interrupted = False
        self.header = header(a)
        print(self.header, flush=True)
        try:
            if "credits" in self.want:
                self.guard("6", "Credit reservations", "redis", lambda: self.credits(work))
            if self.want - {"credits"}:
                self.sink = Sink()
                cleanup.append(self.sink.stop)
                for i, spec in enumerate(a.databases):
                    folder = work / f"db{i}"
                    folder.mkdir()
                    self.database(spec, folder, cleanup)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: stopping every process ...", flush=True)
        finally:
            for step in reversed(cleanup):
                with contextlib.suppress(Exception):
                    step()
            shutil.rmtree(work, ignore_errors=True)
        self.report(interrupted)
        return 130 if interrupted else 0

    def report(self, interrupted: bool) -> None:
        self.settle(self.ceiling)
        title = "## Benchmark results" + (" (INTERRUPTED: partial)" if interrupted else "")
        load = os.getloadavg()
        text = "\n".join(
            [
                title,
                "",
                self.header,
                f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
                f"{time.monotonic() - self.t0:,.0f} s in all.",
                "",
                markdown(sorted(self.rows, key=_section)) if self.rows else "(no figure measured)",
                "",
            ]
        )
        print("\n" + text, flush=True)
        if not interrupted and self.rows:
            self.args.results.parent.mkdir(parents=True, exist_ok=True)
            self.args.results.write_text(text)
            print(f"(written to {self.args.results})", flush=True)


def _section(row: Row) -> str:
    """Rows in section order (1 to 6), databases in the order they ran within a section."""
    return row.section if row.section[:1].isdigit() else "9"


def header(args: argparse.Namespace) -> str:
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    load = os.getloadavg()
    options = " ".join(sys.argv[1:]) or "(defaults)"
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {commit or '?'}, "
        f"os.cpu_count() = {os.cpu_count()}, load average at the start {load[0]:.2f}; "
        f"options: {options}"
    )


def _interrupt(signum: int, frame: FrameType | None) -> Any:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started ignoring it
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    return Bench(args).run()


#: Seconds of a latency run summarised together.
SPAN = 10.0


def spans(due: dict[str, float], arrivals: dict[str, float]) -> str:
    """The p99 latency of the sends due in each ``SPAN`` seconds of the run, in order (ms;
    ``inf``: one of them never arrived)."""
    if not due:
        return "-"
    first = min(due.values())
    buckets: dict[int, list[float]] = {}
    for k, at in due.items():
        lat = (arrivals[k] - at) * 1000 if k in arrivals else math.inf
        buckets.setdefault(int((at - first) // SPAN), []).append(lat)
    worst = [percentile(sorted(v), 0.99) for _, v in sorted(buckets.items())]
    return ", ".join("inf" if math.isinf(w) else f"{w:,.0f}" for w in worst)


def split(due: dict[str, float], answered: dict[str, float], arrivals: dict[str, float]) -> str:
    """Where the latency goes: p50/p99 from when a send was due to the API's 202 (the
    client's lag and the API), and from the 202 to arrival at the sink (queue, worker,
    relay), over the sends that arrived."""
    keys = [k for k in due if k in answered and k in arrivals]
    if not keys:
        return "no send was both answered and arrived"
    api = sorted((answered[k] - due[k]) * 1000 for k in keys)
    rest = sorted((arrivals[k] - answered[k]) * 1000 for k in keys)
    return (
        f"due to 202: p50 {percentile(api, 0.5):,.0f} ms, p99 {percentile(api, 0.99):,.0f} ms; "
        f"202 to the sink: p50 {percentile(rest, 0.5):,.0f} ms, "
        f"p99 {percentile(rest, 0.99):,.0f} ms"
    )


def _group_rate(sink: Sink, tag: str) -> float:
    """Messages per second of one tag's group at the sink, first to last arrival."""
    count, first, last = sink.count(tag), sink.first(tag), sink.last(tag)
    return count / (last - first) if count > 1 and last > first else math.nan
