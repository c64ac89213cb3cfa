"""The quota ledger in Redis: atomic, idempotent credit reservations per user and period."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any

from redis.commands.core import Script
from redis.exceptions import RedisError

from dispatcher import keys, metrics
from dispatcher.credits.periods import Period
from dispatcher.redisclient import RedisClient

log = logging.getLogger(__name__)

#: Usage thresholds (percent of the grant) that are reported once each per grant.
THRESHOLDS = (80, 85, 90, 95, 100)

#: Grants outlive their period by this much so late retries still find their reservation.
GRANT_GRACE = timedelta(days=35)


@dataclass(frozen=True)
class GrantRef:
    """Which grant a reservation draws on: a user's ``seq``-th grant of a period."""

    user_id: str
    period: str  # YYYY-MM in the user's zone
    seq: int
    expire_at: int  # unix seconds: the period's end plus a grace for late retries

    @classmethod
    def of(cls, user_id: str, period: Period, seq: int) -> GrantRef:
        return cls(user_id, period.id, seq, int((period.end_utc + GRANT_GRACE).timestamp()))

    @property
    def keys(self) -> list[str]:
        return [
            keys.grant(self.user_id, self.period, self.seq),
            keys.reservations(self.user_id, self.period, self.seq),
        ]

    @property
    def epoch_key(self) -> str:
        return keys.rebuild_epoch(self.user_id, self.period, self.seq)


@dataclass(frozen=True)
class LedgerSnapshot:
    """What the SQL ledger says about one grant: the truth Redis is rebuilt from (I5)."""

    total: int
    charged_keys: Sequence[str]  # idempotency keys whose credit is taken (one credit each)
    notified: int = 0  # highest threshold already notified
    #: ``(key, credits)`` claimed against the grant, not yet known to be granted: Redis may have
    #: granted them just before it lost its data. A rebuild counts them as pending; a later
    #: reservation of the same key is granted without counting it again.
    pending: Sequence[tuple[str, int]] = ()

    @property
    def used(self) -> int:
        return len(self.charged_keys) + sum(n for _, n in self.pending)


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


SnapshotSource = Callable[[GrantRef], LedgerSnapshot]


class GrantUnstable(RedisError):
    """Redis lost the grant again each time it was rebuilt (it keeps losing its data): an
    infrastructure error like any other Redis one, retried until Redis holds."""

    def __init__(self, grant: GrantRef) -> None:
        super().__init__(f"grant {grant.keys[0]} vanished while being rebuilt three times")


def _answer(answer: Sequence[int], credits: int) -> Reservation | None:
    """A reservation from ``reserve.lua``'s answer (counted), or None: the grant is missing."""
    code, used, total, threshold = answer
    if code == -1:
        return None
    if code == 1:
        metrics.CREDITS_RESERVED.inc(credits)
    elif code == 0:
        metrics.RESERVATIONS_DENIED.inc()
    return Reservation(
        granted=code in (1, 2),
        replay=code in (2, 3, 4),
        used=used,
        total=total,
        threshold=threshold or None,
    )


def _load(name: str) -> str:
    return resources.files("dispatcher").joinpath("lua", name).read_text()


