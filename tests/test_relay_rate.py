"""The relay's rate limit holds at the relay itself: four real worker processes send one
campaign as fast as they may, and the SMTP server counts what reaches it in every second."""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from dispatcher.devsmtp import DevSMTPServer, Received
from dispatcher.models import CampaignStatus
from dispatcher.settings import Settings
from tests.crashkit import Stack, crash_settings, start_campaign
from tests.helpers import make_user, wait_for

PER_SECOND = 20
WINDOW = 20.0  # seconds the limit is watched over, at full demand
RECIPIENTS = 440  # more than 20 s of the limit: the workers always want more than it allows
WORKERS = 4


@pytest.mark.timeout(180)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # Redis does the limiting
def test_n_per_second_holds_exactly_across_four_worker_processes(
    settings: Settings, smtp_server: DevSMTPServer, tmp_path: Path
) -> None:
    arrivals: list[float] = []
    lock = threading.Lock()

    def stamp(stage: str, _got: Received) -> None:
        # RCPT follows MAIL at once: the moment the relay starts taking a message.
        if stage == "rcpt":
            with lock:
                arrivals.append(time.time())

    smtp_server.handler.fault = stamp
    s = crash_settings(
        settings,
        smtp_rate_per_second=PER_SECOND,
        campaign_chunk_size=20,
        smtp_pool_size=4,
        visibility_timeout=120,
        task_time_limit=60,
        send_lease_seconds=90,
    )
    with Stack(s, tmp_path) as stack:
        make_user(stack.rt, "agent-1", plan="10k")
        for _ in range(WORKERS):
            stack.workers.start()
        stack.workers.wait_ready(WORKERS, timeout=60)
        campaign_id = start_campaign(stack.rt, "agent-1", RECIPIENTS)

        def done() -> bool:
            stack.workers.check_none_died()
            from dispatcher.campaigns import view

            return view(stack.rt, campaign_id).status == CampaignStatus.COMPLETED.value

        wait_for(done, timeout=120, what="campaign completed")
        logs = [c.log_path.read_text(errors="replace") for c in stack.workers.children]

    # Every recipient once.
    ids = Counter(m.message_id for m in smtp_server.messages)
    assert len(ids) == RECIPIENTS and max(ids.values()) == 1
    # All four processes took part.
    busy = [log.count("succeeded in") for log in logs]
    assert all(n > 0 for n in busy), busy

    # The relay never saw more than N in any one-second window...
    arrivals.sort()
    assert len(arrivals) == RECIPIENTS
    worst = max(bisect.bisect_left(arrivals, t + 1.0) - i for i, t in enumerate(arrivals))
    assert worst <= PER_SECOND, f"{worst} messages reached the relay within one second"
    # ...over a long enough stretch of full demand, and the limit was used, not starved.
    start = arrivals[0]
    assert arrivals[-1] - start >= WINDOW
    in_window = bisect.bisect_left(arrivals, start + WINDOW)
    assert in_window >= 0.8 * PER_SECOND * WINDOW, in_window
    print(
        f"\n{len(arrivals)} messages over {arrivals[-1] - start:.1f}s, "
        f"{in_window} in the first {WINDOW:.0f}s (limit {PER_SECOND}/s), "
        f"busiest second {worst}, tasks per worker {busy}"
    )
