"""Worker side of a Command Email campaign: one chunk of recipients per task, the template
compiled and the MIME skeleton built once, SMTP connections reused, SQL written in batches.

A driver over :mod:`dispatcher.delivery.lifecycle`: every recipient keeps its own lease and
compare-and-set status, exactly as a SmartPlan send, so a redelivered or duplicated chunk task,
a pause or a cancel never sends anyone a second copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime
from typing import Any

from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT
from sqlalchemy import func, select

from dispatcher import keys, metrics
from dispatcher.campaigns import control
from dispatcher.campaigns.control import complete_if_done, status_of
from dispatcher.credits import refunds
from dispatcher.delivery import identity, lifecycle, priority, returnpath, suppression
from dispatcher.delivery.footer import Footer
from dispatcher.delivery.identity import Identity
from dispatcher.delivery.lifecycle import Outcome
from dispatcher.delivery.message import Envelope
from dispatcher.delivery.mime import BulkMessage
from dispatcher.delivery.relay import unavailable
from dispatcher.delivery.rendering import (
    CompiledTemplate,
    MessageTemplate,
    context_for,
    subjects,
)
from dispatcher.delivery.sandbox import RenderLimits
from dispatcher.delivery.tracking import Tracker
from dispatcher.delivery.transports.base import Delivery
from dispatcher.delivery.transports.base import Outcome as TransportOutcome
from dispatcher.delivery.unsubscribe import BulkHeaders, bulk_headers
from dispatcher.errors import (
    DeliveryDeferred,
    DeliveryRejected,
    DeliveryUnknown,
    NotAttempted,
    RenderError,
    SendBusy,
    Yielded,
)
from dispatcher.models import SEND_REFUND_DUE, Campaign, CampaignStatus, Send, SendStatus, User
from dispatcher.reasons import Reason
from dispatcher.redisclient import AsyncRedisClient, connect_async
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Recipients claimed per round trip; a pause takes effect within one batch.
BATCH = 200

#: Field of a chunk's DATA marks written before any recipient is claimed: the marks are whole.
OPEN_MARK = "-"
#: A recipient's DATA mark while DATA is under way: this prefix, then the claim's attempt number.
IN_DATA = "?"
#: How long DATA marks outlive a lease (seconds).
MARKS_TTL = 86_400

_SENDING = (SendStatus.SENDING,)
_WORKER_LOST = "the worker was lost while talking to the SMTP server; not resent"


def deliver_chunk(rt: Runtime, c: Campaign, chunk: int, agent: User) -> CampaignStatus:
    """Send the open recipients of chunk ``chunk`` of the running campaign ``c`` of ``agent``
    (from the identity :mod:`dispatcher.delivery.identity` gives them, with their footer);
    returns the campaign's status afterwards.

    Raises :class:`DeliveryDeferred` when some recipients were deferred (the task retries the
    chunk; only those are left), :class:`NotAttempted` when the relay held messages back,
    :class:`Yielded` when the run stopped early (its time is up, or its worker is stopping:
    the rest of the chunk goes on in a new task), and :class:`SendBusy` when another worker
    holds some of them.
    """
    _settle_lost(rt, c, chunk)
    _refund_failed(rt, c, chunk)
    run = asyncio.run(_run_chunk(rt, c, chunk, agent))
    now_status = status_of(rt, c.id)
    if now_status is not CampaignStatus.RUNNING and now_status is not None:
        return now_status  # paused or cancelled meanwhile: a resume enqueues what is left
    busy = _live_lease(rt, c.id, chunk)
    if busy is not None:
        raise SendBusy(f"{c.id}:{chunk}", busy)
    if run.held is not None and not isinstance(run.held, Yielded):
        raise run.held  # the relay is halted or its rate limit used up: come back later
    if run.deferred:
        raise DeliveryDeferred(
            Reason.SMTP_DEFERRED, f"{run.deferred} recipients deferred; retrying"
        )
    if run.held is not None:
        raise run.held  # stopped early: the rest goes on in a new task at once
    return complete_if_done(rt, c.id)


@dataclass
class _Run:
    """What one run of a chunk needs across its batches, and what it found."""

    compiled: CompiledTemplate
    limits: RenderLimits
    headers: BulkHeaders
    skeleton: BulkMessage
    tracker: Tracker
    footer: Footer
    sender: Identity
    marks: str  # the chunk's DATA marks in Redis
    deadline: float
    deferred: int = 0
    held: NotAttempted | None = None
    stop: bool = False


@dataclass
class _Batch:
    """One claimed batch: outcomes decided so far, and messages ready to go."""

    outcomes: list[Outcome] = field(default_factory=list)
    ready: list[tuple[Any, str, bytes]] = field(default_factory=list)


async def _run_chunk(rt: Runtime, c: Campaign, chunk: int, agent: User) -> _Run:
    """Send the chunk's reserved recipients batch by batch while the campaign runs."""
    headers = bulk_headers(rt.settings, c.id, c.user_id)
    address = agent.sender_address
    assert address is not None  # run.deliver checked it
    sender = identity.for_agent(rt.settings, address, from_name=c.from_name, reply_to=c.reply_to)
    run = _Run(
        compiled=MessageTemplate(c.subject, c.html, c.text).compile(),
        limits=RenderLimits.of(rt.settings),
        headers=headers,
        skeleton=BulkMessage(
            from_address=sender.from_address,
            from_name=sender.from_name,
            reply_to=sender.reply_to,
            extra_headers=headers.constant,
        ),
        tracker=Tracker.of(rt.settings),
        footer=Footer(
            rt.settings,
            postal_address=agent.postal_address,
            sender_name=c.from_name or address,
        ),
        sender=sender,
        marks=keys.chunk_data(c.id, chunk),
        # Stop claiming (and starting messages) well before the task's time limit, so a
        # throttled relay never leaves claimed recipients behind a killed task.
        deadline=time.monotonic() + rt.settings.task_time_limit / 2,
    )
    # Before anything is claimed: the field that says this chunk's DATA marks are whole
    # (should Redis lose them, it goes too, and every lost recipient counts as in DATA).
    pipe = rt.redis.pipeline(transaction=False)
    pipe.hset(run.marks, OPEN_MARK, "1")
    pipe.expire(run.marks, rt.settings.send_lease_seconds + MARKS_TTL)
    pipe.execute()
    bulk = rt.transport.bulk()
    marks = _async_redis(rt)
    stop = _stop_starting(rt)
    # SmartPlan steps go first: while they wait, this run's lanes rest between messages.
    smartplan_first = priority.Yield(marks)
    try:
        while not run.stop and status_of(rt, c.id) is CampaignStatus.RUNNING:
            if rt.stopping.is_set():
                run.held = _handed_back()
                break
            if time.monotonic() > run.deadline:
                run.held = Yielded("the task's time is up; the chunk goes on")
                break
            claimed = lifecycle.claim_batch(rt, c.id, chunk, BATCH)
            if not claimed:
                break
            batch = _prepare(rt, c, run, claimed)
            data_marks = _DataMarks(marks, run.marks, batch)
            results = await bulk.send_many(
                [(_envelope(rt, run, row), raw) for row, _, raw in batch.ready],
                run.deadline,
                data_marks,
                stop=stop,
                pace=smartplan_first.turn,
            )
            await data_marks.write_ends()
            _record(rt, c, run, batch, results)
    finally:
        await bulk.close()
        await marks.aclose()
    if smartplan_first.paused:
        metrics.CAMPAIGN_RESTED.inc(smartplan_first.paused)
        log.info(
            "campaign %s chunk %d: connections rested %.1fs in all, SmartPlan steps waiting",
            c.id,
            chunk,
            smartplan_first.paused,
        )
    return run


