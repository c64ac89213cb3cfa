"""Worker side of many SmartPlan steps at once: the steps a batch submit enqueued together.

Each send goes through the very states, reservations and outcomes of a single delivery
(:mod:`dispatcher.delivery.smartplan`), with each state change made for the whole batch in one
statement and the conversations run side by side on the process's SMTP pool:

1. one read of the sends, their agents and the suppressed addresses among them;
2. suppressed and unrenderable sends settled at once, no credit taken;
3. the grant recorded on every send (one UPDATE per grant), then one reservation per send's
   key in Redis, all in one round trip (denied: ``quota_exhausted``);
4. in waves of :func:`wave_size` (:data:`WAVE_PER_CONNECTION` messages per connection of
   the process's SMTP pool, 32 with the default ``SMTP_POOL_SIZE`` of 8): the wave's sends
   ``sending`` under their lease in one UPDATE, their conversations side by side on the
   pool's connections, their outcomes settled in one call. A process has at most
   :data:`WAVES_AT_ONCE` (2) waves under way, however many of its threads run batches: a
   worker lost mid-batch leaves only those waves ``sending`` (``unknown`` once their lease
   runs out), the rest open for the next delivery.

A worker's threads deliver at the same moment as one batch (:class:`Coalescer`): the single
steps of single sends' tasks and the steps of small batch tasks (the few sends the API stored
together), so that they fill each other's waves.

Only fresh sends (``queued``, no grant recorded yet) take this path. Any other send (a retry,
one another delivery holds, one already settled) and every send that must wait (deferred,
held back by the relay's guard) is handed back to be delivered on its own, as a single send's
task, with the wait it needs: its retries follow the single send's rules exactly. A batch
redelivered after a crash therefore finds its sends where they stopped and hands each on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from dispatcher import metrics
from dispatcher.backoff import backoff, honouring
from dispatcher.credits import notices
from dispatcher.credits.subscriptions import ensure_current
from dispatcher.delivery import lifecycle, smartplan, suppression
from dispatcher.delivery.lifecycle import Outcome
from dispatcher.delivery.message import Envelope
from dispatcher.delivery.transports.base import Delivery
from dispatcher.errors import RenderError, TransientError
from dispatcher.groupcommit import GroupCommit
from dispatcher.models import Send, SendKind, SendStatus, User
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


#: A wave's messages per connection of the process's SMTP pool, sent one after another on
#: it. A wave's transactions (its sends ``sending``, then its outcomes) cost about the same
#: whatever its size: with a wave of one message per connection they took most of a step's
#: CPU. 10,000 queued steps (bench delivery section, SQLite, 2026-12-05): 810 msg/s with
#: four waves of 8 at once, 1,002 with two of 16, 1,139 with two of 32.
WAVE_PER_CONNECTION = 4
#: Waves a process has under way at once, whatever its threads (their conversations share
#: the process's SMTP pool, so a wave started sooner would only wait ``sending``): a lost
#: process leaves at most this many waves ``unknown``, not one per thread running a batch.
#: Two, so that a wave held up by a slow conversation does not hold up every step behind it.
WAVES_AT_ONCE = 2
_WAVES = threading.BoundedSemaphore(WAVES_AT_ONCE)
#: Batches a :class:`Coalescer` has under way at once: a step that comes while one batch is
#: under way starts at once in a second, instead of waiting for the first to be done.
BATCHES_AT_ONCE = 2


@dataclass
class BatchResult:
    """What a batch did: the sends it settled (with their status), and those handed back to
    be delivered on their own after the given seconds (0: at once); of these, ``held`` has
    the deferral or hold each one that must wait came back with."""

    settled: dict[str, SendStatus] = field(default_factory=dict)
    handed_back: list[tuple[str, float]] = field(default_factory=list)
    held: dict[str, TransientError] = field(default_factory=dict)

    def add(self, other: BatchResult) -> None:
        """Count what ``other`` (a part of this batch) did as done by this batch."""
        self.settled.update(other.settled)
        self.handed_back += other.handed_back
        self.held.update(other.held)

    def only(self, send_ids: Sequence[str]) -> BatchResult:
        """What the batch did with ``send_ids`` (a share of a batch that held more)."""
        mine = set(send_ids)
        return BatchResult(
            settled={i: s for i, s in self.settled.items() if i in mine},
            handed_back=[(i, wait) for i, wait in self.handed_back if i in mine],
            held={i: e for i, e in self.held.items() if i in mine},
        )


@dataclass(frozen=True)
class _Ready:
    """A fresh send rendered and ready for its credit."""

    send: Send
    user: User
    subject: str
    message: bytes
    mail_from: str


def deliver_batch(rt: Runtime, send_ids: Sequence[str]) -> BatchResult:
    """Deliver ``send_ids`` as far as they can go now (see the module); what cannot go on in
    the batch is handed back, never dropped."""
    now = rt.clock.now()
    result = BatchResult()
    sends, users, suppressed = _load(rt, send_ids, now)
    missing = [i for i in send_ids if i not in sends]
    if missing:
        log.error("SmartPlan batch: %d sends not found, dropped: %s", len(missing), missing[:5])
    closed: list[Outcome] = []  # settled from queued (no conversation)
    ready: list[_Ready] = []
    # In the batch's order: credits go to the steps submitted first.
    for send in dict.fromkeys(sends[i] for i in send_ids if i in sends):
        user = users.get(send.user_id)
        if user is None or send.status is not SendStatus.QUEUED or send.period is not None:
            result.handed_back.append((send.id, 0.0))
            continue
        reason = suppressed.get((send.user_id, suppression.normalize(send.contact_email)))
        if reason is not None:
            detail = f"the address is on the agent's suppression list ({reason}); not sent"
            closed.append(Outcome(send.id, SendStatus.FAILED, Reason.SUPPRESSED, detail))
            continue
        try:
            rendered, message, mail_from = smartplan.build(rt, send, user, now)
        except RenderError as exc:
            closed.append(Outcome(send.id, SendStatus.FAILED, exc.reason, exc.detail))
            continue
        ready.append(_Ready(send, user, rendered.subject, message, mail_from))
    granted, denied = _reserve(rt, ready, result)
    closed += denied
    _settle(rt, closed, smartplan.OPEN, result)
    # In waves: only steps about to be talked about are ``sending`` (a worker lost meanwhile
    # leaves those ``unknown``, never the rest), each under a lease that starts with its
    # wave. A batch's waves go one after another; another batch's may go meanwhile, up to
    # WAVES_AT_ONCE in the process.
    wave = wave_size(rt.settings)
    talked = 0
    for at in range(0, len(granted), wave):
        part_result, n = _wave(rt, granted[at : at + wave])
        result.add(part_result)
        talked += n
    log.info(
        "SmartPlan batch sends=%d conversations=%d settled=%d handed_back=%d",
        len(send_ids),
        talked,
        len(result.settled),
        len(result.handed_back),
    )
    return result


def wave_size(settings: Settings) -> int:
    """How many steps go ``sending`` together: :data:`WAVE_PER_CONNECTION` per connection of
    the SMTP pool (a lost process leaves at most :data:`WAVES_AT_ONCE` waves ``unknown``)."""
    return WAVE_PER_CONNECTION * settings.smtp_pool_size


def _load(
    rt: Runtime, send_ids: Sequence[str], now: datetime
) -> tuple[dict[str, Send], dict[str, User], dict[tuple[str, str], str]]:
    """The SmartPlan sends among ``send_ids``, their agents, and why addresses among them are
    suppressed (by agent and normalized address), in one session that only reads."""
    with rt.reads() as session:
        found = session.scalars(select(Send).where(Send.id.in_(list(send_ids)))).all()
        sends = {s.id: s for s in found if s.kind is SendKind.SMARTPLAN}
        user_ids = sorted({s.user_id for s in sends.values()})
        users = {u.id: u for u in session.scalars(select(User).where(User.id.in_(user_ids)))}
        emails: dict[str, list[str]] = defaultdict(list)
        for s in sends.values():
            if s.status is SendStatus.QUEUED:
                emails[s.user_id].append(s.contact_email)
        suppressed = {
            (user_id, email): reason.value
            for user_id, addresses in emails.items()
            for email, reason in suppression.active(session, user_id, addresses, now).items()
        }
        session.expunge_all()
    return sends, users, suppressed


def _reserve(
    rt: Runtime, ready: list[_Ready], result: BatchResult
) -> tuple[list[_Ready], list[Outcome]]:
    """Record each agent's current grant on their sends, then take one credit per send (in
    the batch's order); the sends granted, and the outcomes of those denied."""
    by_user: dict[str, list[_Ready]] = defaultdict(list)
    for r in ready:
        by_user[r.user.id].append(r)
    granted: list[_Ready] = []
    denied: list[Outcome] = []
    for items in by_user.values():
        _, grant = ensure_current(rt, items[0].user.id, known=items[0].user)
        # The grant is built first so that its own first rebuild does not count these claims.
        rt.quota.ensure(grant)
        claimed = lifecycle.claim_grants(rt, [r.send.id for r in items], grant)
        result.handed_back += [(r.send.id, 0.0) for r in items if r.send.id not in claimed]
        mine = [r for r in items if r.send.id in claimed]
        answers = rt.quota.reserve_each(grant, [r.send.idempotency_key for r in mine])
        for r, reservation in zip(mine, answers, strict=True):
            if reservation.granted:
                notices.after_reservation(rt, grant, reservation)
                granted.append(r)
            else:
                denied.append(smartplan.quota_exhausted(r.send, grant, reservation))
    return granted, denied


