"""The plan catalog: monthly credits and price per plan; free plus paid tiers, replaceable."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.errors import InvalidInput
from dispatcher.settings import FREE_PLAN, Settings

FREE = FREE_PLAN

#: Paid tiers when PLAN_CATALOG does not replace them: (name, monthly credits, price in cents).
DEFAULT_PAID_PLANS: tuple[tuple[str, int, int], ...] = (
    ("10k", 10_000, 1_500),
    ("25k", 25_000, 3_000),
    ("50k", 50_000, 5_000),
    ("100k", 100_000, 8_500),
)


@dataclass(frozen=True)
class Plan:
    name: str
    monthly_credits: int
    price_cents: int

    @property
    def paid(self) -> bool:
        return self.name != FREE


def catalog(settings: Settings) -> dict[str, Plan]:
    """Every plan a user may be on, by name, smallest first."""
    paid = settings.plan_catalog if settings.plan_catalog is not None else DEFAULT_PAID_PLANS
    plans = [Plan(FREE, settings.free_plan_credits, 0)] + [Plan(n, c, p) for n, c, p in paid]
    return {p.name: p for p in sorted(plans, key=lambda p: p.monthly_credits)}


def plan(settings: Settings, name: str, field: str = "plan") -> Plan:
    """The plan called ``name``, or :class:`InvalidInput` naming ``field``."""
    plans = catalog(settings)
    if name not in plans:
        raise InvalidInput(field, f"unknown plan {name!r}; known plans: {', '.join(plans)}")
    return plans[name]