class QuotaLedger:
    """Credits per user and period, taken by Lua scripts that check and reserve in one step.

    ``snapshot`` reads the SQL ledger; it is called only when a grant is missing from Redis
    (first use in a period, or Redis lost its data).
    """

    def __init__(self, redis: RedisClient, snapshot: SnapshotSource) -> None:
        self._redis = redis
        self._snapshot = snapshot
        self._reserve: Script = redis.register_script(_load("reserve.lua"))
        self._refund: Script = redis.register_script(_load("refund.lua"))
        self._rebuild: Script = redis.register_script(_load("rebuild.lua"))
        self._refund_parts: Script = redis.register_script(_load("refund_parts.lua"))
        self._notified: Script = redis.register_script(_load("notified.lua"))
        self._epoch: Script = redis.register_script(_load("epoch.lua"))

    def reserve(self, grant: GrantRef, key: str, credits: int = 1) -> Reservation:
        """Take ``credits`` for ``key`` from ``grant``, all or nothing."""
        if credits < 1:
            raise ValueError("credits must be at least 1")
        for _ in range(3):
            with metrics.timed(metrics.RESERVE_SECONDS):
                answer = self._call(self._reserve, grant.keys, [key, credits, grant.expire_at])
            reservation = _answer(answer, credits)
            if reservation is not None:
                return reservation
            self.rebuild(grant)
        raise GrantUnstable(grant)

    def reserve_each(self, grant: GrantRef, keys_: Sequence[str]) -> list[Reservation]:
        """:meth:`reserve` of one credit for each of ``keys_``, in order, in one round trip
        (each key's reservation is its own script call, as one by one); a key that found the
        grant missing (or whose call failed) is reserved again on its own, the grant rebuilt
        first."""
        pipe = self._redis.pipeline(transaction=False)
        for key in keys_:
            self._reserve(keys=grant.keys, args=[key, 1, grant.expire_at], client=pipe)
        # An error answer (a script the server lost, as a restarted Redis does) is asked again
        # on its own, where the script is loaded again.
        started = time.perf_counter()
        answers = pipe.execute(raise_on_error=False)
        share = (time.perf_counter() - started) / max(len(keys_), 1)
        for _ in keys_:
            metrics.RESERVE_SECONDS.observe(share)
        reservations = [None if isinstance(a, Exception) else _answer(a, 1) for a in answers]
        return [
            r if r is not None else self.reserve(grant, key)
            for key, r in zip(keys_, reservations, strict=True)
        ]

    def refund(self, grant: GrantRef, key: str, credits: int = 1) -> bool:
        """Give back the credits reserved for ``key``; true when something came back."""
        result = self._call(self._refund, grant.keys, [key, credits, grant.expire_at])
        # -1: the grant is gone; the key is marked refunded, and the next reservation rebuilds
        # the grant from SQL, which no longer counts it, so the credit comes back there.
        if result == 1:
            metrics.CREDITS_REFUNDED.inc(credits)
        return bool(result == 1)

    def refund_parts(self, grant: GrantRef, bulk_key: str, part_keys: Sequence[str]) -> int:
        """Give back one credit for each part of a bulk reservation, once per part; returns
        how many came back (0 when the grant is gone: a rebuild no longer counts them)."""
        back = 0
        for start in range(0, len(part_keys), 1000):
            result = int(
                self._call(
                    self._refund_parts,
                    grant.keys,
                    [grant.expire_at, bulk_key, *part_keys[start : start + 1000]],
                )
            )
            back += max(result, 0)
        metrics.CREDITS_REFUNDED.inc(back)
        return back

    def rebuild(self, grant: GrantRef) -> bool:
        """Recreate the grant from the SQL ledger unless it exists; true when rebuilt.

        The grant's epoch is taken before the ledger is read, and the rebuild proceeds only
        if it is unchanged: should Redis lose its data while the ledger is read, a reservation
        may have been granted and lost in between, which that read does not hold. The ledger
        is then read again."""
        for _ in range(3):
            epoch = self._call(self._epoch, [grant.epoch_key], [uuid.uuid4().hex, grant.expire_at])
            snap = self._snapshot(grant)
            pending = [item for pair in snap.pending for item in pair]
            rebuilt, used = self._call(
                self._rebuild,
                [*grant.keys, grant.epoch_key],
                [
                    epoch,
                    snap.total,
                    snap.notified,
                    grant.expire_at,
                    len(snap.charged_keys),
                    *snap.charged_keys,
                    *pending,
                ],
            )
            if rebuilt == -1:
                continue
            if rebuilt:
                log.info(
                    "quota grant rebuilt from ledger user=%s grant=%s:%d total=%d used=%d "
                    "pending=%d notified=%d",
                    grant.user_id,
                    grant.period,
                    grant.seq,
                    snap.total,
                    used,
                    len(snap.pending),
                    snap.notified,
                )
            return bool(rebuilt)
        raise GrantUnstable(grant)

    def ensure(self, grant: GrantRef) -> None:
        """Make sure the grant exists in Redis, rebuilding it from SQL when missing."""
        if not self._redis.exists(grant.keys[0]):
            self.rebuild(grant)

    def balance(self, grant: GrantRef) -> tuple[int, int]:
        """(used, total) of the grant, rebuilding it first when missing."""
        for _ in range(3):
            used, total = self._redis.hmget(grant.keys[0], ["used", "total"])
            if used is not None and total is not None:
                return int(used), int(total)
            self.rebuild(grant)
        raise GrantUnstable(grant)

    def state(self, grant: GrantRef) -> tuple[int, int, int] | None:
        """(used, total, notified) as Redis holds them, or None when the grant is missing."""
        used, total, notified = self._redis.hmget(grant.keys[0], ["used", "total", "notified"])
        if used is None or total is None:
            return None
        return int(used), int(total), int(notified or 0)

    def mark_notified(self, grant: GrantRef, threshold: int) -> bool:
        """Raise the grant's notified threshold to ``threshold`` once the ledger recorded that
        notification: a rebuild that read the ledger just before may have lowered it. A
        missing grant is not created (its rebuild reads the ledger); its rebuild epoch is
        cleared, so a rebuild under way, whose read may predate the notice, reads again."""
        return bool(self._call(self._notified, [grant.keys[0], grant.epoch_key], [threshold]))

    def drop(self, grant: GrantRef) -> None:
        """Forget the grant in Redis, as a loss of its data would; the next use rebuilds it
        from SQL."""
        self._redis.delete(*grant.keys, grant.epoch_key)

    @staticmethod
    def _call(script: Script, keys_: list[str], args: list[Any]) -> Any:
        return script(keys=keys_, args=args)
