"""SmartPlan steps delivered as a batch: the same outcomes, credits and timeline as single
deliveries, against real Redis, databases and SMTP server; racing batches send nothing twice."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from devstack.devsmtp import DevSMTPServer, FaultPlan, reply, slow
from dispatcher import metrics
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import smartplan, suppression
from dispatcher.delivery.smartplan_batch import (
    WAVE_PER_CONNECTION,
    WAVES_AT_ONCE,
    Coalescer,
    deliver_batch,
    wave_size,
)
from dispatcher.errors import DeliveryDeferred, SendBusy
from dispatcher.models import SendStatus
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import get_send, submit_send
from tests.helpers import make_user, send_request, statuses, timeline_rows


def _submit(rt: Runtime, count: int, user: str = "agent-1") -> list[str]:
    queue = InlineQueue()
    return [submit_send(rt, queue, send_request(user, n)).send_id for n in range(count)]


def _received(server: DevSMTPServer) -> Counter[str]:
    return Counter(r for m in server.messages for r in m.rcpt_tos)


def test_a_batch_settles_each_send_as_a_single_delivery_would(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    """Ten steps, seven credits: one address suppressed (no credit), one refused (credit
    back), one deferred (handed back holding its credit), the last two past the grant."""
    rt = make_runtime(free_plan_credits=7)
    make_user(rt)
    ids = _submit(rt, 10)
    suppression.suppress(rt, "agent-1", "contact3@example.org")
    smtp_server.handler.fault = FaultPlan(
        by_recipient={
            "contact4@example.org": [reply("550 5.1.1 no such user")],
            "contact5@example.org": [reply("451 4.3.0 try later")],
        }
    )

    result = deliver_batch(rt, ids)

    status = {n: get_send(rt, ids[n]) for n in range(10)}
    assert {n: s.status for n, s in status.items()} == {
        0: "sent",
        1: "sent",
        2: "sent",
        3: "failed",
        4: "failed",
        5: "reserved",
        6: "sent",
        7: "sent",
        8: "failed",
        9: "failed",
    }
    assert [status[n].reason for n in (3, 4, 8, 9)] == [
        "suppressed",
        "hard_bounce",
        "quota_exhausted",
        "quota_exhausted",
    ]
    assert _received(smtp_server) == {f"contact{n}@example.org": 1 for n in (0, 1, 2, 6, 7)}
    [(deferred, wait)] = result.handed_back
    assert deferred == ids[5] and wait > 0
    assert sorted(result.settled) == sorted(ids[n] for n in (0, 1, 2, 3, 4, 6, 7, 8, 9))
    # Five sent and one held for its retry; the refusal's credit came back.
    assert credits(rt, "agent-1").used == 6
    kinds = Counter(e.kind.value for e in timeline_rows(rt, "agent-1"))
    assert kinds == {"email_sent": 5, "email_failed": 4}

    # The deferred step's retry is a single delivery on the credit it holds.
    assert smartplan.deliver(rt, ids[5]) is SendStatus.SENT
    assert credits(rt, "agent-1").used == 6
    # The batch delivered again (its task redelivered) sends nothing and hands every send on.
    again = deliver_batch(rt, ids)
    assert again.settled == {} and sorted(again.handed_back) == sorted((i, 0.0) for i in ids)
    assert sum(_received(smtp_server).values()) == 6


def test_a_batch_on_a_stopping_worker_hands_its_unstarted_steps_on(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    """Told to stop (SIGTERM), a batch starts no conversation: its steps, their credits taken,
    go on as single sends, each sent once for the one credit it holds."""
    make_user(runtime)
    ids = _submit(runtime, 5)
    runtime.stopping.set()  # type: ignore[attr-defined]
    try:
        result = deliver_batch(runtime, ids)
    finally:
        runtime.stopping.clear()  # type: ignore[attr-defined]
    assert result.settled == {} and sorted(result.handed_back) == sorted((i, 0.0) for i in ids)
    assert smtp_server.messages == [] and credits(runtime, "agent-1").used == 5
    assert {get_send(runtime, i).status for i in ids} == {"queued"}
    for send_id in ids:
        assert smartplan.deliver(runtime, send_id) is SendStatus.SENT
    assert _received(smtp_server) == {f"contact{n}@example.org": 1 for n in range(5)}
    assert credits(runtime, "agent-1").used == 5


def _race(rt: Runtime, ids: list[str], threads: int) -> set[str]:
    """Deliver the batch ``ids`` on ``threads`` threads released at once; the ids any of them
    handed on."""
    handed: set[str] = set()
    lock = threading.Lock()
    gate = threading.Barrier(threads)

    def run() -> None:
        gate.wait()
        back = deliver_batch(rt, ids).handed_back
        with lock:
            handed.update(i for i, _ in back)

    started = [threading.Thread(target=run) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return handed


@pytest.mark.slow
def test_racing_batches_of_the_same_steps_send_each_once_for_one_credit(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    """The same batch delivered on four threads at once (a redelivered task beside the
    first), five times: every step reaches the server once and costs one credit; what a
    batch handed on is finished by single deliveries."""
    rt = make_runtime(free_plan_credits=1000)
    for round_ in range(5):
        user = make_user(rt, f"racer-{round_}")
        ids = _submit(rt, 40, user)
        smtp_server.messages.clear()
        handed = _race(rt, ids, threads=4)
        for send_id in handed:
            try:
                smartplan.deliver(rt, send_id)
            except SendBusy:  # pragma: no cover - every conversation ended with its thread
                pytest.fail(f"send {send_id} still under a lease after the batches ended")
        assert {get_send(rt, i).status for i in ids} == {"sent"}, f"round {round_}"
        assert _received(smtp_server) == {f"contact{n}@example.org": 1 for n in range(40)}
        assert credits(rt, user).used == 40, f"round {round_}"


def test_a_step_coming_while_a_batch_talks_goes_in_a_second_batch_at_once(
    make_runtime: Callable[..., Runtime],
    smtp_server: DevSMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The process's default: two batches under way at once. A step whose task starts while
    the first step's slow conversation is under way reaches the server before it; then the
    steps of three more threads arriving while both batches are under way wait and go
    together. Each step reaches the server once, for one credit."""
    rt = make_runtime(free_plan_credits=100)
    make_user(rt)
    ids = _submit(rt, 5)
    smtp_server.handler.fault = FaultPlan(
        by_recipient={
            "contact0@example.org": [slow(1.0)],
            "contact1@example.org": [slow(0.5)],
        }
    )
    together = Coalescer(limit=50)
    results: dict[str, SendStatus] = {}

    def run(send_id: str) -> None:
        results[send_id] = together.deliver(rt, send_id)

    threads = [threading.Thread(target=run, args=(ids[0],))]
    threads[0].start()
    time.sleep(0.15)  # ids[0] alone, in its slow conversation
    threads.append(threading.Thread(target=run, args=(ids[1],)))
    threads[1].start()
    time.sleep(0.15)  # ids[1] alone in a second batch, in its conversation
    with caplog.at_level(logging.INFO, logger="dispatcher.delivery.smartplan_batch"):
        for send_id in ids[2:]:
            threads.append(threading.Thread(target=run, args=(send_id,)))
            threads[-1].start()
        for t in threads:
            t.join()

    assert results == {i: SendStatus.SENT for i in ids}
    arrived = [r for m in smtp_server.messages for r in m.rcpt_tos]
    assert arrived.index("contact1@example.org") < arrived.index("contact0@example.org")
    assert _received(smtp_server) == {f"contact{n}@example.org": 1 for n in range(5)}
    assert credits(rt, "agent-1").used == 5
    sizes = [int(m.split("sends=")[1].split()[0]) for m in caplog.messages if "sends=" in m]
    assert sorted(sizes) == [1, 1, 3]


