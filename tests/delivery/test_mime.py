"""The bulk MIME skeleton produces standards-correct messages, like build_message does."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import default

import pytest

from dispatcher.delivery.mime import BulkMessage

NAME = "Jöhanna Müller-Lüdenscheidt Immobilien Beratung GmbH & Co"


@pytest.mark.parametrize(
    ("from_name", "subject"),
    [
        (None, "Hi Pat"),
        ("Jo Agent", "Open house " + "this weekend " * 10),
        (NAME, "Prix spécial für Sie, Zoë — " + "très " * 20),
    ],
)
def test_bulk_messages_parse_back_exactly(from_name: str | None, subject: str) -> None:
    text = "Hello Zoë\nA line with trailing space \n" + "long " * 60 + "\n.\nend"
    html = "<p>Hello Zoë — " + "x" * 300 + " = done</p>\n<p>line2</p>"
    raw = BulkMessage(
        from_address="agent@kw.example.com", from_name=from_name, reply_to="jo@example.org"
    ).render(
        to="pat@example.org",
        subject=subject.strip(),
        message_id="<k1@mail.example.com>",
        date="Mon, 02 Nov 2026 09:00:00 +0000",
        text=text,
        html=html,
    )
    lines = raw.split(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in lines) <= 78
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")  # headers are 7-bit
    for word in (w for w in head.split() if w.startswith("=?")):
        assert len(word) <= 75, word
    msg = message_from_bytes(raw, policy=default)
    assert msg["Subject"] == " ".join(subject.split())
    assert msg["From"].addresses[0].display_name == (from_name or "")
    assert msg["From"].addresses[0].addr_spec == "agent@kw.example.com"
    assert (msg["To"], msg["Reply-To"], msg["Message-ID"]) == (
        "pat@example.org",
        "jo@example.org",
        "<k1@mail.example.com>",
    )
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert plain == text + "\n"
    assert msg.get_body(("html",)).get_content().replace("\r\n", "\n") == html + "\n"
