"""Opens and clicks heard through tracking links (``delivery/tracking.py``), written to the
contact's timeline (and so to the events webhook): the first open of each copy, and the first
click of each link in it; a repeat changes nothing."""

from __future__ import annotations

import logging

from sqlalchemy import select

from dispatcher.delivery import timeline, tracking
from dispatcher.models import Send, TimelineEvent, TimelineKind
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


def record(rt: Runtime, hit: tracking.Hit) -> None:
    """Record what a tracking token said happened (:func:`tracking.read` checked it); a
    send no longer stored records nothing."""
    kind = TimelineKind.OPENED if hit.kind == "open" else TimelineKind.CLICKED
    same_target = (
        TimelineEvent.detail.is_(None) if hit.url is None else TimelineEvent.detail == hit.url
    )
    with rt.sessions.begin() as session:
        send = session.get(Send, hit.send_id)
        if send is None:
            return
        seen = session.scalar(
            select(TimelineEvent.id)
            .where(
                timeline.of_send(send),
                TimelineEvent.kind == kind,
                same_target,
            )
            .limit(1)
        )
        if seen is not None:
            return
        session.add(timeline.about_send(send, kind, rt.clock.now(), detail=hit.url))
    log.info("email %s user=%s send=%s", kind.value, send.user_id, send.id)
