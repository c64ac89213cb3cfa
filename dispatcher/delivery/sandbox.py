"""The Jinja2 sandbox that agents' templates render in, and the limits of one render.

The sandbox bounds what one render may take, whatever the template does, so that an agent's
template can fail its own send (``render_error``) but never hold a worker:

- time: a tick at the start of every loop body and in every call (macros, methods, filters,
  tests) counts the render's steps (:data:`MAX_STEPS`) and reads the clock (every 256 loop
  iterations, and at every call) against ``TEMPLATE_RENDER_SECONDS``; a worker on a threads
  pool, where Celery enforces no time limit, relies on this alone;
- memory: every operation that builds a bigger value than it was given (``*``, ``**``, ``+``,
  ``%``, ``~``, the string methods and filters that pad, repeat, join or replace, ``lipsum``)
  is sized before it runs: no value above :data:`MAX_VALUE`, and no more than
  :data:`BUILD_FACTOR` times the output cap built in all; a list or mapping is sized before it
  is turned into text (output, filters, formatting);
- output: each part is rendered as a stream and stops at ``TEMPLATE_MAX_OUTPUT_BYTES`` (the
  subject, folded onto one line, at :data:`~dispatcher.validation.HEADER_MAX`).

Every limit raises :class:`LimitExceeded`, which a render reports as :class:`RenderError`.
"""

from __future__ import annotations

import functools
import inspect
import re
import time
from collections.abc import Callable, Collection, Generator, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

from jinja2 import Template, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup

from dispatcher.settings import Settings

#: Largest string, list or number a template expression may build (a merge-field email
#: never needs more; `{{ 'x' * 10**10 }}` would take the worker's memory).
MAX_VALUE = 1_000_000
#: Loop iterations and calls one render may take (an email's loops run over a few listings).
MAX_STEPS = 1_000_000
#: Characters one render may build in all (intermediate values included), as a multiple of
#: its output cap.
BUILD_FACTOR = 10
#: Steps between two reads of the clock, less one (a mask).
_CLOCK_EVERY = 0xFF


class LimitExceeded(SecurityError):
    """A render went past one of its limits: time, steps, or the size of what it builds."""


@dataclass(frozen=True)
class RenderLimits:
    """What one render may take: wall time (all parts), and UTF-8 bytes per part."""

    seconds: float
    max_output_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> RenderLimits:
        """``TEMPLATE_RENDER_SECONDS`` and ``TEMPLATE_MAX_OUTPUT_BYTES``."""
        return cls(settings.template_render_seconds, settings.template_max_output_bytes)


class _Budget:
    """What is left of one render's limits (in :data:`_BUDGET` while the render runs)."""

    __slots__ = ("built", "deadline", "limits", "steps")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps = MAX_STEPS
        self.built = BUILD_FACTOR * limits.max_output_bytes
        self.deadline = time.monotonic() + limits.seconds

    def tick(self) -> None:
        """A loop iteration: one step; the clock is read every 256."""
        self.steps -= 1
        if not self.steps & _CLOCK_EVERY:
            self.check()

    def call(self) -> None:
        """A call (macro, method, filter, test): one step, and the clock is read, since one
        call may take long (a filter over a long merge field)."""
        self.steps -= 1
        self.check()

    def check(self) -> None:
        """Stop the render when its steps or its time are used up."""
        if self.steps <= 0:
            raise LimitExceeded(f"it took more than {MAX_STEPS:,} steps (loop iterations, calls)")
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"it ran longer than {self.limits.seconds:g} s")

    def refuse_over(self, size: int, limit: int = MAX_VALUE) -> None:
        """Refuse a value bigger than ``limit`` (a container about to be turned into text)."""
        if size > limit:
            raise LimitExceeded(
                f"it would build a value of {size:,} characters or items (limit {limit:,})"
            )

    def build(self, size: int, limit: int = MAX_VALUE) -> None:
        """Account for a value of ``size`` characters or items, before it is built."""
        self.refuse_over(size, limit)
        self.built -= size
        if self.built < 0:
            total = BUILD_FACTOR * self.limits.max_output_bytes
            raise LimitExceeded(f"it built more than {total:,} characters in all")
        self.call()


_BUDGET: ContextVar[_Budget] = ContextVar("template_budget")


