"""Campaigns accepted compactly (``CAMPAIGN_COMPACT_FROM``): the request stores the campaign
with its valid recipients packed on its row (``pending_recipients``), reserves their credits
in one step and answers, the campaign still ``reserving``. Writing 100,000 send rows takes the
database longer than the answer may; a worker writes them instead, here:

1. the request: campaign ``reserving`` with its recipients packed, credits reserved under
   the campaign's bulk key, ``reserved_at`` set (a refusal leaves nothing, as for any campaign);
2. :func:`finish`, from its first chunk task, the only one the request hands out (or from
   :func:`sweep`): the sends written ``reserved`` a few chunks per transaction (with the count
   of chunks written), then the packed recipients cleared and the campaign ``running``; then the
   task hands out the other chunks. From then on it is like any other campaign.

The request's answer waits for none of it: not for 100,000 rows, not for 200 tasks.

The ledger counts the packed recipients as pending under the campaign's bulk key while any are
packed (ignoring the rows written so far), and the rows once all are written, in one statement
(:mod:`dispatcher.credits.ledger`): never both, never neither. A request that died before its
credits were granted (no ``reserved_at``) leaves the campaign to
:func:`dispatcher.campaigns.control.expire_reserving`, which fails it as it fails any campaign
whose request died.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dispatcher import db
from dispatcher.campaigns import control, create, recipients
from dispatcher.credits.grants import campaign_key, grant_of
from dispatcher.credits.quota import GrantRef
from dispatcher.models import Campaign, CampaignStatus, SendStatus
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: A compact campaign granted its credits this long ago that no chunk task has started yet
#: (its tasks were lost: the broker was down when the request handed them out) is started by
#: :func:`sweep`.
START_GRACE = timedelta(minutes=1)

#: How long one transaction of :func:`finish` goes on writing chunks (at least one): about one
#: chunk of 1,000 sends. Every SmartPlan send makes several transactions, each of which may
#: wait for one of these (on SQLite, any writer's; on PostgreSQL too, measured): with 0.25 s,
#: single sends due as a 30,000-recipient campaign's sends were being written took up to a
#: second more to arrive. Commits cost little beside a chunk's inserts.
WRITE_SECONDS = 0.03

#: How long :func:`finish` rests between two of its transactions while other transactions wait
#: for the database's writer (on SQLite, whose one writer every process shares; see
#: :func:`dispatcher.db.writers_waiting`): as long as one lasts, so that the API and the
#: SmartPlan worker (several transactions per step) have the database about half the time
#: while a campaign's sends are written, and the writing goes at full speed when nobody else
#: writes. In the bench's latency section (single sends at 100/s, a 100,000-recipient
#: campaign starting), the p99 of the sends due in its first 10 s went from 1,327 ms without
#: a rest to 546 ms with 0.01 s and 294 ms with 0.03 s.
REST_SECONDS = WRITE_SECONDS


def finish(rt: Runtime, campaign_id: str) -> bool:
    """Write the sends of a compact campaign whose credits were granted and start it; True
    when this call started it (its caller then hands out its chunks). Any number of workers
    may call it at once, or after one was lost halfway: each chunk is written once, and the
    one that starts the campaign gets True, the others False. Any other campaign is left as
    it is (False)."""
    # Its reads take no writer: on SQLite the packed recipients (megabytes) would hold up
    # every other writer while they are read.
    with rt.reads() as session:
        c = session.execute(
            select(
                Campaign.user_id, Campaign.period, Campaign.grant_seq, Campaign.recipients
            ).where(
                Campaign.id == campaign_id,
                Campaign.status == CampaignStatus.RESERVING,
                Campaign.pending_recipients.is_not(None),
                Campaign.reserved_at.is_not(None),
            )
        ).first()
    grant = None if c is None else grant_of(rt.reads, c.user_id, c.period, c.grant_seq)
    if c is None or grant is None:
        return False
    # The request's reservation, asked again: a replay of its grant (nothing counted twice),
    # or after a Redis loss granted against the rebuild, which counted these recipients
    # pending under this key. Refused only if Redis lost it and the grant can no longer
    # hold them: then they are written uncharged and the campaign fails whole (rule R4).
    reservation = rt.quota.reserve(grant, campaign_key(campaign_id), c.recipients)
    status = SendStatus.RESERVED if reservation.granted else SendStatus.QUEUED
    with rt.reads() as session:
        packed = session.scalar(
            select(Campaign.pending_recipients).where(Campaign.id == campaign_id)
        )
    if packed is None:
        return False  # another worker wrote them meanwhile
    frames = recipients.frames(packed)
    while True:
        now = rt.clock.now()
        with rt.sessions.begin() as session:
            written = session.scalar(
                select(Campaign.packed_written)
                .where(
                    Campaign.id == campaign_id,
                    Campaign.status == CampaignStatus.RESERVING,
                    Campaign.pending_recipients.is_not(None),
                )
                # Another worker writing a chunk holds the row: this one leaves it to that
                # one at once (each chunk is written once, whoever writes it).
                .with_for_update(skip_locked=True)
            )
            if written is None:
                return False
            if written < len(frames):
                # The chunks that fit in WRITE_SECONDS per transaction: no transaction holds
                # the campaign (on SQLite, the database) for the whole campaign, and a lost
                # worker's successor goes on from the next chunk.
                done = _write_chunks(
                    session, rt, campaign_id, c.user_id, grant, status, frames, written, now
                )
                session.execute(
                    update(Campaign)
                    .where(Campaign.id == campaign_id, Campaign.packed_written == written)
                    .values(packed_written=done, updated_at=now)
                )
                # Asked before the commit lets go: the transactions that came meanwhile wait
                # now (once one has the database, it no longer counts as waiting).
                others = db.writers_waiting(rt.engine)
            else:
                session.execute(
                    update(Campaign)
                    .where(Campaign.id == campaign_id)
                    .values(
                        pending_recipients=None,
                        updated_at=now,
                        **({"status": CampaignStatus.RUNNING} if reservation.granted else {}),
                    )
                )
                break
        if others:
            time.sleep(REST_SECONDS)
    if not reservation.granted:
        short = create.InsufficientCredits(c.recipients, reservation.remaining, reservation.total)
        control.refuse_start(rt, campaign_id, f"not started: {short}")
        log.warning("compact campaign %s refused as its sends were written: %s", campaign_id, short)
        return False
    log.info("campaign %s: %d sends written, running", campaign_id, c.recipients)
    return True


def _write_chunks(
    session: Session,
    rt: Runtime,
    campaign_id: str,
    user_id: str,
    grant: GrantRef,
    status: SendStatus,
    frames: list[bytes],
    first: int,
    now: datetime,
) -> int:
    """Write the sends of chunk ``first`` and the next ones while :data:`WRITE_SECONDS` last
    (at least one chunk), in the session's transaction; how many chunks are written after.
    Without db.bulk_writes' large SQLite page cache, which in the campaign worker would stay
    in its memory."""
    began = time.monotonic()
    written = first
    for frame in frames[first:]:
        part = recipients.unpack(frame)
        create.insert_sends(session, rt, campaign_id, user_id, [part], grant, status, now, written)
        written += 1
        if time.monotonic() - began >= WRITE_SECONDS:
            break
    return written


def sweep(rt: Runtime, limit: int = 100) -> int:
    """Start the compact campaigns granted their credits more than :data:`START_GRACE` ago
    that are still ``reserving`` (their chunk tasks were lost), and hand out their chunks.
    Returns how many it started."""
    cutoff = rt.clock.now() - START_GRACE
    with rt.sessions() as session:
        stuck = session.scalars(
            select(Campaign.id)
            .where(
                Campaign.status == CampaignStatus.RESERVING,
                Campaign.pending_recipients.is_not(None),
                Campaign.reserved_at < cutoff,
            )
            .limit(limit)
        ).all()
    started = 0
    for campaign_id in stuck:
        if finish(rt, campaign_id):
            log.warning("compact campaign %s not started by its chunk tasks: started", campaign_id)
            control.enqueue(rt, campaign_id, control.open_chunks(rt, campaign_id))
            started += 1
    return started
