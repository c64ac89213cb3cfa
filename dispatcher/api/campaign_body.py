"""The body of ``POST /v1/campaigns``, read without a Python object per recipient at once.

FastAPI would parse the whole body and validate it into one list: for a campaign of a million
recipients, over a gigabyte of dicts in the API process. Here the body's text is kept, its
other members are decoded at once, and the ``recipients`` array is decoded one element at a
time, each handed to :func:`dispatcher.campaigns.recipients.read` as it is parsed: only the
batch being read exists as objects. The answers are FastAPI's own: a body that is not JSON is
``invalid_json`` at its line and column, fields missing, unknown or of the wrong type are
``invalid_field``, every one named (``recipients[3].email``), and nothing is stored or charged.

The ``recipients`` array is decoded where it stands. When the body does not end with it (the
text after it is more than ``}``), it is first stepped over, element by element, to read the
members after it: twice the decoding, the same memory.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

_WHITE = " \t\n\r"
_SPACE = re.compile(r"[ \t\n\r]*")
_decode = json.JSONDecoder().raw_decode
#: The members the recipients array is read apart from.
RECIPIENTS = "recipients"


class CampaignBody:
    """A campaign request's body: its members but the recipients (:attr:`head`), and the
    recipients, read once (:meth:`rows`). Shape errors of either are raised as FastAPI raises
    them (:class:`RequestValidationError`): the head's by :meth:`validated`, the rows' once the
    last row was read, so the reader stores nothing before."""

    def __init__(self, text: str, model: type[BaseModel], row: TypeAdapter[Any]) -> None:
        self.text = text
        self.head: dict[str, Any] = {}
        self._model = model
        self._row = row
        self._rows_at: int | None = None  # after the array's "[" when it is read in place
        self._tail_read = False  # the members after the array were read
        self._rows_read = False
        self._before: set[str] = set()  # the members before the array, when read in place
        self._head_errors: list[dict[str, Any]] = []
        self._errors: list[dict[str, Any]] = []  # the rows'
        at = _space(text, 0)
        if at == len(text):
            raise _shape("missing", "Field required", None)
        if text[at] != "{":
            value, end = self._value(at)
            self._end(end)
            raise _shape("model_attributes_type", _NOT_OBJECT, value)
        self._members(at + 1, first=True)

    # ----------------------------------------------------------------- the head

    def validated(self) -> BaseModel | None:
        """The head as the model validates it (with no recipients), or None when it is
        refused: then :meth:`refuse` raises every error, the rows' included."""
        if self._rows_at is None:
            self._rows_read = True
        fields = dict(self.head)
        if self._rows_at is not None:
            fields[RECIPIENTS] = []
        try:
            model = self._model.model_validate(fields)
        except ValidationError as exc:
            self._head_errors = _located(exc.errors(), ("body",))
            return None
        self._head_errors = []
        return model

    def refuse(self) -> RequestValidationError:
        """Every shape error of the body, the rows read to the end first."""
        if not self._rows_read:
            for _ in self.rows():
                pass
        return self._refusal()

    def _refusal(self) -> RequestValidationError:
        order = list(self._model.model_fields)

        def place(error: dict[str, Any]) -> int:
            loc = error.get("loc", ())
            name = loc[1] if len(loc) > 1 else ""
            return order.index(name) if name in order else len(order)

        errors = sorted([*self._head_errors, *self._errors], key=place)
        return RequestValidationError(errors, body=self.head)

    # ----------------------------------------------------------------- the rows

    def rows(self) -> Iterator[Any]:
        """The recipients array's elements, in order, each decoded as it is reached. A row
        of the wrong shape is still handed over (its index counts); after the last row, the
        body's shape errors, if any, are raised."""
        self._rows_read = True
        if self._rows_at is None:
            self._fail_if_refused()
            return
        end = yield from self._elements(self._rows_at, self._check)
        if not self._tail_read:
            self._tail_read = True
            self._members(end, first=False)
            late = set(self.head) - self._before
            if late and self.validated() is not None:
                # Only the recipients are an array today, so a body that ends with one has no
                # valid member after it; a later array field would land here: the rows were
                # read under the members before the array alone.
                self._errors.append(_misplaced(sorted(late)[0]))
        self._fail_if_refused()

    def _check(self, index: int, row: Any) -> None:
        """A row of the wrong shape is an error of the body (the common row is checked
        without pydantic: a dict of strings and a dict of fields)."""
        if (
            type(row) is dict
            and type(row.get("id")) is str
            and type(row.get("email")) is str
            and type(row.get("fields", _FIELDS)) is dict
            # id and email, and nothing but fields besides (a keys view compared with a set
            # costs twice the rest of this check)
            and (len(row) == 2 or (len(row) == 3 and "fields" in row))
        ):
            return
        try:
            self._row.validate_python(row)
        except ValidationError as exc:
            self._errors.extend(_located(exc.errors(), ("body", RECIPIENTS, index)))

    def _fail_if_refused(self) -> None:
        if self._errors or self._head_errors:
            raise self._refusal()

    # ----------------------------------------------------------------- parsing

    def _members(self, at: int, *, first: bool) -> None:
        """The object's members from ``at`` (after its ``{``, or after the recipients array)
        to its ``}``; stops at the recipients array when it ends the body."""
        text = self.text
        at = _space(text, at)
        if not first or text[at : at + 1] != "}":
            while True:
                if not first:
                    if text[at : at + 1] == "}":
                        break
                    if text[at : at + 1] != ",":
                        raise _json_error("Expecting ',' delimiter", text, at)
                    at = _space(text, at + 1)
                first = False
                if text[at : at + 1] != '"':
                    raise _json_error("Expecting property name enclosed in double quotes", text, at)
                key, at = self._value(at)
                at = _space(text, at)
                if text[at : at + 1] != ":":
                    raise _json_error("Expecting ':' delimiter", text, at)
                at = _space(text, at + 1)
                if key == RECIPIENTS and text[at : at + 1] == "[":
                    if self._rows_at is not None:
                        self._errors.append(_twice())
                        value, at = self._value(at)
                    elif _ends_with_array(text):
                        self._rows_at = at + 1
                        self._before = set(self.head)
                        return
                    else:
                        self._rows_at = at + 1
                        at = self._step_over(at + 1)
                        self._tail_read = True
                    at = _space(text, at)
                    continue
                value, at = self._value(at)
                self.head[key] = value
                at = _space(text, at)
        self._end(at + 1)

    def _elements(
        self, at: int, check: Callable[[int, Any], None] | None = None
    ) -> Generator[Any, None, int]:
        """The elements of the array whose ``[`` is just before ``at``, each decoded as it is
        reached (and given to ``check`` with its index first); returns where the array ends,
        after its ``]``."""
        text = self.text
        at = _space(text, at)
        if text[at : at + 1] == "]":
            return at + 1
        index = 0
        while True:
            value, at = self._value(at)
            if check is not None:
                check(index, value)
            yield value
            index += 1
            at = _space(text, at)
            mark = text[at : at + 1]
            if mark == "]":
                return at + 1
            if mark != ",":
                raise _json_error("Expecting ',' delimiter", text, at)
            at = _space(text, at + 1)

    def _step_over(self, at: int) -> int:
        """After the recipients array whose ``[`` is just before ``at``: its elements decoded
        and dropped (they are decoded again, one by one, by :meth:`rows`)."""
        elements = self._elements(at)
        while True:
            try:
                next(elements)
            except StopIteration as done:
                end: int = done.value
                return end

    def _value(self, at: int) -> tuple[Any, int]:
        try:
            return _decode(self.text, at)
        except json.JSONDecodeError as exc:
            raise _json_error(exc.msg, self.text, exc.pos) from None

    def _end(self, at: int) -> None:
        if _space(self.text, at) != len(self.text):
            raise _json_error("Extra data", self.text, at)