def _envelope(rt: Runtime, run: _Run, row: Any) -> Envelope:
    """One recipient's envelope: its own return path (VERP) at the domain aligned with the
    campaign's ``From``, so its bounces name it."""
    return Envelope(identity.envelope_sender(rt.settings, run.sender, row.id), (row.contact_email,))


def _async_redis(rt: Runtime) -> AsyncRedisClient:
    """A client for the DATA marks on this chunk run's event loop (one connection)."""
    return connect_async(rt.settings.redis_url, socket_timeout=10, socket_connect_timeout=5)


def _prepare(rt: Runtime, c: Campaign, run: _Run, claimed: Sequence[Any]) -> _Batch:
    """Each claimed recipient's message, or its outcome when it is not to be sent: suppressed
    since the campaign was created, its template failing, or its message failing to build
    for an unforeseen cause (that recipient fails alone; the rest of the batch goes on)."""
    now = rt.clock.now()
    date = format_datetime(now)
    batch = _Batch()
    with rt.reads() as session:
        blocked = suppression.active(session, c.user_id, (r.contact_email for r in claimed), now)
    for row in claimed:
        why = blocked.get(suppression.normalize(row.contact_email))
        if why is not None:
            detail = f"the address is on the agent's suppression list ({why.value}); not sent"
            batch.outcomes.append(Outcome(row.id, SendStatus.FAILED, Reason.SUPPRESSED, detail))
            continue
        try:
            rendered = run.compiled.render(
                context_for(row.contact_id, row.contact_email, row.merge_fields), run.limits
            )
            link, unsubscribe_field = run.headers.for_send(row.id)
            rendered = run.footer.add(rendered, link)
            raw = run.skeleton.render(
                to=row.contact_email,
                subject=rendered.subject,
                message_id=row.message_id,
                date=date,
                text=rendered.text,
                html=run.tracker.html(rendered.html, row.id),
                extra=unsubscribe_field + returnpath.relay_fields(rt.settings, row.id),
            )
            if run.sender.signer is not None:
                raw = run.sender.signer.sign(raw, now)
        except RenderError as exc:
            batch.outcomes.append(Outcome(row.id, SendStatus.FAILED, exc.reason, exc.detail))
            continue
        except Exception as exc:  # one recipient's bug must not stall the rest of the batch
            log.exception("campaign %s: the message of send %s could not be built", c.id, row.id)
            detail = f"the message could not be built: {type(exc).__name__}: {exc}"
            batch.outcomes.append(Outcome(row.id, SendStatus.FAILED, Reason.INTERNAL_ERROR, detail))
            continue
        batch.ready.append((row, rendered.subject, raw))
    return batch


