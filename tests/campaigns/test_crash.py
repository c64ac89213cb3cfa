"""Crash safety of Command Email campaigns against real processes: campaign workers SIGKILLed at
random moments, and Redis (broker, credit counters, reservations) killed and restarted empty in
the middle of a campaign. Every recipient still ends in exactly one outcome, nobody gets a copy
twice, and credits used are exactly the sent and unknown recipients (I1, I2, I4, I5)."""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.devsmtp import DevSMTPServer
from dispatcher.campaigns import control, create
from dispatcher.credits.ledger import snapshot
from dispatcher.credits.subscriptions import credits, ensure_current
from dispatcher.settings import Settings
from tests import crashkit
from tests.helpers import make_user
from workers.app import CAMPAIGN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

USER = "crash-agent"
RECIPIENTS = 5000
GRANT = 6000  # the free plan's credits here: room for the campaign, and a margin to overspend
SMTP_DELAY = 0.05  # seconds the SMTP server takes over each final dot
KILLS = 12  # planned; at least 10 must land while the campaign runs
WORKERS = 3
PHASE_LIMIT = 150.0  # seconds a phase may take before the test fails with a diagnosis


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return crashkit.crash_settings(settings, free_plan_credits=GRANT)


@dataclass(frozen=True)
class Kill:
    at: float  # seconds into the campaign
    worker: str
    exit_code: int | None
    open_before: int  # recipients still open just before the kill
    leased_before: int  # of which held under a lease (mid-conversation somewhere)


def _received(server: DevSMTPServer) -> int:
    return len(server.messages)


def _check_audit(result: crashkit.Audit) -> None:
    """The invariants every crash test proves, with the offending recipients named."""
    assert result.recipients == RECIPIENTS
    assert not result.not_terminal, (
        f"{len(result.not_terminal)} recipients have no terminal status: {result.not_terminal[:10]}"
    )
    assert not result.event_problems, (
        f"{len(result.event_problems)} recipients lack exactly one terminal timeline event "
        f"matching their status: {result.event_problems[:10]}"
    )
    assert not result.received_twice, (
        f"the SMTP server took {len(result.received_twice)} Message-IDs more than once: "
        f"{list(result.received_twice.items())[:10]}"
    )
    assert not result.sent_not_received, (
        f"{len(result.sent_not_received)} recipients are 'sent' but the server never got "
        f"their message: {result.sent_not_received[:10]}"
    )
    assert not result.failed_but_received, (
        f"{len(result.failed_but_received)} recipients are 'failed' (credit returned) but the "
        f"server got their message: {result.failed_but_received[:10]}"
    )
    assert not result.foreign, f"the server got messages of no recipient: {result.foreign[:5]}"
    charged = result.sent + result.unknown
    assert (result.redis_used, result.redis_total) == (charged, GRANT), (
        f"Redis counts {result.redis_used} of {result.redis_total} credits used; "
        f"sent + unknown = {result.sent} + {result.unknown} = {charged} of {GRANT}"
    )
    assert (result.ledger_used, result.ledger_total) == (charged, GRANT), (
        f"the SQL ledger counts {result.ledger_used} of {result.ledger_total} credits used; "
        f"sent + unknown = {charged} of {GRANT}"
    )
    # Nothing here can make a recipient fail: the server accepts every message, and a worker
    # lost mid-conversation leaves its recipients `unknown`, never `failed`.
    assert not result.failed_by_reason, f"recipients failed: {dict(result.failed_by_reason)}"


def _summary(name: str, result: crashkit.Audit, seconds: float, extra: str) -> None:
    print(
        f"{name}: {seconds:.1f}s, sent={result.sent} unknown={result.unknown} "
        f"(delivered {result.unknown_received}, never delivered {result.unknown_not_received}) "
        f"failed={result.failed}, credits used {result.redis_used}/{result.redis_total}; {extra}",
        flush=True,
    )