def _wave(rt: Runtime, part: list[_Ready]) -> tuple[BatchResult, int]:
    """One wave: its steps ``sending``, their conversations, their outcomes; what it did and
    how many conversations it had."""
    result = BatchResult()
    if rt.stopping.is_set():
        # This worker was told to stop: the steps not started (their credits taken) go on as
        # single sends' tasks, on whichever worker is free.
        result.handed_back += [(r.send.id, 0.0) for r in part]
        return result, 0
    with _WAVES:
        started = lifecycle.start_many(rt, [r.send.id for r in part])
        result.handed_back += [(r.send.id, 0.0) for r in part if r.send.id not in started]
        going = [r for r in part if r.send.id in started]
        if going:
            _converse(rt, going, result)
    return result, len(going)


def _converse(rt: Runtime, going: list[_Ready], result: BatchResult) -> None:
    """The conversations side by side (the SMTP pool bounds them), then every outcome."""
    results = rt.run(_send_all(rt, going))
    finished: list[Outcome] = []
    for r, outcome in zip(going, results, strict=True):
        if not isinstance(outcome, Delivery | Exception):
            raise outcome  # the process is stopping (KeyboardInterrupt, SystemExit)
        try:
            after = smartplan.after_conversation(rt, r.send, r.subject, outcome)
        except Exception:
            # Unforeseen: the server may have the message. The send stays ``sending`` under
            # its lease; its own delivery finds it there (busy until the lease runs out, then
            # ``unknown``), as a single send's retry would.
            log.exception("SmartPlan batch: send %s failed unexpectedly", r.send.id)
            result.handed_back.append((r.send.id, 0.0))
            continue
        if isinstance(after, Outcome):
            finished.append(after)
        else:
            result.handed_back.append((r.send.id, _wait(rt, r.send, after)))
            result.held[r.send.id] = after
    _settle(rt, finished, (SendStatus.SENDING,), result)


