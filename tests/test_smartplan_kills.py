"""Crash safety of SmartPlan steps delivered in batches (submitted together, or one by one and
batched by the worker's threads): the worker process is SIGKILLed while its batches talk to the
SMTP server, and a replacement started each time. Every step still ends
in exactly one outcome with one timeline event, nobody gets a copy twice, and credits used are
exactly the sent and unknown steps (I1, I2, I4)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer
from dispatcher.delivery.smartplan_batch import WAVES_AT_ONCE, wave_size
from dispatcher.models import Send, SendStatus
from dispatcher.sends import SubmitResult, submit_batch
from dispatcher.settings import Settings
from tests import crashkit
from tests.helpers import make_user, send_request
from workers.names import SMARTPLAN
from workers.queue import CeleryTaskQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

USER = "batch-crash-agent"
STEPS = 600
GRANT = 1000
KILLS = 3
THREADS = 4  # the worker's pool, as the Procfile runs it (threads)
SMTP_DELAY = 0.05  # seconds the SMTP server takes over each final dot
LIMIT = 120.0  # seconds the steps may take to settle after the last kill


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return crashkit.crash_settings(settings, free_plan_credits=GRANT, smartplan_batch_size=25)


class _OneByOne(CeleryTaskQueue):
    """Steps as a CRM posting ``POST /v1/sends`` one at a time leaves them: a task each."""

    def enqueue_sends(self, send_ids: Sequence[str]) -> None:
        self.publish_sends([(send_id, 0.0) for send_id in send_ids])


def _open(stack: crashkit.Stack) -> int:
    """Steps of the test's agent not settled yet."""
    with stack.rt.sessions() as session:
        statuses = session.scalars(select(Send.status).where(Send.user_id == USER)).all()
    return sum(1 for s in statuses if not s.terminal)


# One database (the suite's time): SQLite, whose file locks a killed writer must not leave held.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("submitted", ["together", "one_by_one"])
def test_smartplan_batches_survive_sigkills(
    settings: Settings, smtp_server: DevSMTPServer, tmp_path: Path, submitted: str
) -> None:
    smtp_server.handler.fault = crashkit.slow_relay(SMTP_DELAY)
    with crashkit.Stack(settings, tmp_path) as stack:
        # Given 600 steps submitted together (24 batch tasks), or one by one (600 tasks, which
        # the worker's threads batch), and one SmartPlan worker
        make_user(stack.rt, USER)
        requests = [send_request(USER, n, run_id=f"run-{n}") for n in range(STEPS)]
        queue = CeleryTaskQueue(stack.app) if submitted == "together" else _OneByOne(stack.app)
        answers = submit_batch(stack.rt, queue, requests)
        assert all(isinstance(a, SubmitResult) for a in answers)
        worker = stack.workers.start(SMARTPLAN, pool="threads", concurrency=THREADS)
        stack.workers.wait_ready(1)
        # When the worker is SIGKILLed three times while its batches talk to the server, a
        # replacement starting each time, and beat's sweeps run
        exits = []
        for k in range(KILLS):
            target = (k + 1) * STEPS // (KILLS + 2)
            deadline = time.monotonic() + LIMIT
            while len(smtp_server.messages) < target:
                assert time.monotonic() < deadline, f"stuck at {len(smtp_server.messages)}"
                stack.beat.tick()
                time.sleep(0.01)
            exits.append(stack.workers.kill(worker))
            worker = stack.workers.start(SMARTPLAN, pool="threads", concurrency=THREADS)
            stack.workers.wait_ready(1)
        deadline = time.monotonic() + LIMIT
        while _open(stack):
            assert time.monotonic() < deadline, f"{_open(stack)} steps still open" + (
                stack.workers.logs()
            )
            stack.workers.check_none_died()
            stack.beat.tick()
            time.sleep(0.2)
        stack.workers.stop_all()
        result = crashkit.audit_sends(
            stack.rt, Send.user_id == USER, USER, list(smtp_server.messages)
        )
    print(
        f"{submitted}: sent={result.sent} unknown={result.unknown} (delivered "
        f"{result.unknown_received}, never delivered {result.unknown_not_received}), credits "
        f"used {result.redis_used}; exits {exits}",
        flush=True,
    )
    # Then every step has one outcome and one event, nobody got two copies, every step not
    # unknown reached the server exactly once, and Redis and the ledger count sent + unknown
    assert exits == [-9] * KILLS
    assert result.recipients == STEPS
    violations = crashkit.violations(result, GRANT)
    assert not violations, "\n".join(violations)
    # Only the waves under way when a worker died are unknown: at most WAVES_AT_ONCE waves
    # per kill (the rest of each batch went on after it).
    bound = WAVES_AT_ONCE * wave_size(settings) * KILLS
    assert result.unknown <= bound, f"{result.unknown} unknown, more than {bound}"
    assert result.counts[SendStatus.SENT.value] + result.unknown == STEPS
