"""Sandboxed rendering and standards-correct messages."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import default

import pytest

from dispatcher.delivery.message import build_message, message_id_for
from dispatcher.delivery.rendering import MessageTemplate, context_for, html_to_text
from dispatcher.delivery.sandbox import MAX_STEPS, RenderLimits
from dispatcher.errors import InvalidInput, RenderError
from dispatcher.settings import Settings
from dispatcher.validation import HEADER_MAX

CTX = context_for("c-1", "pat@example.org", {"first_name": "Pat", "city": "Austin"})
LIMITS = RenderLimits.of(Settings())


def test_html_is_autoescaped_and_text_and_subject_are_not() -> None:
    ctx = context_for("c-1", "pat@example.org", {"first_name": "<b>Pat</b> & co"})
    r = MessageTemplate(
        "Hi {{ first_name }}", "<p>{{ first_name }}</p>", "Hi {{ first_name }}"
    ).render(ctx, LIMITS)
    assert r.html == "<p>&lt;b&gt;Pat&lt;/b&gt; &amp; co</p>"
    assert r.text == "Hi <b>Pat</b> & co"
    assert r.subject == "Hi <b>Pat</b> & co"


def test_contact_fields_are_reachable_both_ways_and_missing_ones_render_empty() -> None:
    r = MessageTemplate("{{ contact.first_name }} in {{ city }}{{ missing }}", "<p>x</p>").render(
        CTX, LIMITS
    )
    assert r.subject == "Pat in Austin"


def test_a_line_break_from_a_merge_field_cannot_split_the_subject() -> None:
    ctx = context_for("c", "p@example.org", {"first_name": "Pat\r\nBcc: victim@example.org"})
    assert MessageTemplate("Hi {{ first_name }}", "<p>x</p>").render(ctx, LIMITS).subject == (
        "Hi Pat Bcc: victim@example.org"
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ contact.__class__ }}{{ cycler.__init__.__globals__ }}",
        "{{ contact.update({'x': 1}) }}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
    ],
)
def test_templates_cannot_reach_python_internals(source: str) -> None:
    with pytest.raises(RenderError) as info:
        MessageTemplate("s", source).render(CTX, LIMITS)
    assert "sandbox" in info.value.detail


def test_runtime_errors_are_render_errors() -> None:
    with pytest.raises(RenderError):
        MessageTemplate("s", "{{ 1 / 0 }}").render(CTX, LIMITS)


def test_syntax_errors_name_the_part_and_line() -> None:
    with pytest.raises(InvalidInput) as info:
        MessageTemplate("ok", "<p>\n{% if x %}</p>").check()
    assert info.value.field == "message.html"
    assert "line" in info.value.problem


def test_a_derived_text_part_keeps_each_links_target() -> None:
    html = (
        '<p>See <a href="https://homes.example/l/42?a=1&amp;b=2">the listing</a> or write to '
        '<a href="mailto:pat@example.org">pat@example.org</a>.</p>'
        '<p><a href="https://homes.example/">https://homes.example/</a> '
        '<a href="#top">top</a> <a href="javascript:alert(1)">here</a> '
        '<a href="https://img.example/open"><img src="x.png"></a></p>'
    )
    assert html_to_text(html) == (
        "See the listing (https://homes.example/l/42?a=1&b=2) or write to pat@example.org.\n\n"
        "https://homes.example/ top here https://img.example/open"
    )


def test_text_part_is_derived_from_html_when_absent() -> None:
    assert html_to_text("<style>p{}</style><p>Hello&nbsp;Pat</p><p>Bye &amp; thanks</p>") == (
        "Hello Pat\n\nBye & thanks"
    )


def test_message_is_multipart_with_date_and_deterministic_message_id() -> None:
    r = MessageTemplate("Prix spécial für Sie", "<p>Olá</p>", "Olá").render(CTX, LIMITS)
    mid = message_id_for("smartplan|k", "mail.example.com")
    assert mid == message_id_for("smartplan|k", "mail.example.com") != message_id_for("x", "y.z")
    raw = build_message(
        r,
        from_address="agent@kw.example.com",
        from_name="Jo Agent",
        to_address="pat@example.org",
        reply_to="jo@example.org",
        message_id=mid,
        date=datetime(2026, 11, 2, 9, tzinfo=UTC),
    ).as_bytes()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = message_from_bytes(raw, policy=default)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["Subject"] == "Prix spécial für Sie"
    assert msg["From"] == "Jo Agent <agent@kw.example.com>"
    assert msg["Reply-To"] == "jo@example.org"
    assert msg["Message-ID"] == mid
    assert msg["Date"] == "Mon, 02 Nov 2026 09:00:00 +0000"
    assert msg.get_body(("html",)).get_content().strip() == "<p>Olá</p>"


#: Templates that would hold a worker's CPU or memory for hours: each fails its own render.
BOMBS = {
    "loops 10^10 times": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "recurses 2^40 times": (
        "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}"
    ),
    "center filter": "{{ 'a'|center(2000000000) }}",
    "ljust method": "{{ 'a'.ljust(10**9) }}",
    "zfill method": "{{ '1'.zfill(10**9) }}",
    "expandtabs method": "{{ ('\t' * 100000).expandtabs(100000) }}",
    "indent filter": "{{ ('a\n' * 100000)|indent(100000) }}",
    "wordwrap filter": "{{ ('x' * 1000000)|wordwrap(1) }}",
    "format filter": "{{ '%01000000000d'|format(1) }}",
    "% operator": "{{ '%0*d' % (1000000000, 1) }}",
    "str.format": "{{ '{:>1000000000}'.format(1) }}",
    "replace filter": "{{ ('x' * 1000000)|replace('x', 'yyyyyyyyyy') }}",
    "replace method": "{{ ('x' * 1000000).replace('', 'yy') }}",
    "join method": "{{ ('x' * 1000000).join(['a', 'b', 'c']) }}",
    "join filter": "{{ range(100000)|join('x' * 100000) }}",
    "output 10^10 characters": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "doubling with ~": (
        "{% macro f(n, s) %}{% if n %}{{ f(n-1, s ~ s) }}{% else %}{{ s|length }}{% endif %}"
        "{% endmacro %}{{ f(40, 'x') }}"
    ),
    "doubling with +": (
        "{% macro f(n, s) %}{% if n %}{{ f(n-1, s + s) }}{% else %}{{ s|length }}{% endif %}"
        "{% endmacro %}{{ f(40, 'x') }}"
    ),
    "shared list printed": (
        "{% set a = ['x' * 1000000] %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
        "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{{ c }}"
    ),
    "shared list to JSON": (
        "{% set a = ['x' * 1000000] %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}{{ b|tojson }}"
    ),
    "batch filler": "{{ [1]|batch(1000000000, 'x')|list }}",
    "slice count": "{{ [1]|slice(1000000000)|list|length }}",
    "lipsum": "{{ lipsum(1000000000) }}",
    "macro body 10^8 characters": (
        "{% macro m() %}{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}{% endmacro %}"
        "{{ m()|length }}"
    ),
    "sum of lists": "{{ range(100000)|batch(1)|sum(start=[])|length }}",
    "string growing in a namespace": (
        "{% set ns = namespace(s='x') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}"
    ),
}


@pytest.mark.parametrize("source", BOMBS.values(), ids=BOMBS.keys())
def test_a_template_bomb_fails_its_render_quickly(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(RenderError) as info:
        MessageTemplate("s", source).render(CTX, LIMITS)
    assert "exceeded its limits" in info.value.detail
    assert time.monotonic() - started < 10  # the default deadline is 2 s; generous for CI


def test_a_template_cannot_shadow_or_replace_the_loop_tick() -> None:
    source = (
        "{% set environment = none %}{% set tick = none %}{% set context = none %}"
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(RenderError) as info:
        MessageTemplate("s", source).render(CTX, LIMITS)
    assert f"more than {MAX_STEPS:,} steps" in info.value.detail


def test_the_deadline_stops_a_render_that_stays_under_its_steps() -> None:
    # A million-word merge field counted 100,000 times: few steps, each a long one.
    slow = "{% for i in range(100000) %}{{ notes|wordcount }}{% endfor %}"
    ctx = context_for("c-1", "pat@example.org", {"notes": "word " * 1_000_000})
    started = time.monotonic()
    with pytest.raises(RenderError) as info:
        MessageTemplate("s", slow).render(ctx, RenderLimits(0.2, 2_000_000))
    assert "ran longer than 0.2 s" in info.value.detail
    assert time.monotonic() - started < 5


def test_the_output_cap_counts_utf8_bytes_per_part() -> None:
    limits = RenderLimits(2.0, 10_000)
    three_bytes = "{% for i in range(N) %}€{% endfor %}"
    fits = MessageTemplate("s", three_bytes.replace("N", "3333")).render(CTX, limits)
    assert len(fits.html.encode()) == 9999
    with pytest.raises(RenderError) as info:
        MessageTemplate("s", three_bytes.replace("N", "3334")).render(CTX, limits)
    assert "the html part rendered more than 10,000 bytes" in info.value.detail
    # Each part has the whole cap: 9,999 bytes of HTML and 9,999 of text together are fine.
    both = MessageTemplate("s", three_bytes.replace("N", "3333"), three_bytes.replace("N", "3333"))
    assert both.render(CTX, limits).text == "€" * 3333


def test_a_subject_longer_than_a_header_line_fails() -> None:
    ok = MessageTemplate("{{ 'x' * n }}", "<p>x</p>")
    assert len(ok.render({"n": HEADER_MAX}, LIMITS).subject) == HEADER_MAX
    with pytest.raises(RenderError) as info:
        ok.render({"n": HEADER_MAX + 1}, LIMITS)
    assert "the subject rendered" in info.value.detail


def test_ordinary_uses_of_the_budgeted_operations_still_render() -> None:
    source = (
        "{{ first_name|center(9) }}|{{ 'Pat'.ljust(5, '.') }}|{{ '7'.zfill(3) }}|"
        "{{ '%05.1f'|format(3.14159) }}|{{ '%s in %s' % (first_name, city) }}|"
        "{{ '{:>6}'.format(city) }}|{{ city|replace('Aus', 'Bos') }}|"
        "{{ ['a', 'b', 'c']|join(', ') }}|{{ ', '.join(['x', 'y']) }}|{{ '-' * 5 }}|"
        "{{ 'ab' ~ first_name }}|{{ [1, 2] + [3] }}|{{ 'one two three'|wordwrap(7) }}|"
        "{{ 'a\nb'|indent(2) }}|{{ [1, 2, 3, 4, 5]|batch(2, 0)|list }}|"
        "{{ [[1], [2]]|sum(start=[]) }}|"
        "{% for row in [1, 2, 3]|slice(2) %}{{ row }}{% endfor %}|{{ 2 ** 10 }}|"
        "{% macro twice(s) %}{{ s }}{{ s }}{% endmacro %}{{ twice('ha') }}|"
        "{{ {'k': [1, 2]}|tojson }}|{{ 'é'.encode('utf-8')|length }}"
    )
    r = MessageTemplate("s", "", source).render(CTX, LIMITS)
    assert r.text.split("|") == [
        "   Pat   ",
        "Pat..",
        "007",
        "003.1",
        "Pat in Austin",
        "Austin",
        "Bostin",
        "a, b, c",
        "x, y",
        "-----",
        "abPat",
        "[1, 2, 3]",
        "one two\nthree",
        "a\n  b",
        "[[1, 2], [3, 4], [5, 0]]",
        "[1, 2]",
        "[1, 2][3]",
        "1024",
        "haha",
        '{"k": [1, 2]}',
        "2",
    ]