async def _send_all(rt: Runtime, going: list[_Ready]) -> list[Delivery | BaseException]:
    transport = rt.transport
    return list(
        await asyncio.gather(
            *(
                transport.send(
                    Envelope(mail_from=r.mail_from, recipients=(r.send.contact_email,)), r.message
                )
                for r in going
            ),
            return_exceptions=True,
        )
    )


def _wait(rt: Runtime, send: Send, held: TransientError) -> float:
    """Seconds before a deferred or held-back send's own delivery tries again: the one retry
    rule on its attempts so far, never sooner than the server or guard asked (a wait longer
    than any countdown is parked by the task, as a single send's is)."""
    s = rt.settings
    countdown = backoff(send.attempts, s.retry_backoff_seconds, s.retry_backoff_max_seconds)
    return honouring(countdown, held.retry_after, s.retry_backoff_max_seconds)


def _settle(
    rt: Runtime, outcomes: list[Outcome], expect: tuple[SendStatus, ...], result: BatchResult
) -> None:
    """Record ``outcomes``; any another delivery moved on first is handed back (its own
    delivery reports where it is)."""
    if not outcomes:
        return
    settled = set(lifecycle.settle(rt, outcomes, expect))
    result.settled.update((o.send_id, o.status) for o in outcomes if o.send_id in settled)
    result.handed_back += [(o.send_id, 0.0) for o in outcomes if o.send_id not in settled]