def _stop_starting(rt: Runtime) -> Callable[[TransportOutcome], NotAttempted | None]:
    """Asked after each message of a batch: whether the batch's messages not started yet must
    wait (those already in conversation on other connections finish). After a refusal on
    policy grounds (content, reputation) no further message of the campaign starts; once the
    worker is told to stop, no further message of this run starts, and the chunk is handed
    back (:func:`_handed_back`)."""

    def stop(outcome: TransportOutcome) -> NotAttempted | None:
        if isinstance(outcome, DeliveryRejected) and outcome.reason == Reason.POLICY_REJECTED:
            return NotAttempted(
                Reason.POLICY_STOP, f"not started after an earlier answer: {outcome}", 0.0
            )
        if rt.stopping.is_set():
            return _handed_back()
        return None

    return stop


def _handed_back() -> Yielded:
    """The worker was told to stop (SIGTERM: scale-in, a deploy): the run stops starting
    messages, settles what it sent, gives its unstarted claims back (``unclaim``) and yields,
    so the task is enqueued again at once and another worker goes on with the chunk. The
    same path as a run whose time is up; nothing waits for a lease or a visibility timeout."""
    return Yielded("the worker is stopping; the chunk goes on on another worker")


class _DataMarks:
    """A batch's recipients marked in Redis, each after its RCPT was accepted and immediately
    before its DATA: the one point after which the server may have the message. A worker lost
    before it leaves the recipient to be sent again; after it, ``unknown`` (credit kept, never
    resent), unless the mark already says how DATA ended. That is written with the batch's
    next marks, in the same round trip: an accepted message's reply (the recipient is
    ``sent``), or no mark at all after a refusal or a deferral (the server does not have it:
    sent again). Each connection has at most one message marked whose end is not written yet,
    so a lost worker leaves at most one ``unknown`` per SMTP connection it had open.

    Marks are written by group commit: a connection waits for its mark to be stored before it
    sends DATA, but while one round trip is under way the marks asked for meanwhile (by the
    other connections) gather and go together in the next one, one pipeline, so the other
    connections never wait on Redis and a mark costs a fraction of a round trip."""

    def __init__(self, client: AsyncRedisClient, key: str, batch: _Batch) -> None:
        self._redis = client
        self._key = key
        self._rows = [row for row, _, _ in batch.ready]
        self._ended: dict[str, str | None] = {}  # send id -> accepted reply, None: not taken
        self._asked: list[tuple[str, str, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def before_data(self, item: int) -> None:
        row = self._rows[item]
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The attempt number ties the mark to this claim: one left behind by an earlier claim
        # of the same recipient (deferred at DATA, its end never written) does not count.
        self._asked.append((row.id, f"{IN_DATA}{row.attempts}", stored))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write())
        await stored

    async def _write(self) -> None:
        """Write what was asked, round trip after round trip, until nothing is waiting."""
        try:
            while self._asked:
                asked, self._asked = self._asked, []
                ended, self._ended = self._ended, {}
                values: dict[FieldT, EncodableT] = {
                    send_id: reply for send_id, reply in ended.items() if reply is not None
                }
                values.update((send_id, mark) for send_id, mark, _ in asked)
                gone = [send_id for send_id, reply in ended.items() if reply is None]
                failed: Exception | None = None
                try:
                    await self._store(values, gone)
                except RedisError as exc:
                    failed = unavailable(exc)
                except Exception as exc:  # noqa: BLE001 - unforeseen: raised where it is awaited
                    failed = exc
                if failed is not None:
                    # Not written: those ends go with the next marks; these are not sent.
                    self._ended = {**ended, **self._ended}
                for _, _, stored in asked:
                    if stored.done():
                        continue
                    if failed is None:
                        stored.set_result(None)
                    else:
                        stored.set_exception(failed)
        finally:
            self._writer = None

    async def write_ends(self) -> None:
        """Write how the batch's last messages ended: no next mark will carry them. Should
        Redis fail here, those marks stay; a mark of an earlier attempt never counts."""
        if self._writer is not None:
            await self._writer
        ended, self._ended = self._ended, {}
        if not ended:
            return
        gone = [send_id for send_id, reply in ended.items() if reply is None]
        replies: dict[FieldT, EncodableT] = {
            send_id: reply for send_id, reply in ended.items() if reply is not None
        }
        try:
            await self._store(replies, gone)
        except RedisError as exc:
            log.warning("campaign DATA marks: the batch's last ends were not written: %s", exc)

    async def _store(self, values: dict[FieldT, EncodableT], gone: list[str]) -> None:
        """Set ``values`` and delete ``gone`` in one round trip. Most round trips only set (a
        mark, and the previous message's accepted reply): one HSET then, which costs the worker
        about three quarters of a pipeline of one command."""
        if not gone:
            if values:
                await self._redis.hset(self._key, mapping=values)
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.hdel(self._key, *gone)
        if values:
            pipe.hset(self._key, mapping=values)
        await pipe.execute()

    def after_data(self, item: int, outcome: TransportOutcome) -> None:
        send_id = self._rows[item].id
        if isinstance(outcome, Delivery):
            self._ended[send_id] = f"{outcome.code} {outcome.reply}"
        elif not isinstance(outcome, DeliveryUnknown):
            self._ended[send_id] = None  # refused or deferred: the server does not have it


def _record(rt: Runtime, c: Campaign, run: _Run, batch: _Batch, results: Sequence[Any]) -> None:
    """Settle a batch's outcomes; deferred recipients wait for the chunk's retry, those held
    back go back unattempted, and a policy refusal pauses the campaign."""
    deferred: list[tuple[str, str, str]] = []
    not_attempted: list[str] = []
    for (row, subject, _), result in zip(batch.ready, results, strict=True):
        if isinstance(result, NotAttempted):
            run.held = result
            not_attempted.append(row.id)
        elif isinstance(result, DeliveryDeferred):
            # Each recipient's own SMTP attempts (this one included) are its budget.
            if row.attempts > rt.settings.send_max_retries:
                detail = f"gave up after retries; last error: {result.detail}"
                batch.outcomes.append(
                    Outcome(row.id, SendStatus.FAILED, Reason.RETRIES_EXHAUSTED, detail, subject)
                )
            else:
                deferred.append((row.id, result.reason, result.detail))
        elif isinstance(result, DeliveryRejected):
            batch.outcomes.append(
                Outcome(row.id, SendStatus.FAILED, result.reason, result.detail, subject)
            )
        elif isinstance(result, DeliveryUnknown):
            batch.outcomes.append(
                Outcome(row.id, SendStatus.UNKNOWN, result.reason, result.detail, subject)
            )
        else:
            detail = f"{result.code} {result.reply}"
            batch.outcomes.append(Outcome(row.id, SendStatus.SENT, None, detail, subject))
    lifecycle.settle(rt, batch.outcomes, _SENDING, campaign=c)
    if not_attempted:
        lifecycle.unclaim(rt, not_attempted)
    if deferred:
        run.deferred += len(deferred)
        lifecycle.release(rt, deferred)
    policy = next((o for o in batch.outcomes if o.reason == Reason.POLICY_REJECTED), None)
    if policy is not None:
        control.pause_for_policy(rt, c, policy.detail or "")
    # Leave the rest of the chunk for the retry (after the backoff), or for later.
    run.stop = policy is not None or bool(deferred) or run.held is not None


def _settle_lost(rt: Runtime, c: Campaign, chunk: int) -> None:
    """Settle recipients whose lease ran out mid-batch (their worker died), by their DATA
    marks (:class:`_DataMarks`): one whose message the server accepted is ``sent``; one whose
    DATA was under way is ``unknown`` (the server may have the message: never resent, credit
    kept); one that never reached DATA goes back to ``reserved`` to be sent (not an attempt).
    Without the chunk's ``OPEN_MARK`` (Redis lost its data) every one of them is ``unknown``."""
    now = rt.clock.now()
    with rt.reads() as session:
        lost = session.execute(
            select(
                Send.id, Send.contact_id, Send.contact_email, Send.merge_fields, Send.attempts
            ).where(
                Send.campaign_id == c.id,
                Send.chunk == chunk,
                Send.status == SendStatus.SENDING,
                Send.lease_until < now,
            )
        ).all()
    if not lost:
        return
    found = rt.redis.hmget(keys.chunk_data(c.id, chunk), [OPEN_MARK, *(row.id for row in lost)])
    whole = found[0] is not None
    subject = subjects(c.subject, RenderLimits.of(rt.settings))
    never: list[str] = []
    outcomes: list[Outcome] = []
    for row, raw in zip(lost, found[1:], strict=True):
        mark = raw.decode() if isinstance(raw, bytes) else raw
        if mark is not None and not mark.startswith(IN_DATA):
            outcomes.append(Outcome(row.id, SendStatus.SENT, None, mark, subject(row)))
        elif whole and mark != f"{IN_DATA}{row.attempts}":
            never.append(row.id)
        else:
            outcomes.append(
                Outcome(row.id, SendStatus.UNKNOWN, Reason.WORKER_LOST, _WORKER_LOST, subject(row))
            )
    if never:
        lifecycle.unclaim(rt, never, Send.lease_until < now)
        log.warning(
            "campaign %s chunk %d: %d recipients of a lost worker never reached DATA; "
            "they will be sent",
            c.id,
            chunk,
            len(never),
        )
    lifecycle.settle(rt, outcomes, _SENDING, campaign=c)


def _refund_failed(rt: Runtime, c: Campaign, chunk: int) -> None:
    """Give back the credits of the chunk's failed recipients still due: a refund lost to a
    Redis error after its outcome was committed is made here by the chunk's next run, or by
    the refund sweep, whichever comes first."""
    with rt.reads() as session:
        due = session.scalars(
            select(Send.id).where(Send.campaign_id == c.id, Send.chunk == chunk, SEND_REFUND_DUE)
        ).all()
    if due:
        refunds.give_back(rt, list(due))


def _live_lease(rt: Runtime, campaign_id: str, chunk: int) -> float | None:
    """Seconds until the last live lease in the chunk runs out, if any (another worker)."""
    with rt.reads() as session:
        until = session.scalar(
            select(func.max(Send.lease_until)).where(
                Send.campaign_id == campaign_id,
                Send.chunk == chunk,
                Send.status == SendStatus.SENDING,
            )
        )
    if until is None:
        return None
    return max((until - rt.clock.now()).total_seconds(), 0.0) + 1
