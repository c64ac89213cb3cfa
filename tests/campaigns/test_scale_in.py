"""Scaling a campaign pool in: two campaign worker nodes started as the ``Procfile`` starts them
(prefork, distinct node names) share one database, one broker and one SMTP server, and one of
them is stopped mid-campaign. Told to stop (SIGTERM, what Kubernetes, Heroku or an autoscaler
sends) it hands its chunks back between batches and exits within seconds; killed (SIGKILL) its
recipients come back by their leases and DATA marks. Either way the campaign completes on the
other node, nobody gets a copy twice and credits used are exactly what was sent (I1, I2, I4)."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.devsmtp import Action, DevSMTPServer, Received
from devstack.processes import Child
from dispatcher.campaigns import control, create
from dispatcher.campaigns.run import deliver as deliver_chunk
from dispatcher.errors import Yielded
from dispatcher.models import CampaignStatus
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests import crashkit
from tests.helpers import campaign_request, make_user, reserved_attempts

#: Tests with real worker processes.
processes = pytest.mark.timeout(180)

USER = "scale-agent"
RECIPIENTS = 4000  # 8 chunks of 500: each node's two pool processes run one at a time
GRANT = 5000
CONCURRENCY = 2  # the Procfile's CAMPAIGN_CONCURRENCY
SMTP_DELAY = 0.02  # seconds the SMTP server takes over each final dot
STOP_AT = 800  # messages the SMTP server has received when one node is stopped
EXIT_BOUND = 10.0  # seconds a node told to stop may take to exit (platforms SIGKILL after 30)
PHASE_LIMIT = 90.0  # seconds the campaign may take before the test fails with a diagnosis


def _address(i: int) -> str:
    return f"person{i}@example.org"  # as crashkit.start_campaign names its recipients


@dataclass
class Stopped:
    """One node stopped mid-campaign, and what followed."""

    node: str
    signalled_after: int  # messages the server had received
    exit_code: int | None
    exit_seconds: float  # from the signal to the node's exit
    complete_seconds: float  # from the signal to the campaign's completion
    view: control.CampaignView
    audit: crashkit.Audit
    per_address: Counter[str]
    chunks_run: dict[str, int]  # node -> chunk tasks it received
    handed_back: int  # chunks the stopped node handed back


_RECEIVED = re.compile(r"Task dispatcher\.send_campaign_chunk\[[^\]]+\] received")
_HANDED_BACK = re.compile(r"send_campaign_chunk \S+ handed back: the worker is stopping")


def _chunks_run(child: Child) -> int:
    return len(_RECEIVED.findall(child.log_path.read_text("utf-8", "replace")))


def _handed_back(child: Child) -> int:
    return len(_HANDED_BACK.findall(child.log_path.read_text("utf-8", "replace")))


def _stop_one_node_mid_campaign(
    settings: Settings, server: DevSMTPServer, folder: Path, sig: signal.Signals, *, group: bool
) -> Stopped:
    server.handler.fault = crashkit.slow_relay(SMTP_DELAY)
    with crashkit.Stack(settings, folder) as stack:
        # Given two campaign nodes, campaign1@ and campaign2@, as the Procfile starts them
        for _ in range(2):
            stack.workers.start(pool="prefork", concurrency=CONCURRENCY, isolated=False)
        stack.workers.wait_ready(2)
        nodes = list(stack.workers.children)
        make_user(stack.rt, USER)
        # Beat's first sweep marks this Redis as seen, so it re-enqueues nothing later: the
        # chunks a stopped node leaves can come back only by what that node itself does.
        stack.beat.tick()
        cid = crashkit.start_campaign(stack.rt, USER, RECIPIENTS)
        progress = crashkit.Progress()
        # When one of them is signalled once sending is well under way
        while len(server.messages) < STOP_AT:
            view = control.view(stack.rt, cid)
            assert view.status == "running", f"campaign ended {view.status} before the stop"
            stack.workers.check_none_died()
            crashkit.check_time_left(stack, progress, cid, view, PHASE_LIMIT)
            time.sleep(0.02)
        victim = nodes[0]
        signalled_after = len(server.messages)
        stack.workers.signal(victim, sig, group=group)
        signalled = time.monotonic()
        exit_seconds: float | None = None
        print(f"  {sig.name} to {victim.name} after {signalled_after} messages", flush=True)
        # Then the campaign completes on the other node
        while (view := control.view(stack.rt, cid)).status == "running":
            if exit_seconds is None and not victim.alive():
                exit_seconds = time.monotonic() - signalled
            progress.log(view, len(server.messages), f"{victim.name} alive={victim.alive()}")
            stack.workers.check_none_died()
            stack.beat.tick()
            crashkit.check_time_left(stack, progress, cid, view, PHASE_LIMIT)
            time.sleep(0.05)
        complete_seconds = time.monotonic() - signalled
        while exit_seconds is None:
            if not victim.alive():
                exit_seconds = time.monotonic() - signalled
            elif time.monotonic() - signalled > PHASE_LIMIT:
                raise AssertionError(
                    f"{victim.name} still running {PHASE_LIMIT:.0f}s after {sig.name}:\n"
                    + crashkit.tail(victim.log_path, 60)
                )
            time.sleep(0.05)
        exit_code = victim.returncode()
        stack.workers.stop_all()
        result = crashkit.audit(stack.rt, cid, USER, server)
        chunks_run = {c.name: _chunks_run(c) for c in nodes}
        handed_back = _handed_back(victim)
    per_address = Counter(rcpt for m in server.messages for rcpt in m.rcpt_tos)
    stopped = Stopped(
        victim.name,
        signalled_after,
        exit_code,
        exit_seconds,
        complete_seconds,
        view,
        result,
        per_address,
        chunks_run,
        handed_back,
    )
    print(
        f"{sig.name}{' (group)' if group else ''}: {RECIPIENTS} recipients, "
        f"stopped {victim.name} after {signalled_after} messages; it exited with "
        f"{exit_code} in {exit_seconds:.1f}s, the campaign completed {complete_seconds:.1f}s "
        f"after the signal; sent={result.sent} unknown={result.unknown} failed={result.failed} "
        f"received={sum(per_address.values())} addresses={len(per_address)} "
        f"duplicates={sum(n - 1 for n in per_address.values() if n > 1)}, credits used "
        f"Redis {result.redis_used} ledger {result.ledger_used}; chunk tasks {chunks_run}, "
        f"handed back {handed_back}",
        flush=True,
    )
    return stopped


@pytest.fixture
def long_timings(settings: Settings) -> Settings:
    """Production's time limit, lease and visibility timeout: work a stopped node abandoned
    would come back only after minutes, so a campaign that completes within seconds proves
    the node handed its chunks back itself."""
    return crashkit.crash_settings(
        settings,
        free_plan_credits=GRANT,
        campaign_chunk_size=500,
        task_time_limit=240,
        send_lease_seconds=300,
        visibility_timeout=3600,
    )


def test_a_chunk_of_a_worker_told_to_stop_stops_between_messages_and_gives_the_rest_back(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    # Given a chunk of 60 recipients on 3 SMTP connections
    rt = make_runtime(campaign_chunk_size=60, smtp_pool_size=3)
    stopping = threading.Event()
    rt.stopping = stopping
    make_user(rt)
    view, _ = create.create(rt, campaign_request(60))

    # When the worker is told to stop as the fifth message is in DATA
    def fault(stage: str, _r: Received) -> Action | None:
        if stage == "data" and smtp_server.handler.attempts >= 5:
            stopping.set()
        return None

    smtp_server.handler.fault = fault
    with pytest.raises(Yielded) as held:
        deliver_chunk(rt, f"{view.id}:0")

    # Then the messages under way finish, no other starts, and the rest are reserved again,
    # not an attempt
    assert held.value.reason == "chunk_yield"
    after = control.view(rt, view.id)
    sent = after.counts["sent"]
    assert 5 <= sent <= 5 + 2, sent  # the other connections' messages in conversation
    assert (after.counts["reserved"], after.counts["sending"], after.counts["unknown"]) == (
        60 - sent,
        0,
        0,
    )
    assert reserved_attempts(rt, view.id) == {0}
    assert len(smtp_server.messages) == sent
    # And the next run (another worker) sends the rest, each once
    smtp_server.handler.fault = None
    stopping.clear()
    assert deliver_chunk(rt, f"{view.id}:0") is CampaignStatus.COMPLETED
    per_address = Counter(rcpt for m in smtp_server.messages for rcpt in m.rcpt_tos)
    assert len(per_address) == 60 and set(per_address.values()) == {1}


def test_a_chunk_started_on_a_stopping_worker_sends_nothing_and_is_handed_back(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    rt = make_runtime(campaign_chunk_size=20)
    stopping = threading.Event()
    stopping.set()
    rt.stopping = stopping
    make_user(rt)
    view, _ = create.create(rt, campaign_request(20))
    with pytest.raises(Yielded):
        deliver_chunk(rt, f"{view.id}:0")
    assert control.view(rt, view.id).counts["reserved"] == 20
    assert smtp_server.messages == []


@processes
@pytest.mark.slow
@pytest.mark.parametrize(
    ("group", "database_url"),
    [(False, "sqlite"), (True, "postgresql")],
    ids=["main-process", "process-group"],
    indirect=["database_url"],
)
def test_a_node_told_to_stop_mid_campaign_hands_its_chunks_back_and_nobody_is_lost_or_doubled(
    long_timings: Settings, smtp_server: DevSMTPServer, tmp_path: Path, group: bool
) -> None:
    run = _stop_one_node_mid_campaign(
        long_timings, smtp_server, tmp_path, signal.SIGTERM, group=group
    )
    _check_stopped_gracefully(run)


def _check_stopped_gracefully(run: Stopped) -> None:
    assert run.view.status == "completed", f"campaign ended {run.view.status}: {run.view.detail}"
    assert run.exit_code == 0, f"{run.node} exited with {run.exit_code}"
    # It stopped mid-chunk and handed the rest back, rather than finishing its chunks first
    assert run.handed_back >= 1, f"{run.node} handed no chunk back: {run.chunks_run}"
    assert run.exit_seconds < EXIT_BOUND, f"{run.node} took {run.exit_seconds:.1f}s to exit"
    # Every recipient received exactly once, all sent, and charged exactly once
    expected = {_address(i) for i in range(RECIPIENTS)}
    assert set(run.per_address) == expected, (
        f"missing {sorted(expected - set(run.per_address))[:10]}, "
        f"foreign {sorted(set(run.per_address) - expected)[:10]}"
    )
    twice = {a: n for a, n in run.per_address.items() if n != 1}
    assert not twice, f"{len(twice)} addresses received more than once: {list(twice.items())[:10]}"
    violations = crashkit.violations(run.audit, GRANT, unknown_bound=0)
    assert not violations, "\n".join(violations)
    assert run.audit.sent == run.audit.redis_used == run.audit.ledger_used == RECIPIENTS


@pytest.fixture
def short_timings(settings: Settings) -> Settings:
    """Timings like the crash tests' (lease 10 s, visibility timeout 15 s): a killed node's
    work comes back within seconds. The time limit leaves a prefork chunk 4 s before it
    yields and 6 s before its soft time limit."""
    return crashkit.crash_settings(
        settings,
        free_plan_credits=GRANT,
        campaign_chunk_size=500,
        task_time_limit=8,
        send_lease_seconds=10,
        visibility_timeout=15,
    )


@processes
@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_node_killed_mid_campaign_leaves_no_duplicate_and_exact_credits(
    short_timings: Settings, smtp_server: DevSMTPServer, tmp_path: Path
) -> None:
    run = _stop_one_node_mid_campaign(
        short_timings, smtp_server, tmp_path, signal.SIGKILL, group=True
    )
    assert run.view.status == "completed", f"campaign ended {run.view.status}: {run.view.detail}"
    assert run.exit_code == -signal.SIGKILL, run.exit_code
    # Only messages in DATA when the node died may be unknown: one per SMTP connection it had
    bound = short_timings.smtp_pool_size * CONCURRENCY
    violations = crashkit.violations(run.audit, GRANT, unknown_bound=bound)
    assert not violations, "\n".join(violations)
    twice = {a: n for a, n in run.per_address.items() if n != 1}
    assert not twice, f"{len(twice)} addresses received more than once: {list(twice.items())[:10]}"
    # Every address arrived, but those of unknown recipients the server never got
    missing = RECIPIENTS - len(run.per_address)
    assert missing == run.audit.unknown_not_received, (missing, run.audit)
    charged = run.audit.sent + run.audit.unknown
    assert run.audit.redis_used == run.audit.ledger_used == charged
