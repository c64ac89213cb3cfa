"""The relay's rate limit holds at the relay itself: four real worker processes, frozen all
at once now and then, send one campaign as fast as they may, and the SMTP server (a process
of its own) counts what reaches it in every second."""

from __future__ import annotations

import bisect
import multiprocessing as mp
import multiprocessing.queues
import multiprocessing.synchronize
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from devstack.devsmtp import DevSMTPServer
from dispatcher.delivery.ratelimit import LAG_MARGIN, RateLimit, RelayRateLimiter
from dispatcher.delivery.relay import relay_id
from dispatcher.models import CampaignStatus
from dispatcher.settings import Settings
from tests.crashkit import Stack, crash_settings, start_campaign
from tests.helpers import make_user, wait_for

PER_SECOND = 20
WINDOW = 12.0  # seconds the limit is watched over, at full demand
RECIPIENTS = 280  # more than 12 s of the limit: the workers always want more than it allows
WORKERS = 4
STALL_EVERY = 3.0  # seconds between freezes of every worker process...
STALL_FOR = 0.6  # ...for this long (SIGSTOP, then SIGCONT), messages in flight or not


class Relay:
    """The SMTP server in a process of its own, as a relay is on a host of its own: the test
    process's pauses (its garbage collector, its threads) must not bunch the arrivals the
    relay stamps."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._started: mp.queues.Queue[int] = ctx.Queue()
        self._results: mp.queues.Queue[tuple[list[str], list[float]]] = ctx.Queue()
        self._stop = ctx.Event()
        self._process = ctx.Process(
            target=_serve, args=(self._started, self._stop, self._results), daemon=True
        )
        self._process.start()
        self.port = self._started.get(timeout=30)

    def finish(self) -> tuple[list[str], list[float]]:
        """Stop the server; the Message-IDs it accepted and when it read each MAIL."""
        self._stop.set()
        return self._results.get(timeout=30)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


def _serve(
    started: mp.queues.Queue[int],
    stop: mp.synchronize.Event,
    results: mp.queues.Queue[tuple[list[str], list[float]]],
) -> None:
    server = DevSMTPServer()
    started.put(server.start())
    stop.wait()
    server.stop()
    results.put(([m.message_id for m in server.messages], list(server.handler.mail_at)))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # Redis does the limiting
def test_n_per_second_holds_exactly_across_four_worker_processes(
    settings: Settings, tmp_path: Path
) -> None:
    relay = Relay()
    s = crash_settings(
        settings,
        smtp_port=relay.port,
        smtp_rate_per_second=PER_SECOND,
        smtp_rate_per_hour=100_000,  # never reached; its log keeps every admission to read
        campaign_chunk_size=20,
        smtp_pool_size=4,
        visibility_timeout=120,
        task_time_limit=60,
        send_lease_seconds=90,
    )
    stop = threading.Event()
    with relay, Stack(s, tmp_path) as stack:
        make_user(stack.rt, "agent-1", plan="10k")
        for _ in range(WORKERS):
            stack.workers.start()
        stack.workers.wait_ready(WORKERS, timeout=60)
        campaign_id = start_campaign(stack.rt, "agent-1", RECIPIENTS)
        stalls = threading.Thread(target=stall_now_and_then, args=(stack, stop), daemon=True)
        stalls.start()

        def done() -> bool:
            stack.workers.check_none_died()
            from dispatcher.campaigns.control import view

            return view(stack.rt, campaign_id).status == CampaignStatus.COMPLETED.value

        try:
            wait_for(done, timeout=120, what="campaign completed")
        finally:
            stop.set()
            stalls.join()
        logs = [c.log_path.read_text(errors="replace") for c in stack.workers.children]
        limiter = RelayRateLimiter(
            stack.rt.redis, relay_id(s.smtp_host, s.smtp_port), RateLimit.from_settings(s)
        )
        admitted = limiter.admitted(0, time.time() + 60)
        message_ids, mail_at = relay.finish()

    # Every recipient once.
    ids = Counter(message_ids)
    assert len(ids) == RECIPIENTS and max(ids.values()) == 1
    # All four processes took part.
    busy = [log.count("succeeded in") for log in logs]
    assert all(n > 0 for n in busy), busy

    # The limiter admitted at most N in any window of a second plus its margin...
    assert len(admitted) >= RECIPIENTS
    assert most_in_any_window(admitted, 1.0 + LAG_MARGIN) <= PER_SECOND
    # ...and the relay never saw more than N in any one-second window (counting each message
    # when its MAIL command was read) among the messages whose lag from admission to the relay
    # stayed under the limiter's margin, the condition the guarantee is documented under. A
    # message that lagged longer was held up by the host (the relay's process shares 2 cores
    # with four workers and this test, and a loaded host can stall any of them past the fence
    # of `RelayRateLimiter.acquire`); such messages must stay rare.
    arrivals = sorted(mail_at)
    assert len(arrivals) == RECIPIENTS
    gaps = message_lags(admitted, arrivals)
    assert max(gaps) < float("inf"), (
        f"a message reached the relay unadmitted; {lags(admitted, arrivals)}"
    )
    assert sorted(gaps)[len(gaps) // 2] < LAG_MARGIN / 2, lags(admitted, arrivals)
    on_time = [t for t, gap in zip(arrivals, gaps, strict=True) if gap <= LAG_MARGIN]
    assert len(arrivals) - len(on_time) <= RECIPIENTS // 10, lags(admitted, arrivals)
    worst = most_in_any_window(on_time, 1.0)
    assert worst <= PER_SECOND, (
        f"{worst} messages reached the relay within one second; {lags(admitted, arrivals)}"
    )
    # ...over a long enough stretch of full demand, and the limit was used, not starved.
    start = arrivals[0]
    assert arrivals[-1] - start >= WINDOW
    in_window = bisect.bisect_left(arrivals, start + WINDOW)
    awake = STALL_EVERY / (STALL_EVERY + STALL_FOR)  # the share of the time workers run
    assert in_window >= 0.8 * PER_SECOND * WINDOW * awake, in_window
    print(
        f"\n{len(arrivals)} messages over {arrivals[-1] - start:.1f}s, "
        f"{in_window} in the first {WINDOW:.0f}s (limit {PER_SECOND}/s), "
        f"busiest second {worst}, tasks per worker {busy}; admission to relay: "
        f"{lags(admitted, arrivals)}"
    )


def most_in_any_window(stamps: list[float], window: float) -> int:
    """The most stamps in any [t, t + window) that starts at a stamp t."""
    ordered = sorted(stamps)
    return max(
        (bisect.bisect_left(ordered, t + window) - i for i, t in enumerate(ordered)), default=0
    )


def message_lags(admitted: list[float], arrivals: list[float]) -> list[float]:
    """The lag from admission to the relay of each arrival, in the order of ``arrivals``
    (sorted).

    Which admission a message used is not recorded, and not every admission became a message:
    one that went stale before its MAIL was written is left to count and its message asks
    again (see ``RelayRateLimiter.acquire``). So each arrival, from the last back, is paired
    with the latest admission not after it that no later arrival took: the pairing in order
    with the smallest lags the two logs allow. An arrival with no admission before it (a
    message the limiter never admitted) has an infinite lag.
    """
    ordered = sorted(admitted)
    free = len(ordered)  # admissions [0, free) are not yet paired
    gaps: list[float] = []
    for arrival in reversed(arrivals):
        j = bisect.bisect_right(ordered, arrival, 0, free) - 1
        if j < 0:
            gaps.append(float("inf"))
            continue
        gaps.append(arrival - ordered[j])
        free = j
    return gaps[::-1]


def lags(admitted: list[float], arrivals: list[float]) -> str:
    """The median and largest lags from admission to the relay, and how many lagged past the
    margin (a diagnosis)."""
    gaps = sorted(message_lags(admitted, arrivals))
    late = sum(gap > LAG_MARGIN for gap in gaps)
    stale = len(admitted) - len(arrivals)
    return (
        f"median {gaps[len(gaps) // 2]:.3f}s, largest {[round(g, 3) for g in gaps[-5:]]}, "
        f"{late} over the margin, {stale} admissions not sent"
    )


def stall_now_and_then(stack: Stack, stop: threading.Event) -> None:
    """Freeze all worker processes at once now and then, as a busy host does: admissions they
    got just before a freeze are stale when they wake, and must not reach the relay together
    with the admissions of the next second."""
    while not stop.wait(STALL_EVERY):
        for child in stack.workers.children:
            os.killpg(child.pid, signal.SIGSTOP)
        time.sleep(STALL_FOR)
        for child in stack.workers.children:
            os.killpg(child.pid, signal.SIGCONT)