def test_campaign_survives_random_sigkills(
    settings: Settings, smtp_server: DevSMTPServer, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    print(f"seed {seed} (CRASH_SEED={seed} replays the kill plan)", flush=True)
    smtp_server.handler.fault = crashkit.slow_relay(SMTP_DELAY)
    started = time.monotonic()
    with crashkit.Stack(settings, tmp_path) as stack:
        # Given three campaign workers and a 5,000-recipient campaign in 50 chunks
        for _ in range(WORKERS):
            stack.workers.start()
        stack.workers.wait_ready(WORKERS)
        make_user(stack.rt, USER)
        cid = crashkit.start_campaign(stack.rt, USER, RECIPIENTS)
        # When a random worker is SIGKILLed at random points of the campaign (a replacement
        # starting each time) and beat's sweeps run
        plan = sorted(rng.uniform(0.02, 0.75) for _ in range(KILLS))
        kills: list[Kill] = []
        last_kill = 0.0
        progress = crashkit.Progress()
        while True:
            view = control.view(stack.rt, cid)
            progress.log(view, _received(smtp_server), f"kills={len(kills)}")
            if view.status != "running":
                break
            stack.workers.check_none_died()
            stack.beat.tick()
            due = plan and view.progress >= plan[0]
            victims = stack.workers.ready()
            if due and victims and progress.elapsed() - last_kill >= 1.0:
                time.sleep(rng.uniform(0.0, 0.4))  # a random point of the conversation
                victim = rng.choice(victims)
                open_, leased = crashkit.open_and_leased(stack.rt, cid)
                code = stack.workers.kill(victim)
                kills.append(Kill(progress.elapsed(), victim.name, code, open_, leased))
                print(f"  killed {victim.name} ({open_} open, {leased} leased)", flush=True)
                stack.workers.start()
                plan.pop(0)
                last_kill = progress.elapsed()
            _check_time_left(stack, progress, cid, view)
            time.sleep(0.1)
        stack.workers.stop_all()
        result = crashkit.audit(stack.rt, cid, USER, smtp_server)
    seconds = time.monotonic() - started
    # Then the campaign completed, every recipient has one outcome and nobody got two copies
    assert view.status == "completed", f"campaign ended {view.status}: {view.detail}"
    mid_campaign = [k for k in kills if k.open_before > 0]
    assert all(k.exit_code == -signal.SIGKILL for k in kills), kills
    assert len(mid_campaign) >= 10, (
        f"only {len(mid_campaign)} kills landed while recipients were open (planned {KILLS}); "
        f"the campaign ran too fast to test crashes: slow the SMTP server down. {kills}"
    )
    _check_audit(result)
    assert result.unknown > 0, "no kill landed mid-conversation: nothing ended unknown"
    _summary(
        "sigkills",
        result,
        seconds,
        f"kills={len(kills)} (mid-campaign {len(mid_campaign)}, with leases held "
        f"{sum(1 for k in kills if k.leased_before)}), beat recovered {stack.beat.recovered}, "
        f"seed {seed}",
    )


def test_redis_restart_mid_campaign_completes_from_sql(
    settings: Settings, smtp_server: DevSMTPServer, tmp_path: Path
) -> None:
    smtp_server.handler.fault = crashkit.slow_relay(SMTP_DELAY)
    started = time.monotonic()
    with crashkit.RestartableRedis(tmp_path / "redis") as server:
        s = settings.with_overrides(redis_url=server.url)
        with crashkit.Stack(s, tmp_path) as stack:
            # Given a campaign running on three workers against a Redis without persistence
            for _ in range(WORKERS):
                stack.workers.start()
            stack.workers.wait_ready(WORKERS)
            make_user(stack.rt, USER)
            cid = crashkit.start_campaign(stack.rt, USER, RECIPIENTS)
            progress = crashkit.Progress()
            while (view := control.view(stack.rt, cid)).progress < 0.3:
                progress.log(view, _received(smtp_server))
                stack.workers.check_none_died()
                stack.beat.tick()
                assert view.status == "running", f"campaign ended {view.status} too early"
                assert progress.elapsed() < PHASE_LIMIT, f"campaign stuck before the crash: {view}"
                time.sleep(0.1)
            # When Redis is SIGKILLed and comes back empty on the same port
            _, ref = ensure_current(stack.rt, USER)
            waiting = stack.rt.redis.llen(CAMPAIGN)
            assert waiting > 0, "no chunk task was waiting in the broker: nothing to lose"
            assert server.kill() == -signal.SIGKILL
            time.sleep(0.3)  # down long enough for every worker to lose its connection
            server.start()
            at_crash = control.view(stack.rt, cid)
            recovered_before = stack.beat.recovered
            print(
                f"  redis killed and restarted at {at_crash.done} done, "
                f"{waiting} chunk tasks waiting in the broker lost",
                flush=True,
            )
            assert stack.rt.quota.state(ref) is None, "the restarted Redis still has the grant"
            # (a worker may publish a retry at once: fewer, not none)
            assert stack.rt.redis.llen(CAMPAIGN) < waiting, "the chunk tasks survived the crash"
            # Then the counters come back from the SQL ledger: the campaign's recipients are
            # still charged, so a campaign one larger than what is left is refused
            rebuilt = credits(stack.rt, USER)
            with stack.rt.sessions() as session:
                ledger = snapshot(session, ref)
            assert (rebuilt.used, rebuilt.total) == (ledger.used, GRANT), (rebuilt, ledger.used)
            assert rebuilt.used == RECIPIENTS - at_crash.counts["failed"]
            with pytest.raises(create.InsufficientCredits) as refused:
                crashkit.start_campaign(stack.rt, USER, rebuilt.remaining + 1)
            assert refused.value.remaining == rebuilt.remaining == GRANT - RECIPIENTS
            # And beat finds the chunks whose tasks were lost and the campaign completes
            while (view := control.view(stack.rt, cid)).status == "running":
                progress.log(view, _received(smtp_server), f"recovered={stack.beat.recovered}")
                stack.workers.check_none_died()
                stack.beat.tick()
                _check_time_left(stack, progress, cid, view)
                time.sleep(0.1)
            stack.workers.stop_all()
            result = crashkit.audit(stack.rt, cid, USER, smtp_server)
    seconds = time.monotonic() - started
    assert view.status == "completed", f"campaign ended {view.status}: {view.detail}"
    assert stack.beat.recovered > recovered_before, (
        "the campaign completed although beat never handed its lost chunks to the broker again"
    )
    _check_audit(result)
    assert result.redis_used <= GRANT
    # No worker died and the server never dropped a connection, so nothing was ambiguous: a
    # Redis error before the SMTP conversation must give the claimed recipients back.
    assert result.unknown == 0, (
        f"{result.unknown} recipients ended unknown ({result.unknown_not_received} of them never "
        "reached the server) although no worker died and no connection dropped"
    )
    _summary(
        "redis restart",
        result,
        seconds,
        f"done at crash {at_crash.done}, beat recovered {stack.beat.recovered}",
    )


def _check_time_left(
    stack: crashkit.Stack, progress: crashkit.Progress, cid: str, view: control.CampaignView
) -> None:
    """Fail, saying where the campaign stands, once a phase ran past PHASE_LIMIT."""
    if progress.elapsed() > PHASE_LIMIT:
        raise AssertionError(
            f"campaign not completed after {PHASE_LIMIT:.0f}s: {view}; "
            f"open chunks {control.open_chunks(stack.rt, cid)}; "
            f"beat recovered {stack.beat.recovered}" + stack.workers.logs()
        )
