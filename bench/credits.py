"""The cost of a credit: ``QuotaLedger.reserve`` against raw ``EVALSHA`` of the same script.

Both sides call ``reserve.lua`` unpipelined on the same Redis with the same keys and arguments
as the ledger builds them (``KEYS = grant.keys``, ``ARGV = [key, credits, grant.expire_at]``),
each reservation under a new idempotency key so every call takes the granting path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import redis

from dispatcher.credits.quota import GrantRef, LedgerSnapshot, QuotaLedger


@dataclass
class CreditCost:
    credits: int  # per reservation
    python: float  # reservations/s through QuotaLedger.reserve
    raw: float  # reservations/s of EVALSHA through redis-py


def measure(client: redis.Redis, reservations: int, credits: int, rounds: int = 3) -> CreditCost:
    """Best of ``rounds`` interleaved rounds of each side (the machine is noisy)."""
    total = 10**15  # never exhausted: every call grants
    ledger = QuotaLedger(client, lambda _grant: LedgerSnapshot(total=total, charged_keys=()))
    grant = GrantRef(f"bench-credits-{credits}", "2099-01", 1, int(time.time()) + 40 * 86400)
    ledger.rebuild(grant)
    script = resources.files("dispatcher").joinpath("lua", "reserve.lua").read_text()
    sha = client.script_load(script)
    keys = grant.keys

    def python_side(prefix: str) -> None:
        for i in range(reservations):
            if not ledger.reserve(grant, f"{prefix}-{i}", credits).granted:
                raise RuntimeError("the ledger refused a reservation")

    def raw_side(prefix: str) -> None:
        for i in range(reservations):
            code = client.evalsha(sha, 2, *keys, f"{prefix}-{i}", credits, grant.expire_at)
            if code[0] != 1:
                raise RuntimeError(f"EVALSHA answered {code}")

    def timed(side: Callable[[str], None], prefix: str) -> float:
        start = time.perf_counter()
        side(prefix)
        return reservations / (time.perf_counter() - start)

    py, raw = 0.0, 0.0
    for r in range(rounds):  # each side goes first in turn
        if r % 2:
            py = max(py, timed(python_side, f"py-{r}"))
        raw = max(raw, timed(raw_side, f"raw-{r}"))
        if not r % 2:
            py = max(py, timed(python_side, f"py-{r}"))
    client.delete(*keys)
    return CreditCost(credits, py, raw)
