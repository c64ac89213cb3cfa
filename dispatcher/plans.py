"""The plan catalog: monthly credits and price per plan (free only until subscriptions land)."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.errors import InvalidInput
from dispatcher.settings import Settings

FREE = "free"


@dataclass(frozen=True)
class Plan:
    name: str
    monthly_credits: int
    price_cents: int


def catalog(settings: Settings) -> dict[str, Plan]:
    """Every plan a user may be on, by name."""
    return {FREE: Plan(FREE, settings.free_plan_credits, 0)}


def plan(settings: Settings, name: str, field: str = "plan") -> Plan:
    """The plan called ``name``, or :class:`InvalidInput` naming ``field``."""
    plans = catalog(settings)
    if name not in plans:
        raise InvalidInput(field, f"unknown plan {name!r}; known plans: {', '.join(sorted(plans))}")
    return plans[name]
