"""The one text policy for every string a producer gives us, over HTTP or the Python producer
API: well-formed Unicode (no lone UTF-16 surrogates), no control characters where they make no
sense (bodies keep tab and line breaks; ids, addresses, names and subjects keep none), and
lengths that fit the columns they are stored in. Every refusal is :class:`InvalidInput`
naming the field; :class:`Findings` gathers the refusals of several fields at once."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

import idna
from sqlalchemy.orm import InstrumentedAttribute

from dispatcher.errors import InvalidInput
from dispatcher.models import Campaign, Send, User

P = ParamSpec("P")
T = TypeVar("T")


def column_length(column: InstrumentedAttribute[Any]) -> int:
    """The declared length of a ``String(n)`` column: what a value stored in it may hold."""
    length = getattr(column.property.columns[0].type, "length", None)
    if not isinstance(length, int):
        raise TypeError(f"{column} has no declared length")
    return length


#: Lengths of what producers name, taken from the columns that store them.
ID_MAX = column_length(User.id)  # users, contacts, SmartPlan plans, runs and steps
ADDRESS_MAX = column_length(Send.contact_email)
NAME_MAX = column_length(Send.from_name)  # display names and campaign names
TIMEZONE_MAX = column_length(User.timezone)
PLAN_MAX = column_length(User.plan)
#: A MailChimp API key (about 40 characters); stored sealed, which its column has room for.
MAILCHIMP_KEY_MAX = 128
MAILCHIMP_LIST_MAX = column_length(User.mailchimp_list_id)
REQUEST_KEY_MAX = column_length(Campaign.idempotency_key)
POSTAL_ADDRESS_MAX = column_length(User.postal_address)
#: A subject or other header line: RFC 5322's line length.
HEADER_MAX = 998
#: A merge field: names as long as an id, values up to 10,000 characters each.
MERGE_NAME_MAX = ID_MAX
MERGE_VALUE_MAX = 10_000

_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
#: RFC 6531's local part: the dot-atom's characters plus any non-ASCII character (the text
#: policy has already refused controls, line separators and lone surrogates).
_LOCAL_UTF8 = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+)*"
)
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")
#: An address :func:`address` takes exactly as it is: at most 64 characters before the @, a
#: dot-atom local part and two or more DNS labels (ASCII only, so nothing to strip or refuse).
_PLAIN_ADDRESS = re.compile(
    rf"(?=[^@]{{1,64}}@){_LOCAL.pattern}@(?:{_LABEL.pattern}\.)+{_LABEL.pattern}"
)
#: What a one-line value may not hold: C0 and C1 controls, Unicode line and paragraph
#: separators, lone surrogates. A body may hold tab, LF, CR and the separators.
_NOT_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NOT_IN_BODY = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def shown(value: object, limit: int = 80) -> str:
    """``value`` quoted for an error message: control characters and surrogates escaped (the
    answer is always valid UTF-8 JSON), cut to about ``limit`` characters."""
    quoted = repr(value if isinstance(value, str) else str(value))
    return quoted if len(quoted) <= limit else quoted[: limit - 4] + "...'"


def printable(value: object, limit: int) -> str:
    """``value`` as text to echo back (a field path, a report): as it is when printable,
    escaped otherwise (always valid UTF-8); at most ``limit`` characters."""
    given = str(value)
    if given.isprintable():
        return given[:limit]
    return shown(given, limit)


def _bad_character(value: str, *, lines: bool) -> str | None:
    """What is wrong with the first character the policy refuses, or None."""
    found = (_NOT_IN_BODY if lines else _NOT_IN_LINE).search(value)
    if found is None:
        return None
    ch, at = found.group(), found.start()
    if "\ud800" <= ch <= "\udfff":
        return f"contains a lone UTF-16 surrogate (half a character) at position {at}"
    kind = "control characters" if lines else "control characters or line breaks"
    return f"must not contain {kind} (U+{ord(ch):04X} at position {at})"


def text(
    field: str, value: object, *, max_len: int, lines: bool = False, required: bool = True
) -> str:
    """A string under the policy: ``lines`` allows tab, CR and LF (bodies), otherwise it is
    one line; at most ``max_len`` characters; not blank when ``required``."""
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    problem = _bad_character(value, lines=lines)
    if problem is not None:
        raise InvalidInput(field, problem)
    if required and not value.strip():
        raise InvalidInput(field, "must not be empty")
    if len(value) > max_len:
        raise InvalidInput(field, f"is {len(value):,} characters; the limit is {max_len:,}")
    return value


def address(field: str, value: object, *, utf8_local: bool = False) -> str:
    """A deliverable mailbox address (dot-atom local part, DNS domain); returns it stripped,
    an internationalised domain as its ASCII (punycode) form (``bücher.example`` is
    ``xn--bcher-kva.example``), so one mailbox has one spelling in SQL and on the wire.

    ``utf8_local`` accepts non-ASCII characters before the @ (RFC 6531): a contact's address,
    sent with SMTPUTF8 when the relay offers it (:attr:`~dispatcher.delivery.message.
    Envelope.smtputf8`). The agents' own addresses stay ASCII: they appear in every header a
    recipient's server must read."""
    addr = text(field, value, max_len=HEADER_MAX).strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise InvalidInput(field, f"{shown(addr)} is not a valid email address (no local@domain)")
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise InvalidInput(
                field, f"{shown(addr)} is not a valid email address (domain: {exc})"
            ) from None
    if local.isascii():
        valid_local = len(local) <= 64 and _LOCAL.fullmatch(local) is not None
    elif not utf8_local:
        raise InvalidInput(
            field,
            f"{shown(addr)} is not accepted here: non-ASCII characters before the @ are "
            "accepted for contacts' addresses only",
        )
    else:
        valid_local = len(local.encode("utf-8")) <= 64 and _LOCAL_UTF8.fullmatch(local) is not None
    if not valid_local:
        raise InvalidInput(field, f"{shown(addr)} is not a valid email address (local part)")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidInput(field, f"{shown(addr)} is not a valid email address (domain)")
    addr = f"{local}@{domain}"
    if len(addr) > ADDRESS_MAX:
        raise InvalidInput(field, f"is longer than {ADDRESS_MAX} characters")
    return addr