def _budget() -> _Budget:
    try:
        return _BUDGET.get()
    except LookupError:
        # Constant folding at compile time lands here: the expression is left for the render.
        raise SecurityError("template code runs only inside a render") from None


_CONTAINERS = (list, tuple, set, frozenset, dict, Namespace)


def _size(value: Any, limit: int = MAX_VALUE) -> int:
    """Characters of a string; items of a container, each counting its own size (at least 1),
    as far as just past ``limit``. Close, within a small factor, to the text it turns into."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, range):
        return len(value)
    if isinstance(value, Namespace):
        value = vars(value)
    children: Iterable[Any]
    if isinstance(value, Mapping):
        children = (part for pair in value.items() for part in pair)
    elif isinstance(value, list | tuple | set | frozenset):
        children = value
    else:
        return 1
    total = 0
    for child in children:
        total += max(1, _size(child, limit - total))
        if total > limit:
            break
    return total


def _int(value: Any) -> int:
    """An int argument as given, anything else as 0 (the call itself then raises)."""
    return value if isinstance(value, int) else 0


def _text(value: Any) -> str:
    """A filter's string argument as the filter will see it."""
    return value if isinstance(value, str) else str(value)


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    """Length of ``s.replace(old, new, count)``, without building it."""
    try:
        found = s.count(old) if len(old) else len(s) + 1
        if isinstance(count, int) and count >= 0:
            found = min(found, count)
        return int(len(s) + found * max(len(new) - len(old), 0))
    except TypeError:
        return 0  # the call itself raises


def _join_size(separator: Any, items: Collection[Any]) -> int:
    """Length of ``separator.join(items)`` (items as text), without building it."""
    return sum(max(1, _size(item)) for item in items) + max(len(items) - 1, 0) * _size(separator)


def _percent_size(fmt: Any, args: Any) -> int:
    """Upper bound of the length of ``fmt % args``: the format, the values, and every width
    and precision its conversions ask for (read as Python's printf parser reads them)."""
    if not isinstance(fmt, str | bytes):
        return 0
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    values = args if isinstance(args, tuple) else (args,)
    starred = sum(abs(v) for v in values if isinstance(v, int))
    total = len(text) + _size(args)
    end = len(text)
    at = text.find("%")
    while at >= 0:
        i = at + 1
        if i < end and text[i] == "(":
            depth, i = 1, i + 1
            while i < end and depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
        while i < end and text[i] in "#0 +-":
            i += 1
        for _ in range(2):  # width, then precision
            if i < end and text[i] == "*":
                total, i = total + starred, i + 1
            else:
                digits = i
                while i < end and text[i].isdigit():
                    i += 1
                if i > digits:
                    total += int(text[digits:i]) if i - digits < 10 else MAX_VALUE + 1
            if i < end and text[i] == ".":
                i += 1
            else:
                break
        at = text.find("%", i + 1)
    return total


def _wordwrap_size(
    s: Any,
    width: Any = 79,
    break_long_words: Any = True,
    wrapstring: Any = None,
    break_on_hyphens: Any = True,
) -> int:
    """The wrapped text (two lines together hold more than ``width``), and the copies
    ``textwrap`` makes while it cuts long words."""
    text = _text(s)
    columns = max(_int(width), 1)
    lines = 2 * len(text) // columns + text.count("\n") + 1
    longest = max(map(len, text.split()), default=0)
    cut = longest * longest // columns if break_long_words else 0
    return len(text) + lines * (_size(wrapstring) if wrapstring is not None else 1) + cut


def _indent_size(s: Any, width: Any = 4, first: Any = False, blank: Any = False) -> int:
    text = _text(s)
    indent = len(width) if isinstance(width, str) else _int(width)
    return len(text) + (text.count("\n") + 2) * indent


def _sum_size(iterable: Any, attribute: Any = None, start: Any = 0) -> int:
    """Adding lists (``start=[]``) builds a new list at every item: count them all."""
    if not isinstance(start, list | tuple):
        return 0
    total, built = _size(start), 0
    for item in iterable:
        total += _size(item)
        built += total
    return built


def _urlize_size(value: Any, *args: Any, **kwargs: Any) -> int:
    """Each word may become a link that repeats it and carries every attribute given."""
    s = _text(value)
    extra = sum(_size(a) for a in (*args, *kwargs.values()) if isinstance(a, str)) + 64
    return 3 * len(s) + (s.count(" ") + s.count("\n") + 1) * extra