def test_steps_delivered_at_the_same_moment_by_threads_go_as_one_batch(
    make_runtime: Callable[..., Runtime],
    smtp_server: DevSMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sixteen tasks' threads: the first step's conversation is slow, and the fifteen
    arriving meanwhile go as one batch after it. Each thread gets its own step's result: a
    deferral raised for its task's retry, an already sent step reported without a second
    message; every other step reaches the server once for one credit."""
    rt = make_runtime(free_plan_credits=100)
    make_user(rt)
    ids = _submit(rt, 16)
    assert smartplan.deliver(rt, ids[1]) is SendStatus.SENT  # its task is redelivered below
    smtp_server.handler.fault = FaultPlan(
        by_recipient={
            "contact0@example.org": [slow(0.5)],
            "contact2@example.org": [reply("451 4.3.0 try later")],
        }
    )
    together = Coalescer(limit=50, at_once=1)
    results: dict[str, object] = {}
    steps = metrics.SMARTPLAN_BATCH_STEPS.labels("threads")
    observed_before = _histogram(steps)

    def run(send_id: str) -> None:
        try:
            results[send_id] = together.deliver(rt, send_id)
        except DeliveryDeferred as exc:
            results[send_id] = exc

    first = threading.Thread(target=run, args=(ids[0],))
    first.start()
    time.sleep(0.15)  # the first batch (ids[0] alone) is in its slow conversation
    rest = [threading.Thread(target=run, args=(i,)) for i in ids[1:]]
    with caplog.at_level(logging.INFO, logger="dispatcher.delivery.smartplan_batch"):
        for t in rest:
            t.start()
        for t in [first, *rest]:
            t.join()

    assert isinstance(results.pop(ids[2]), DeliveryDeferred)
    assert set(results.values()) == {SendStatus.SENT} and len(results) == 15
    assert get_send(rt, ids[2]).status == "reserved"
    assert _received(smtp_server) == {f"contact{n}@example.org": 1 for n in range(16) if n != 2}
    assert credits(rt, "agent-1").used == 16  # the deferred step holds its credit
    sizes = [int(m.split("sends=")[1].split()[0]) for m in caplog.messages if "sends=" in m]
    assert sizes == [1, 15]
    # Ops see it too: two batches of the threads, 16 steps in all.
    count, total = _histogram(steps)
    assert (count - observed_before[0], total - observed_before[1]) == (2, 16)


def test_small_batch_tasks_delivered_at_the_same_moment_share_one_batch(
    make_runtime: Callable[..., Runtime],
    smtp_server: DevSMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Eight batch tasks of three steps each: the first one's conversation is slow, and the
    seven arriving meanwhile go after it three tasks to a batch (the limit, 10, counts
    steps), not a batch and waves each. Each task gets only its own steps' outcomes, one of
    them a deferral handed back with its wait; a task of the limit or more goes alone. Every
    other step reaches the server once."""
    rt = make_runtime(free_plan_credits=100)
    make_user(rt)
    ids = _submit(rt, 24 + 10)
    tasks = [ids[n : n + 3] for n in range(0, 24, 3)]
    big = ids[24:]
    smtp_server.handler.fault = FaultPlan(
        by_recipient={
            "contact0@example.org": [slow(0.5)],
            "contact4@example.org": [reply("451 4.3.0 try later")],
        }
    )
    together = Coalescer(limit=10)
    results: dict[int, Any] = {}

    def run(n: int, send_ids: list[str]) -> None:
        results[n] = together.deliver_many(rt, send_ids)

    first = threading.Thread(target=run, args=(0, tasks[0]))
    first.start()
    time.sleep(0.15)  # the first task's batch is in its slow conversation
    with caplog.at_level(logging.INFO, logger="dispatcher.delivery.smartplan_batch"):
        rest = [threading.Thread(target=run, args=(n, t)) for n, t in enumerate(tasks) if n]
        for t in rest:
            t.start()
        for t in [first, *rest]:
            t.join()
        alone = together.deliver_many(rt, big)

    sizes = [int(m.split("sends=")[1].split()[0]) for m in caplog.messages if "sends=" in m]
    assert sizes == [3, 9, 9, 3, 10]
    for n, send_ids in enumerate(tasks):
        mine = set(send_ids)
        r = results[n]
        assert set(r.settled) | {i for i, _ in r.handed_back} == mine
        assert set(r.held) <= mine
    assert [i for i, _ in results[1].handed_back] == [ids[4]]  # the deferred step, with its wait
    assert results[1].handed_back[0][1] > 0
    assert set(alone.settled) == set(big)
    assert _received(smtp_server) == {f"contact{n}@example.org": 1 for n in range(34) if n != 4}


def _histogram(child: Any) -> tuple[float, float]:
    """A histogram child's observation count and sum."""
    samples = {s.name: s.value for m in child.collect() for s in m.samples}
    return samples["dispatcher_smartplan_batch_steps_count"], samples[
        "dispatcher_smartplan_batch_steps_sum"
    ]


def test_a_process_has_at_most_waves_at_once_waves_under_way_whatever_its_threads(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    """Eight threads each deliver a batch of their own (two waves each) against a slow relay:
    no more than WAVES_AT_ONCE waves of steps (each WAVE_PER_CONNECTION x SMTP_POOL_SIZE) are
    ever ``sending`` (what a SIGKILL would leave ``unknown``), and every step is sent once."""
    rt = make_runtime(smtp_pool_size=2)
    wave = wave_size(rt.settings)
    assert wave == WAVE_PER_CONNECTION * 2
    make_user(rt)
    ids = _submit(rt, 16 * wave)
    smtp_server.handler.fault = lambda stage, got: slow(0.02) if stage == "data" else None
    batches = [ids[i::8] for i in range(8)]
    threads = [threading.Thread(target=deliver_batch, args=(rt, b)) for b in batches]
    most = 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        most = max(most, statuses(rt, "agent-1").get("sending", 0))
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert 0 < most <= WAVES_AT_ONCE * wave < 8 * wave, most  # a wave per thread: 64
    assert statuses(rt, "agent-1") == {"sent": 16 * wave}
    assert set(_received(smtp_server).values()) == {1} and len(_received(smtp_server)) == 16 * wave
