"""Pages of a list: keyset cursors that every list the dispatcher returns walks by.

A list is read in a fixed order of one integer key that never changes for an entry (a row's
id, or its position in a campaign's request). A page ends with an opaque cursor, the base64
of the list's name and the last key it returned; the next page starts after that key. So a
walk sees every entry that existed when it began exactly once, whatever is added meanwhile,
and never reads the rows before its page.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import QueryableAttribute

from dispatcher.errors import InvalidInput

T = TypeVar("T")
R = TypeVar("R")

#: The page size when the caller names none, and the largest it may ask for.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: its entries, and the cursor of the next page (None: this is the
    last one)."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class Keyset:
    """How one list is paged: its name (cursors of another list are refused), its key
    column and whether the key runs down (newest first) or up."""

    name: str
    descending: bool = True

    def cursor(self, key: int) -> str:
        """The opaque cursor of the page after ``key``."""
        raw = json.dumps([self.name, key], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def after(self, cursor: str | None) -> int | None:
        """The key a cursor of this list continues after (None: the first page); raises
        :class:`InvalidInput` on field ``cursor`` for anything this list did not hand out."""
        if cursor is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            name, key = json.loads(raw)
        except (binascii.Error, ValueError, TypeError):
            raise InvalidInput("cursor", "is not a cursor this list handed out") from None
        if name != self.name or type(key) is not int:
            raise InvalidInput("cursor", "is not a cursor this list handed out")
        return key

    def query(
        self, query: Select[Any], column: QueryableAttribute[int], cursor: str | None, limit: int
    ) -> Select[Any]:
        """``query`` narrowed to the page after ``cursor``: one row more than ``limit``, so
        :meth:`page` knows whether another page follows."""
        check_limit(limit)
        after = self.after(cursor)
        if after is not None:
            query = query.where(column < after if self.descending else column > after)
        order = column.desc() if self.descending else column.asc()
        return query.order_by(order).limit(limit + 1)

    def page(
        self, rows: Sequence[R], limit: int, key: Callable[[R], int], view: Callable[[R], T]
    ) -> Page[T]:
        """The page of ``rows`` read by :meth:`query`: at most ``limit`` views, and the cursor
        after the last one when more rows follow."""
        shown = rows[:limit]
        more = len(rows) > limit and bool(shown)
        return Page([view(r) for r in shown], self.cursor(key(shown[-1])) if more else None)

    def of(self, entries: Sequence[T], cursor: str | None, limit: int) -> Page[T]:
        """A page of a list held in memory, keyed by position (a short catalog)."""
        check_limit(limit)
        after = self.after(cursor)
        keyed = list(enumerate(entries))
        if self.descending:
            keyed.reverse()
        if after is not None:
            keyed = [(i, e) for i, e in keyed if (i < after if self.descending else i > after)]
        return self.page(keyed[: limit + 1], limit, lambda ie: ie[0], lambda ie: ie[1])


def walk(read: Callable[[str | None], Page[T]]) -> Iterator[T]:
    """Every entry of a list, page after page: ``read`` answers the page at a cursor."""
    cursor: str | None = None
    while True:
        page = read(cursor)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def check_limit(limit: int) -> None:
    """Refuse a page size outside 1..:data:`MAX_LIMIT` (field ``limit``)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput("limit", f"must be between 1 and {MAX_LIMIT}")
