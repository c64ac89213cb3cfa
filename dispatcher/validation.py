"""Input checks shared by the HTTP API and the Python producer API; errors name the field."""

from __future__ import annotations

import re

from dispatcher.errors import InvalidInput

_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


def address(field: str, value: object) -> str:
    """A deliverable mailbox address (dot-atom local part, DNS domain); returns it stripped."""
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    no_line_breaks(field, value)
    addr = value.strip()
    if not addr:
        raise InvalidInput(field, "must not be empty")
    if len(addr) > 254:
        raise InvalidInput(field, "is longer than 254 characters")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise InvalidInput(field, f"{addr!r} is not a valid email address (no local@domain)")
    if len(local) > 64 or not _LOCAL.match(local):
        raise InvalidInput(field, f"{addr!r} is not a valid email address (local part)")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise InvalidInput(field, f"{addr!r} is not a valid email address (domain)")
    return addr


def no_line_breaks(field: str, value: str) -> str:
    """Reject CR, LF and other line separators: they would inject headers."""
    if any(ch in value for ch in "\r\n\x0b\x0c\x85\u2028\u2029\x00"):
        raise InvalidInput(field, "must not contain line breaks or NUL")
    return value


#: Longest header value (RFC 5322's line limit): a subject, as given and as rendered.
MAX_HEADER_CHARS = 998


def header_text(
    field: str, value: object, *, max_len: int = MAX_HEADER_CHARS, required: bool = True
) -> str:
    """A single-line header value such as a subject or display name."""
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    no_line_breaks(field, value)
    if required and not value.strip():
        raise InvalidInput(field, "must not be empty")
    if len(value) > max_len:
        raise InvalidInput(field, f"is longer than {max_len} characters")
    return value


def identifier(field: str, value: object) -> str:
    """An id chosen by a producer (user, contact, SmartPlan, run, step)."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise InvalidInput(field, "must be a string")
    text = str(value)
    if not _IDENT.match(text):
        raise InvalidInput(
            field,
            f"{text!r} is not a valid id (1-128 letters, digits or _.:@-, starting with a "
            "letter or digit)",
        )
    return text


def body(field: str, value: object, *, max_bytes: int, required: bool = True) -> str | None:
    """A message body: non-empty when required, at most ``max_bytes`` in UTF-8."""
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    if "\x00" in value:
        raise InvalidInput(field, "must not contain NUL")
    if required and not value.strip():
        raise InvalidInput(field, "must not be empty")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidInput(field, f"is {size} bytes; the limit is {max_bytes}")
    return value