_LIPSUM = inspect.signature(generate_lorem_ipsum)


def _lipsum_size(*args: Any, **kwargs: Any) -> int:
    """``lipsum(n, html, min, max)``: n paragraphs of at most ``max`` words."""
    given = _LIPSUM.bind(*args, **kwargs)
    given.apply_defaults()
    return max(_int(given.arguments["n"]), 0) * max(_int(given.arguments["max"]), 0) * 12


#: Filters whose output can outgrow their input: the size of what each will build.
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80: max(len(_text(value)), _int(width)),
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "format": lambda value, *args, **kwargs: _percent_size(_text(value), kwargs or args),
    "join": lambda value, d="", attribute=None: _join_size(d, value),
    "replace": lambda s, old, new, count=None: _replace_size(
        _text(s), _text(old), _text(new), -1 if count is None else count
    ),
    "batch": lambda value, linecount, fill_with=None: 0 if fill_with is None else _int(linecount),
    "slice": lambda value, slices, fill_with=None: _int(slices),
    "sum": _sum_size,
    "urlize": _urlize_size,
}
#: Filters that consume their input to size it: an iterator is listed first.
_CONSUMING = frozenset({"join", "sum"})

#: String methods whose result can outgrow the string: the size of what each will build.
_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda s, width=0, *_: max(len(s), _int(width)),
    "ljust": lambda s, width=0, *_: max(len(s), _int(width)),
    "rjust": lambda s, width=0, *_: max(len(s), _int(width)),
    "zfill": lambda s, width=0: max(len(s), _int(width)),
    "expandtabs": lambda s, tabsize=8: (
        len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(_int(tabsize), 0)
    ),
    "replace": _replace_size,
    "join": _join_size,
    "translate": lambda s, table=None: (
        len(s)
        * max(
            [len(v) for v in table.values() if isinstance(v, str | bytes)]
            if isinstance(table, dict)
            else [],
            default=1,
        )
    ),
}


def _listed(args: tuple[Any, ...], at: int) -> tuple[Any, ...]:
    """``args`` with the iterator at ``at`` turned into a list, so it can be sized and used."""
    if len(args) > at and not isinstance(args[at], Collection):
        return (*args[:at], list(args[at]), *args[at + 1 :])
    return args


def _budgeted(
    func: Callable[..., Any], size: Callable[..., int] | None = None, consuming: bool = False
) -> Callable[..., Any]:
    """``func`` (a filter, test or global) as a step of the render, that refuses a container
    too big to turn into text, and builds nothing bigger than :meth:`_Budget.build` allows."""
    skip = 0 if getattr(func, "jinja_pass_arg", None) is None else 1  # context/environment

    @functools.wraps(func)
    def budgeted(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        budget.call()
        if consuming:
            args = _listed(args, skip)
        # The context or environment Jinja passes first is never a container.
        for value in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(value, _CONTAINERS):
                budget.refuse_over(_size(value))
        if size is not None:
            budget.build(size(*args[skip:], **kwargs))
        return func(*args, **kwargs)

    return budgeted


def _finalize(value: Any) -> Any:
    """Every ``{{ ... }}``: a list or mapping is sized before it is turned into text."""
    if type(value) is not str and isinstance(value, _CONTAINERS):
        _budget().build(_size(value))
    return value


class _BudgetedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, each field sized (value, width, precision) first."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        widths = sum(
            int(d) if len(d) < 10 else MAX_VALUE + 1 for d in re.findall(r"\d+", format_spec)
        )
        _budget().build(_size(value) + widths)
        return super().format_field(value, format_spec)


class _BudgetedEscapeFormatter(_BudgetedFormatter, SandboxedEscapeFormatter):
    """``Markup.format``: sized, then escaped."""


