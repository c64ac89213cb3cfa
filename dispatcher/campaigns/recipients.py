"""A campaign request's recipients, read once, in order, a batch at a time.

Each recipient is checked (an invalid one is reported, never sent or charged), written to the
request's digest, looked up on the agent's suppression list (a suppressed one is reported,
never sent or charged), counted for the merge fields it lacks, and packed: a frame per chunk
of ``CAMPAIGN_CHUNK_SIZE`` recipients (4-byte length, then zlib of the chunk's JSON), the form
a compact campaign keeps on its row until a worker writes its sends, and from which any other
campaign's sends are written.

Only one batch of recipients exists as Python objects at a time, whatever the campaign's size:
the HTTP API hands the rows over one by one as it parses the body
(:mod:`dispatcher.api.campaign_body`). What is kept across the whole request is one contact id
per recipient (a repeated contact is invalid), the packed frames, and the reports of the
invalid and suppressed ones.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from dispatcher import validation
from dispatcher.delivery import suppression
from dispatcher.errors import InvalidInput
from dispatcher.models import SuppressionReason
from dispatcher.runtime import Runtime

#: Request rows checked (and looked up on the suppression list) together.
BATCH = 2000
#: A campaign larger than one batch reads the agent's suppression list whole, in one query,
#: when it has at most this many live entries; a longer list is looked up a batch at a time.
PRELOAD = 100_000


@dataclass(frozen=True)
class Recipient:
    contact_id: str
    email: str
    fields: dict[str, Any] = field(default_factory=dict)


#: A recipient as a request gives it: a :class:`Recipient`, or a mapping with ``id``, ``email``
#: and optionally ``fields`` (the HTTP API's parsed rows, used as they are: no object per row).
RecipientRow = Recipient | Mapping[str, Any]

#: A recipient as stored: contact id, address, merge fields (validated).
Stored = tuple[str, str, dict[str, Any]]

#: How the digest writes values: keys sorted, no spaces (see ``create.request_digest``).
digest_dumps = partial(json.dumps, sort_keys=True, separators=(",", ":"), default=str)


@dataclass
class Read:
    """What reading a request's recipients found."""

    #: The recipients to send to (valid, not suppressed), packed a chunk per frame.
    packed: bytes = b""
    #: How many there are: one send each.
    kept: int = 0
    #: Valid recipients, suppressed ones included.
    valid: int = 0
    #: The invalid ones, in request order: index, contact_id, email, field, reason.
    invalid: list[dict[str, Any]] = field(default_factory=list)
    #: The valid ones on the suppression list, in request order: index, contact_id, email,
    #: reason.
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: Per merge field the message uses without a default, the kept recipients lacking it
    #: (fields none lacks are left out).
    missing: dict[str, int] = field(default_factory=dict)


def read(
    rt: Runtime,
    user_id: str,
    rows: Iterable[RecipientRow],
    *,
    fields: Iterable[str] = (),
    digest: Callable[[bytes], object] | None = None,
) -> Read:
    """Read every row of ``rows`` once (see the module's docstring). ``fields`` are the merge
    fields the message uses without a default; ``digest``, when given, is handed the valid
    recipients' text for the request's digest: ``[contact id, email, fields]`` arrays joined
    by commas (:data:`digest_dumps`).

    Raises :class:`InvalidInput` when there are no rows, or more than
    ``MAX_CAMPAIGN_RECIPIENTS``."""
    limit = rt.settings.max_campaign_recipients
    out = Read(missing=dict.fromkeys(sorted(fields), 0))
    seen: set[str] = set()
    lists = _Lists(rt, user_id)
    packer = _Packer(rt.settings.campaign_chunk_size)
    count = 0
    batches = _batches(rows, BATCH)
    for batch, last in batches:
        if count + len(batch) > limit:
            total = count + len(batch) + sum(len(b) for b, _ in batches)
            raise InvalidInput("recipients", f"lists {total:,}; the limit is {limit:,}")
        valid = _check(batch, count, seen, out.invalid)
        count += len(batch)
        if not valid:
            continue
        if digest is not None:
            text = digest_dumps([[c, e, f] for _, (c, e, f) in valid])[1:-1]
            digest((b"," if out.valid else b"") + text.encode())
        # The last batch with no valid one before it: these are all the campaign has.
        blocked = lists.blocked([e for _, (_, e, _) in valid], last and not out.valid)
        out.valid += len(valid)
        for index, stored in valid:
            why = blocked.get(suppression.normalize(stored[1])) if blocked else None
            if why is not None:
                contact_id, email, _ = stored
                out.skipped.append(
                    {"index": index, "contact_id": contact_id, "email": email, "reason": why.value}
                )
                continue
            for name in out.missing:
                if stored[2].get(name) in (None, ""):
                    out.missing[name] += 1
            packer.add(stored)
    if not count:
        raise InvalidInput("recipients", "must list at least one contact")
    out.packed, out.kept = packer.done()
    out.missing = {name: n for name, n in out.missing.items() if n}
    return out