def is_plain_address(value: object) -> bool:
    """Whether :func:`address` accepts ``value`` as it is (returns it unchanged): the common
    case, checked at once for a campaign's many recipients; anything else takes
    :func:`address` for its answer."""
    return (
        type(value) is str
        and len(value) <= ADDRESS_MAX
        and _PLAIN_ADDRESS.fullmatch(value) is not None
    )


def postal_address(field: str, value: object) -> str:
    """An agent's postal address as their mail's footer shows it: one line (its parts separated
    by commas), not blank, at most ``POSTAL_ADDRESS_MAX`` characters; returned stripped."""
    return text(field, value, max_len=POSTAL_ADDRESS_MAX).strip()


def header_text(
    field: str, value: object, *, max_len: int = HEADER_MAX, required: bool = True
) -> str:
    """A single-line value such as a subject or display name."""
    return text(field, value, max_len=max_len, required=required)


def identifier(field: str, value: object, *, max_len: int = ID_MAX) -> str:
    """An id chosen by a producer (user, contact, SmartPlan, run, step, request key)."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise InvalidInput(field, "must be a string")
    ident = str(value)
    if len(ident) > max_len or not _IDENT.fullmatch(ident):
        raise InvalidInput(
            field,
            f"{shown(ident)} is not a valid id (1-{max_len} letters, digits or _.:@-, starting "
            "with a letter or digit)",
        )
    return ident


def is_plain_identifier(value: object, max_len: int = ID_MAX) -> bool:
    """Whether :func:`identifier` accepts ``value`` as it is (a string it returns unchanged)."""
    return type(value) is str and len(value) <= max_len and _IDENT.fullmatch(value) is not None


def body(field: str, value: object, *, max_bytes: int, required: bool = True) -> str | None:
    """A message body: tab and line breaks allowed, non-empty when required, at most
    ``max_bytes`` in UTF-8."""
    if value is None and not required:
        return None
    checked = text(field, value, max_len=max_bytes, lines=True, required=required)
    size = len(checked.encode("utf-8"))
    if size > max_bytes:
        raise InvalidInput(field, f"is {size:,} bytes; the limit is {max_bytes:,}")
    return checked


def merge_fields(field: str, value: object) -> dict[str, Any]:
    """Merge fields: a flat object of names (identifiers) to strings, finite numbers,
    booleans or null; strings follow the body policy (line breaks allowed)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(field, "must be an object of name -> value")
    for key, item in value.items():
        if (
            not isinstance(key, str)
            or not key.isidentifier()
            or key.startswith("_")
            or len(key) > MERGE_NAME_MAX
        ):
            raise InvalidInput(f"{field}.{printable(key, 80)}", "is not a valid merge field name")
        where = f"{field}.{key}"
        if isinstance(item, str):
            text(where, item, max_len=MERGE_VALUE_MAX, lines=True, required=False)
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput(where, "must be a finite number")
        elif item is not None and not isinstance(item, int | float | bool):
            raise InvalidInput(where, "must be a string, number, boolean or null")
    return dict(value)


def are_plain_merge_fields(value: object) -> bool:
    """Whether :func:`merge_fields` accepts ``value`` (a dict it would copy as it is), checked
    without building a field path for every entry."""
    if type(value) is not dict:
        return False
    for key, item in value.items():
        if (
            type(key) is not str
            or not key.isidentifier()
            or key.startswith("_")
            or len(key) > MERGE_NAME_MAX
        ):
            return False
        kind = type(item)
        if kind is str:
            if len(item) > MERGE_VALUE_MAX or _NOT_IN_BODY.search(item) is not None:
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif item is not None and kind is not int and kind is not bool:
            return False
    return True


class Findings:
    """Runs independent checks and keeps every refusal, so one answer names every bad field."""

    def __init__(self) -> None:
        self.problems: list[InvalidInput] = []

    def check(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """``fn(*args, **kwargs)``; None, with the refusal kept, if it refused."""
        try:
            return fn(*args, **kwargs)
        except InvalidInput as exc:
            self.problems.extend(exc.all)
            return None

    def done(self) -> None:
        """Raise :class:`InvalidInput` for the first refusal, carrying the others."""
        if self.problems:
            first, *others = self.problems
            raise InvalidInput(first.field, first.problem, others=others)


def plain_parameters(pairs: Iterable[tuple[str, str]]) -> None:
    """Path and query values (name, value) follow the one-line text policy (no control
    characters, no lone surrogates), so a lookup never hands the database what it cannot
    compare; :class:`InvalidInput` names every one that does not."""
    found = Findings()
    for name, value in pairs:
        found.check(text, name, value, max_len=HEADER_MAX, required=False)
    found.done()