class _BudgetedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with a tick at the start of every loop body and sized ``~``.

    The tick is ``environment.tick()``: template variables compile to mangled local names
    (``l_0_environment``), so no ``{% set %}`` can shadow or replace it.
    """

    _loop_body_next = False

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        # The first block Jinja's visit_For writes is the loop body (the else block follows).
        self._loop_body_next = True
        super().visit_For(node, frame)

    def blockvisit(self, nodes: Iterable[nodes.Node], frame: Frame) -> None:
        if self._loop_body_next:
            self._loop_body_next = False
            self.writeline("environment.tick()")
        super().blockvisit(nodes, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.volatile"  # as Jinja's own Concat decides
        else:
            markup = str(bool(frame.eval_ctx.autoescape))
        self.write(f"environment.concat_values({markup}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, where what a render takes is bounded (see the module's doc)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BudgetedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.filters = {
            name: _budgeted(func, _FILTER_SIZES.get(name), name in _CONSUMING)
            for name, func in self.filters.items()
        }
        self.tests = {
            name: _budgeted(cast("Callable[..., Any]", func)) for name, func in self.tests.items()
        }
        self.globals["lipsum"] = _budgeted(
            cast("Callable[..., Any]", generate_lorem_ipsum), _lipsum_size
        )

    def tick(self) -> None:
        """A loop iteration (the generated code calls it at the start of every loop body)."""
        _budget().tick()

    def concat(self, parts: Iterable[str]) -> str:
        """The text of a macro, call block, ``{% set %}`` block or filter block."""
        parts = parts if isinstance(parts, list) else list(parts)
        budget = _budget()
        budget.build(sum(map(len, parts)), budget.limits.max_output_bytes)
        return "".join(parts)

    def concat_values(self, markup: bool, values: tuple[Any, ...]) -> str:
        """``a ~ b``: sized, then joined as text (escaped where ``markup``)."""
        _budget().build(sum(_size(v) for v in values))
        return markup_join(values) if markup else str_join(values)

    def call(
        __self,  # Jinja's signature: a template may pass `self` or `obj` as keywords
        __context: Any,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        budget = _budget()
        budget.call()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str | bytes):
            name = getattr(__obj, "__name__", "")
            size = _METHOD_SIZES.get(name)
            if size is not None:
                if name == "join":
                    args = _listed(args, 0)
                budget.build(size(owner, *args, **kwargs))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # Jinja's own, with sized formatters.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        owner: str = value.__self__
        formatter: SandboxedFormatter
        if isinstance(owner, Markup):
            formatter = _BudgetedEscapeFormatter(self, escape=owner.escape)
        else:
            formatter = _BudgetedFormatter(self)
        is_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if not is_map:
                return type(owner)(formatter.vformat(owner, args, kwargs))
            if kwargs or len(args) != 1:
                raise TypeError("format_map() takes exactly one argument")
            return type(owner)(formatter.vformat(owner, (), args[0]))

        return functools.update_wrapper(wrapper, value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator == "+":
            if isinstance(left, str | bytes | list | tuple):
                budget.build(_size(left) + _size(right))
            return left + right
        if operator == "%":
            budget.build(_percent_size(left, right))
            return left % right
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > 100:
                raise LimitExceeded("exponent too large")
            result = left**right
        else:
            for a, b in ((left, right), (right, left)):
                if isinstance(a, str | bytes | list | tuple) and isinstance(b, int):
                    budget.build(_size(a) * b)
            result = left * right
        if isinstance(result, int) and result.bit_length() > 4 * MAX_VALUE:
            raise LimitExceeded("number too large")
        return result


def render_parts(
    parts: Sequence[tuple[str, Template]], context: dict[str, Any], limits: RenderLimits
) -> list[str]:
    """Render each named part with ``context``, all within one budget of ``limits``; each part
    is a stream that stops as soon as it passes the output cap."""
    cap = limits.max_output_bytes
    token = _BUDGET.set(_Budget(limits))
    try:
        return [_render_part(name, template, context, cap) for name, template in parts]
    finally:
        _BUDGET.reset(token)


def _render_part(name: str, template: Template, context: dict[str, Any], cap: int) -> str:
    chunks: list[str] = []
    append = chunks.append
    size = 0
    # What Template.render runs, without its wrapper that rewrites tracebacks.
    stream = cast(
        "Generator[str, None, None]", template.root_render_func(template.new_context(context))
    )
    try:
        for chunk in stream:
            size += len(chunk)
            if size > cap:
                raise LimitExceeded(f"the {name} part rendered more than {cap:,} bytes")
            append(chunk)
    finally:
        stream.close()
    out = "".join(chunks)
    # A character is 1 to 4 bytes: encode only where the characters alone do not settle it.
    if size * 4 > cap and len(out.encode("utf-8", "surrogatepass")) > cap:
        raise LimitExceeded(f"the {name} part rendered more than {cap:,} bytes")
    return out