class Coalescer:
    """SmartPlan steps that one worker's threads deliver at the same moment, delivered as one
    batch (a :class:`~dispatcher.groupcommit.GroupCommit` of up to ``limit`` steps): an idle
    worker delivers a step alone at once, a busy one in batches as large as its backlog of
    running tasks. A task's steps are one step (a single send's task) or the few a producer
    submitted together (a batch task smaller than ``limit``): small batch tasks running at
    the same moment fill each other's waves instead of each taking a wave of its own. A
    batch task of ``limit`` steps or more goes alone.

    Each step still belongs to its own task: :meth:`deliver` returns the step's status as
    :func:`~dispatcher.delivery.smartplan.deliver` would, or raises what it would (a deferral
    or a hold for the task's retry, the batch's infrastructure error); a step the batch hands
    back at once (not fresh, moved by another delivery, left on a stopping worker) goes on
    by the single path in its own thread. :meth:`deliver_many` returns a batch task's share
    of the batch's result, as :func:`deliver_batch` would for its steps alone.
    """

    def __init__(self, limit: int, at_once: int = BATCHES_AT_ONCE) -> None:
        self._limit = limit
        self._group: GroupCommit[tuple[Runtime, Sequence[str]], BatchResult] = GroupCommit(
            limit, _deliver_together, size=lambda item: len(item[1]), at_once=at_once
        )

    def deliver(self, rt: Runtime, send_id: str) -> SendStatus:
        """Deliver one step, with whatever steps other threads are delivering now."""
        result = self._group.submit((rt, [send_id]))
        status = result.settled.get(send_id)
        if status is not None:
            return status
        held = result.held.get(send_id)
        if held is not None:
            raise held
        # Handed back at once: its own delivery decides (it may be a retry, busy, settled).
        return smartplan.deliver(rt, send_id)

    def deliver_many(self, rt: Runtime, send_ids: Sequence[str]) -> BatchResult:
        """Deliver a batch task's steps, with whatever steps other threads are delivering now
        (alone when they are ``limit`` or more); what the batch did with these steps."""
        if len(send_ids) >= self._limit:
            return deliver_batch(rt, send_ids)
        return self._group.submit((rt, send_ids)).only(send_ids)


def _deliver_together(steps: Sequence[tuple[Runtime, Sequence[str]]]) -> list[BatchResult]:
    """One batch of the steps a :class:`Coalescer` gathered, on the leading task's runtime
    (one per process); every task shares its result."""
    send_ids = [send_id for _, ids in steps for send_id in ids]
    metrics.SMARTPLAN_BATCH_STEPS.labels("threads").observe(len(send_ids))
    result = deliver_batch(steps[0][0], send_ids)
    return [result] * len(steps)
