"""Compare the Redis quota counters with the SQL ledger for every user, and repair them (I5)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import select

from dispatcher.credits.ledger import snapshot
from dispatcher.credits.subscriptions import ensure_current
from dispatcher.models import User
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrantCheck:
    """One user's current grant as Redis and the ledger see it."""

    user_id: str
    grant: str  # period:seq
    redis: tuple[int, int, int] | None  # used, total, notified; None when missing
    ledger: tuple[int, int, int]
    repaired: bool

    @property
    def in_step(self) -> bool:
        return self.redis == self.ledger


def _user_ids(rt: Runtime, batch: int = 500) -> Iterator[str]:
    last = ""
    while True:
        with rt.sessions() as session:
            ids = session.scalars(
                select(User.id).where(User.id > last).order_by(User.id).limit(batch)
            ).all()
        if not ids:
            return
        yield from ids
        last = ids[-1]


def reconcile(rt: Runtime, repair: bool = False) -> Iterator[GrantCheck]:
    """Check every user's current grant (starting due periods first); with ``repair``, a
    missing or differing grant is rebuilt from the ledger.

    The ledger counts sends claimed but not yet reserved as used (pending), so while sends are
    in flight the two may differ by those; a repair then counts them as pending, and their
    reservations are granted without counting them twice (exact, never an overspend).
    """
    for user_id in _user_ids(rt):
        user, ref = ensure_current(rt, user_id)
        with rt.sessions() as session:
            snap = snapshot(session, ref)
        ledger = (snap.used, snap.total, snap.notified)
        state = rt.quota.state(ref)
        repaired = False
        if repair and state != ledger:
            rt.quota.drop(ref)
            rt.quota.rebuild(ref)
            repaired = True
            log.warning(
                "reconcile repaired user=%s grant=%s:%d redis=%s ledger=%s",
                user_id,
                ref.period,
                ref.seq,
                state,
                ledger,
            )
        yield GrantCheck(user.id, f"{ref.period}:{ref.seq}", state, ledger, repaired)
