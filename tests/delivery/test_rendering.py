"""Sandboxed rendering and standards-correct messages."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import default

import pytest

from dispatcher.delivery.message import build_message, message_id_for
from dispatcher.delivery.rendering import MessageTemplate, context_for, html_to_text
from dispatcher.errors import InvalidInput, RenderError

CTX = context_for("c-1", "pat@example.org", {"first_name": "Pat", "city": "Austin"})


def test_html_is_autoescaped_and_text_and_subject_are_not() -> None:
    ctx = context_for("c-1", "pat@example.org", {"first_name": "<b>Pat</b> & co"})
    r = MessageTemplate(
        "Hi {{ first_name }}", "<p>{{ first_name }}</p>", "Hi {{ first_name }}"
    ).render(ctx)
    assert r.html == "<p>&lt;b&gt;Pat&lt;/b&gt; &amp; co</p>"
    assert r.text == "Hi <b>Pat</b> & co"
    assert r.subject == "Hi <b>Pat</b> & co"


def test_contact_fields_are_reachable_both_ways_and_missing_ones_render_empty() -> None:
    r = MessageTemplate("{{ contact.first_name }} in {{ city }}{{ missing }}", "<p>x</p>").render(
        CTX
    )
    assert r.subject == "Pat in Austin"


def test_a_line_break_from_a_merge_field_cannot_split_the_subject() -> None:
    ctx = context_for("c", "p@example.org", {"first_name": "Pat\r\nBcc: victim@example.org"})
    assert MessageTemplate("Hi {{ first_name }}", "<p>x</p>").render(ctx).subject == (
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
        MessageTemplate("s", source).render(CTX)
    assert "sandbox" in info.value.detail


def test_runtime_errors_are_render_errors() -> None:
    with pytest.raises(RenderError):
        MessageTemplate("s", "{{ 1 / 0 }}").render(CTX)


def test_syntax_errors_name_the_part_and_line() -> None:
    with pytest.raises(InvalidInput) as info:
        MessageTemplate("ok", "<p>\n{% if x %}</p>").check()
    assert info.value.field == "message.html"
    assert "line" in info.value.problem


def test_text_part_is_derived_from_html_when_absent() -> None:
    assert html_to_text("<style>p{}</style><p>Hello&nbsp;Pat</p><p>Bye &amp; thanks</p>") == (
        "Hello Pat\n\nBye & thanks"
    )


def test_message_is_multipart_with_date_and_deterministic_message_id() -> None:
    r = MessageTemplate("Prix spécial für Sie", "<p>Olá</p>", "Olá").render(CTX)
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
