"""The query parameters of every list endpoint: a page size and the cursor of the page."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from dispatcher.pages import MAX_LIMIT

Limit = Annotated[
    int, Query(ge=1, le=MAX_LIMIT, description=f"At most this many entries (1-{MAX_LIMIT}).")
]
Cursor = Annotated[
    str | None,
    Query(
        description="Where to go on: the `next_cursor` of the previous page (absent: the first "
        "page). Opaque; a cursor of another list, or altered, is refused with 422 (`cursor`).",
    ),
]

#: How every list answers, for the routes' descriptions.
ENVELOPE = (
    "Answers one page `{items, next_cursor}`; `next_cursor` is null on the last page. "
    "Following the cursors visits every entry that existed when the walk began exactly once, "
    "in a stable order, whatever is added meanwhile."
)