def _batches(rows: Iterable[RecipientRow], size: int) -> Iterator[tuple[list[RecipientRow], bool]]:
    """``rows`` a list of ``size`` at a time, each with whether it is the last."""
    batch: list[RecipientRow] = []
    for row in rows:
        if len(batch) == size:
            yield batch, False
            batch = []
        batch.append(row)
    if batch:
        yield batch, True


def _values(r: RecipientRow) -> tuple[Any, Any, Any]:
    """A request row's contact id, address and merge fields, as given."""
    if isinstance(r, Recipient):
        return r.contact_id, r.email, r.fields
    if isinstance(r, Mapping):
        return r.get("id"), r.get("email"), r.get("fields")
    return None, None, None


def _check(
    batch: list[RecipientRow], first: int, seen: set[str], invalid: list[dict[str, Any]]
) -> list[tuple[int, Stored]]:
    """The valid recipients of ``batch`` (row ``first`` onwards) with their request rows; the
    invalid ones are reported in ``invalid``. Most rows are checked at once, in place
    (``validation.is_plain_*``); only a row that is not plain goes through the full checks,
    which name its field and what is wrong."""
    valid: list[tuple[int, Stored]] = []
    plain_id, plain_address = validation.is_plain_identifier, validation.is_plain_address
    plain_fields = validation.are_plain_merge_fields
    for i, r in enumerate(batch, start=first):
        given_id, given_email, given_fields = _values(r)
        if (
            plain_id(given_id)
            and plain_address(given_email)
            and (given_fields is None or plain_fields(given_fields))
            and given_id not in seen
        ):
            seen.add(given_id)
            valid.append((i, (given_id, given_email, given_fields or {})))
            continue
        where = f"recipients[{i}]"
        try:
            contact_id = validation.identifier(f"{where}.id", given_id)
            email = validation.address(f"{where}.email", given_email, utf8_local=True)
            fields = validation.merge_fields(f"{where}.fields", given_fields)
            if contact_id in seen:
                raise InvalidInput(f"{where}.id", f"contact {contact_id!r} is listed twice")
        except InvalidInput as exc:
            invalid.append(
                {
                    "index": i,
                    # Quoted as the error messages quote them: always valid UTF-8, and short.
                    "contact_id": validation.printable(given_id, validation.ID_MAX),
                    "email": validation.printable(given_email, validation.ADDRESS_MAX),
                    "field": exc.field,
                    "reason": exc.problem,
                }
            )
            continue
        seen.add(contact_id)
        valid.append((i, (contact_id, email, fields)))
    return valid


class _Lists:
    """The agent's suppression list, as the recipients' batches need it: read whole once when
    it is short (no longer than a one-batch campaign, or ``PRELOAD`` for a larger one), else
    looked up a batch of addresses at a time."""

    def __init__(self, rt: Runtime, user_id: str) -> None:
        self._rt = rt
        self._user_id = user_id
        self._now: datetime = rt.clock.now()
        self._whole: dict[str, SuppressionReason] | None = None
        self._read = False

    def blocked(self, emails: list[str], only: bool) -> dict[str, SuppressionReason]:
        """The suppressed addresses (lower-cased) of a batch, with their reasons; ``only``:
        this batch is all the campaign has."""
        if self._whole is not None:
            return self._whole
        with self._rt.sessions() as session:
            if not self._read:
                limit = len(emails) if only else PRELOAD
                self._whole = suppression.live_entries(session, self._user_id, self._now, limit)
                self._read = True
            if self._whole is not None:
                return self._whole
            return suppression.active(session, self._user_id, emails, self._now)


class _Packer:
    """Recipients packed as they come, a frame per chunk of ``size``."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._part: list[Stored] = []
        self._out = bytearray()
        self._count = 0

    def add(self, stored: Stored) -> None:
        self._part.append(stored)
        if len(self._part) == self._size:
            self._flush()

    def _flush(self) -> None:
        frame = zlib.compress(json.dumps(self._part, separators=(",", ":")).encode(), 1)
        self._out += len(frame).to_bytes(4, "big") + frame
        self._count += len(self._part)
        self._part = []

    def done(self) -> tuple[bytes, int]:
        """The packed recipients and how many there are."""
        if self._part:
            self._flush()
        return bytes(self._out), self._count


def frames(packed: bytes) -> list[bytes]:
    """The frames of packed recipients, one per chunk, in order, still compressed."""
    found = []
    at = 0
    while at < len(packed):
        size = int.from_bytes(packed[at : at + 4], "big")
        found.append(packed[at + 4 : at + 4 + size])
        at += 4 + size
    return found


def unpack(frame: bytes) -> list[Stored]:
    """One chunk's recipients from its frame (:func:`frames`)."""
    return [(c, e, f) for c, e, f in json.loads(zlib.decompress(frame))]


def chunks(packed: bytes) -> Iterator[list[Stored]]:
    """Packed recipients a chunk at a time: only one chunk is held as Python objects."""
    for frame in frames(packed):
        yield unpack(frame)
