"""The quota ledger in Redis: atomic, idempotent credit reservations per user and period."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any

from redis import Redis
from redis.commands.core import Script

from dispatcher import keys
from dispatcher.periods import Period

log = logging.getLogger(__name__)

#: Usage thresholds (percent of the grant) that are reported once each per grant.
THRESHOLDS = (80, 85, 90, 95, 100)

#: Grants outlive their period by this much so late retries still find their reservation.
GRANT_GRACE = timedelta(days=35)


@dataclass(frozen=True)
class LedgerSnapshot:
    """What the SQL ledger says about one grant: the truth Redis is rebuilt from (I5)."""

    total: int
    charged_keys: Sequence[str]  # idempotency keys whose credit is taken (one credit each)

    @property
    def used(self) -> int:
        return len(self.charged_keys)


@dataclass(frozen=True)
class Reservation:
    """The answer to one reservation; a replay of the same key gets the first answer."""

    granted: bool
    replay: bool
    used: int
    total: int
    threshold: int | None  # highest threshold this reservation reached first

    @property
    def remaining(self) -> int:
        return max(self.total - self.used, 0)


SnapshotSource = Callable[[str, Period], LedgerSnapshot]


def _load(name: str) -> str:
    return resources.files("dispatcher").joinpath("lua", name).read_text()


class QuotaLedger:
    """Credits per user and period, taken by Lua scripts that check and reserve in one step.

    ``snapshot`` reads the SQL ledger; it is called only when a grant is missing from Redis
    (first use in a period, or Redis lost its data).
    """

    def __init__(self, redis: Redis, snapshot: SnapshotSource) -> None:
        self._redis = redis
        self._snapshot = snapshot
        self._reserve: Script = redis.register_script(_load("reserve.lua"))
        self._refund: Script = redis.register_script(_load("refund.lua"))
        self._rebuild: Script = redis.register_script(_load("rebuild.lua"))

    def reserve(self, user_id: str, period: Period, key: str, credits: int = 1) -> Reservation:
        """Take ``credits`` for ``key`` from the user's grant in ``period``, all or nothing."""
        if credits < 1:
            raise ValueError("credits must be at least 1")
        grant_keys = [keys.grant(user_id, period.id), keys.reservations(user_id, period.id)]
        expire_at = int((period.end_utc + GRANT_GRACE).timestamp())
        for _ in range(3):
            code, used, total, threshold = self._call(
                self._reserve, grant_keys, [key, credits, expire_at]
            )
            if code != -1:
                return Reservation(
                    granted=code in (1, 2),
                    replay=code in (2, 3, 4),
                    used=used,
                    total=total,
                    threshold=threshold or None,
                )
            self.rebuild(user_id, period)
        raise RuntimeError(f"grant {grant_keys[0]} vanished while being rebuilt three times")

    def refund(self, user_id: str, period_id: str, key: str, credits: int = 1) -> bool:
        """Give back the credits reserved for ``key``; true when something came back."""
        result = self._call(
            self._refund,
            [keys.grant(user_id, period_id), keys.reservations(user_id, period_id)],
            [key, credits],
        )
        # -1: the grant is gone; the next reservation rebuilds it from SQL, which no longer
        # counts this key, so the credit comes back there.
        return bool(result == 1)

    def rebuild(self, user_id: str, period: Period) -> bool:
        """Recreate the grant from the SQL ledger unless it exists; true when rebuilt."""
        snap = self._snapshot(user_id, period)
        notified = max(
            (t for t in THRESHOLDS if snap.total and snap.used * 100 >= t * snap.total), default=0
        )
        expire_at = int((period.end_utc + GRANT_GRACE).timestamp())
        rebuilt = bool(
            self._call(
                self._rebuild,
                [keys.grant(user_id, period.id), keys.reservations(user_id, period.id)],
                [snap.total, snap.used, notified, expire_at, *snap.charged_keys],
            )
        )
        if rebuilt:
            log.info(
                "quota grant rebuilt from ledger user=%s period=%s total=%d used=%d",
                user_id,
                period.id,
                snap.total,
                snap.used,
            )
        return rebuilt

    def balance(self, user_id: str, period: Period) -> tuple[int, int]:
        """(used, total) of the grant, rebuilding it first when missing."""
        grant = keys.grant(user_id, period.id)
        for _ in range(3):
            used, total = self._redis.hmget(grant, ["used", "total"])
            if used is not None and total is not None:
                return int(used), int(total)
            self.rebuild(user_id, period)
        raise RuntimeError(f"grant {grant} vanished while being rebuilt three times")

    @staticmethod
    def _call(script: Script, keys_: list[str], args: list[Any]) -> Any:
        return script(keys=keys_, args=args)
