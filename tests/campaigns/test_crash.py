"""Crash safety of Command Email campaigns against real processes: campaign workers SIGKILLed at
random moments, and Redis (broker, credit counters, reservations) killed and restarted empty in
the middle of a campaign. Every recipient still ends in exactly one outcome, nobody gets a copy
twice, and credits used are exactly the sent and unknown recipients (I1, I2, I4, I5)."""

from __future__ import annotations

import os
import random
import signal
import time
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
#: The Redis restart needs the campaign running when Redis dies, not the kill test's length.
RESTART_RECIPIENTS = 3000
GRANT = 6000  # the free plan's credits here: room for the campaign, and a margin to overspend
SMTP_DELAY = 0.05  # seconds the SMTP server takes over each final dot
KILLS = 12  # planned; at least 10 must land while the campaign runs
WORKERS = 3
PHASE_LIMIT = 150.0  # seconds a phase may take before the test fails with a diagnosis


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return crashkit.crash_settings(settings, free_plan_credits=GRANT)


def _received(server: DevSMTPServer) -> int:
    return len(server.messages)


def _check_audit(result: crashkit.Audit, recipients: int = RECIPIENTS) -> None:
    """The invariants every crash test proves, with the offending recipients named."""
    assert result.recipients == recipients
    violations = crashkit.violations(result, GRANT)
    assert not violations, "\n".join(violations)


def _summary(name: str, result: crashkit.Audit, seconds: float, extra: str) -> None:
    print(
        f"{name}: {seconds:.1f}s, sent={result.sent} unknown={result.unknown} "
        f"(delivered {result.unknown_received}, never delivered {result.unknown_not_received}) "
        f"failed={result.failed}, credits used {result.redis_used}/{result.redis_total}; {extra}",
        flush=True,
    )


# Each on one database (the suite's time): random kills on SQLite, whose file locks a killed
# writer must not leave held; PostgreSQL's kills are the two-node test's (test_scale_in.py).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_campaign_survives_random_sigkills(
    settings: Settings, smtp_server: DevSMTPServer, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(2**32))
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
        run = crashkit.run_with_kills(
            stack, smtp_server, cid, random.Random(seed), KILLS, PHASE_LIMIT
        )
        stack.workers.stop_all()
        result = crashkit.audit(stack.rt, cid, USER, smtp_server)
        sent_again = crashkit.sent_again(stack.workers)
    seconds = time.monotonic() - started
    # Then the campaign completed, every recipient has one outcome and nobody got two copies
    assert run.view.status == "completed", f"campaign ended {run.view.status}: {run.view.detail}"
    assert all(k.exit_code == -signal.SIGKILL for k in run.kills), run.kills
    assert len(run.landed) >= 10, (
        f"only {len(run.landed)} kills landed while recipients were open (planned {KILLS}); "
        f"the campaign ran too fast to test crashes: slow the SMTP server down. {run.kills}"
    )
    _check_audit(result)
    assert result.unknown > 0, "no kill landed mid-conversation: nothing ended unknown"
    # And only messages in DATA when their worker died are unknown: at most one per SMTP
    # connection of the killed process, per kill
    bound = crashkit.connections_per_worker(settings) * len(run.landed)
    assert result.unknown <= bound, (
        f"{result.unknown} recipients ended unknown ({result.unknown_not_received} of them never "
        f"reached the server), more than {bound}: {crashkit.connections_per_worker(settings)} "
        f"SMTP connections per worker x {len(run.landed)} kills"
    )
    _summary(
        "sigkills",
        result,
        seconds,
        f"kills={len(run.kills)} (mid-campaign {len(run.landed)}, with leases held "
        f"{sum(1 for k in run.kills if k.leased_before)}), unknown bound {bound}, "
        f"sent again after a kill {sent_again}, beat recovered {stack.beat.recovered}, "
        f"seed {seed}",
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
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
            cid = crashkit.start_campaign(stack.rt, USER, RESTART_RECIPIENTS)
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
            assert rebuilt.used == RESTART_RECIPIENTS - at_crash.counts["failed"]
            with pytest.raises(create.InsufficientCredits) as refused:
                crashkit.start_campaign(stack.rt, USER, rebuilt.remaining + 1)
            assert refused.value.remaining == rebuilt.remaining == GRANT - RESTART_RECIPIENTS
            # And beat finds the chunks whose tasks were lost and the campaign completes
            while (view := control.view(stack.rt, cid)).status == "running":
                progress.log(view, _received(smtp_server), f"recovered={stack.beat.recovered}")
                stack.workers.check_none_died()
                stack.beat.tick()
                crashkit.check_time_left(stack, progress, cid, view, PHASE_LIMIT)
                time.sleep(0.1)
            stack.workers.stop_all()
            result = crashkit.audit(stack.rt, cid, USER, smtp_server)
    seconds = time.monotonic() - started
    assert view.status == "completed", f"campaign ended {view.status}: {view.detail}"
    assert stack.beat.recovered > recovered_before, (
        "the campaign completed although beat never handed its lost chunks to the broker again"
    )
    _check_audit(result, RESTART_RECIPIENTS)
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
