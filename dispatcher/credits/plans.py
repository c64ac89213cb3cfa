"""The plan catalog: monthly credits and price per plan; free plus paid tiers, replaceable."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.errors import ConfigError, InvalidInput
from dispatcher.settings import Settings

FREE = "free"

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


def parse_catalog(variable: str, value: str) -> tuple[tuple[str, int, int], ...]:
    """``name:credits:price,...`` with the price in dollars and cents, e.g. ``10k:10000:15.00``."""
    out: list[tuple[str, int, int]] = []
    for item in (i.strip() for i in value.split(",") if i.strip()):
        parts = item.split(":")
        if len(parts) != 3:
            raise ConfigError(variable, f"{item!r} is not name:credits:price")
        name, credits, price = (p.strip() for p in parts)
        if not name or name == FREE or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(variable, f"{name!r} is not a valid paid plan name")
        try:
            credits_n = int(credits)
            dollars, _, cents = price.partition(".")
            price_cents = int(dollars) * 100 + int((cents + "00")[:2] or 0)
        except ValueError:
            raise ConfigError(
                variable, f"{item!r}: credits must be whole, price like 15.00"
            ) from None
        if credits_n <= 0 or price_cents <= 0:
            raise ConfigError(variable, f"{item!r}: credits and price must be positive")
        if name in (n for n, _, _ in out):
            raise ConfigError(variable, f"plan {name!r} is listed twice")
        out.append((name, credits_n, price_cents))
    if not out:
        raise ConfigError(variable, "lists no plan")
    return tuple(out)
