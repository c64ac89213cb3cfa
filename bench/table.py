"""The one table every figure ends in: value, ceiling, ratio, goal, and whether it is met."""

from __future__ import annotations

import math
from dataclasses import dataclass

COLUMNS = ("#", "figure", "database", "value", "ceiling", "ratio", "goal", "met", "notes")


@dataclass
class Row:
    section: str
    figure: str
    database: str
    value: str
    ceiling: str = "-"
    ratio: str = "-"
    goal: str = "-"
    met: str = "-"
    notes: str = ""
    #: A rate compared with a ceiling known only later (see :func:`settle`).
    rate: float = math.nan
    goal_ratio: float = math.nan
    unit: str = ""

    def cells(self) -> tuple[str, ...]:
        return (
            self.section,
            self.figure,
            self.database,
            self.value,
            self.ceiling,
            self.ratio,
            self.goal,
            self.met,
            self.notes,
        )


def num(value: float, unit: str = "", digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def ratio_row(
    section: str,
    figure: str,
    database: str,
    value: float,
    ceiling: float,
    goal: float,
    unit: str = " msg/s",
    notes: str = "",
) -> Row:
    """A rate beside its ceiling; the goal is a share of the ceiling."""
    ratio = value / ceiling if ceiling > 0 and math.isfinite(value) else math.nan
    return Row(
        section,
        figure,
        database,
        num(value, unit),
        num(ceiling, unit),
        num(ratio, digits=2),
        f">= {goal:.1f} x ceiling",
        yes(ratio >= goal) if math.isfinite(ratio) else "n/a",
        notes,
    )


def settle(row: Row, ceiling: float) -> None:
    """Fill in a pending rate row's ceiling, ratio and verdict."""
    ratio = row.rate / ceiling if ceiling > 0 and math.isfinite(row.rate) else math.nan
    row.ceiling = num(ceiling, row.unit)
    row.ratio = num(ratio, digits=2)
    row.met = yes(ratio >= row.goal_ratio) if math.isfinite(ratio) else "n/a"


def na_row(section: str, figure: str, database: str, why: str) -> Row:
    return Row(section, figure, database, "n/a", met="n/a", notes=why)


def markdown(rows: list[Row]) -> str:
    """A markdown table, its columns padded so it also reads as plain text."""
    table = [COLUMNS, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(COLUMNS), rule, *(line(r.cells()) for r in rows)])