_NOT_OBJECT = "Input should be a valid dictionary or object to extract fields from"
_FIELDS: dict[str, Any] = {}


class ReadsBodyFirst(APIRoute):
    """A route that reads its body as text (:func:`read_body`) before anything else, as
    FastAPI reads a body it parses: the size cap answers 413 before authentication answers
    401, and no answer leaves a body unread on the connection. What is wrong with the body is
    answered after authentication, by :func:`body_text`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_first(request: Request) -> Response:
            try:
                request.state.body_text = await read_body(request)
            except (RequestValidationError, HTTPException) as exc:
                request.state.body_text = exc
            return await handler(request)

        return read_first


async def body_text(request: Request) -> str:
    """The body :class:`ReadsBodyFirst` read, or what was wrong with it, raised."""
    found: str | Exception = request.state.body_text
    if isinstance(found, Exception):
        raise found
    return found


async def read_body(request: Request) -> str:
    """The request's body as text, as FastAPI takes a JSON body: ``application/json`` (or
    ``+json``) only, UTF-8. The body's bytes are let go once it is text."""
    kind = request.headers.get("content-type")
    raw = bytearray()
    async for part in request.stream():
        raw += part
    if not raw:
        raise _shape("missing", "Field required", None)
    if kind is None or not _is_json(kind):
        raise _shape("model_attributes_type", _NOT_OBJECT, bytes(raw[:64]))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "There was an error parsing the body") from None


def _is_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _space(text: str, at: int) -> int:
    """``at``, past any JSON whitespace."""
    if at < len(text) and text[at] not in _WHITE:
        return at
    end: int = _SPACE.match(text, at).end()  # type: ignore[union-attr]
    return end


def _ends_with_array(text: str) -> bool:
    """Whether the body's last member's value is an array (``...] }``): the recipients
    array, or a member refused anyway (no other field is an array)."""
    stripped = text.rstrip(_WHITE)
    return stripped.endswith("}") and stripped[:-1].rstrip(_WHITE).endswith("]")


def _located(errors: list[Any], prefix: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [{**e, "loc": (*prefix, *e.get("loc", ()))} for e in errors]


def _misplaced(name: str) -> dict[str, Any]:
    return {
        "type": "value_error",
        "loc": ("body", name),
        "msg": "Value error, must come before recipients",
        "input": None,
    }


def _twice() -> dict[str, Any]:
    return {
        "type": "value_error",
        "loc": ("body", RECIPIENTS),
        "msg": "Value error, listed twice in the body",
        "input": None,
    }


def _shape(kind: str, message: str, value: Any) -> RequestValidationError:
    return RequestValidationError(
        [{"type": kind, "loc": ("body",), "msg": message, "input": value}]
    )


def _json_error(message: str, text: str, at: int) -> RequestValidationError:
    """As FastAPI reports a body that is not JSON (``problems`` gives its line and column)."""
    return RequestValidationError(
        [
            {
                "type": "json_invalid",
                "loc": ("body", at),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": message},
            }
        ],
        body=text,
    )
