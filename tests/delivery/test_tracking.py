"""Open and click tracking, when on: the copies a real SMTP server receives carry the pixel
and signed redirects; following them records the open and the click on the timeline once,
redirects only to signed targets, and leaves the unsubscribe link direct."""

from __future__ import annotations

import re
from typing import Any

import pytest

from devstack.devsmtp import DevSMTPServer, Received
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery import tracking
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from dispatcher.settings import Settings
from tests.helpers import make_user, run_campaign, send_request, timeline_rows

HTML = (
    '<html><body><p>Hi {{ first_name }}, see <a href="https://homes.example/listing?id=7&amp;'
    'utm=x">the listing</a> or <a href="mailto:agent@kw.example.com">write</a>.</p>'
    "</body></html>"
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.with_overrides(track_opens=True, track_clicks=True)


def _html(message: Received) -> str:
    return str(message.parsed().get_body(("html",)).get_content())


def _path(url: str) -> str:
    return url.split("127.0.0.1:8000", 1)[1]


def test_a_tracked_smartplan_copy_records_its_open_and_click_once(
    runtime: Runtime, smtp_server: DevSMTPServer, api_client: Any
) -> None:
    make_user(runtime)
    send_id = submit_send(runtime, InlineQueue(), send_request(html=HTML)).send_id
    delivery.deliver(runtime, send_id)
    html = _html(smtp_server.messages[0])
    assert "https://homes.example/listing" not in html  # only through the redirect
    assert 'href="mailto:agent@kw.example.com"' in html  # not http(s): left alone
    [click] = re.findall(r'href="(http://127\.0\.0\.1:8000/t/c/[^"]+)"', html)
    [pixel] = re.findall(r'<img src="(http://127\.0\.0\.1:8000/t/o/[^"]+)"', html)
    assert html.index(pixel) < html.index("</body>")
    plain = smtp_server.messages[0].parsed().get_body(("plain",)).get_content()
    assert "https://homes.example/listing?id=7&utm=x" in plain  # the text part is untouched

    for _ in range(2):  # a second load or click records nothing more
        opened = api_client.get(_path(pixel), headers={"Authorization": ""})
        assert opened.status_code == 200 and opened.content == tracking.PIXEL
        assert opened.headers["content-type"] == "image/gif"
        went = api_client.get(_path(click), follow_redirects=False, headers={"Authorization": ""})
        assert went.status_code == 302
        assert went.headers["location"] == "https://homes.example/listing?id=7&utm=x"
    events = [(e.kind.value, e.detail) for e in timeline_rows(runtime, "agent-1")]
    assert sorted(events) == [
        ("clicked", "https://homes.example/listing?id=7&utm=x"),
        ("email_sent", "250 2.0.0 OK: queued"),
        ("opened", None),
    ]

    # An altered, forged or swapped token is 404: nothing recorded, never a redirect.
    token = click.rsplit("/", 1)[1]
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    forged = tracking.token(
        runtime.settings.with_overrides(unsubscribe_secret="another-secret-0123456789"),
        tracking.CLICK,
        send_id,
        "https://evil.example/",
    )
    for bad in (
        f"/t/c/{flipped}",
        f"/t/c/{forged}",
        "/t/c/nope",
        _path(pixel).replace("/o/", "/c/"),
    ):
        r = api_client.get(bad, follow_redirects=False)
        assert r.status_code == 404, (bad, r.text)
    assert len(timeline_rows(runtime, "agent-1")) == 3


def test_a_tracked_campaign_copy_keeps_its_unsubscribe_link_direct(
    runtime: Runtime, smtp_server: DevSMTPServer, api_client: Any, worker: Any
) -> None:
    make_user(runtime)
    body = {
        "user_id": "agent-1",
        "message": {
            "subject": "Open house",
            "html": '<p><a href="https://homes.example/open">Open house</a> '
            '<a href="http://127.0.0.1:8000/u/keep">unsubscribe</a></p>',
        },
        "recipients": [{"id": f"c{i}", "email": f"person{i}@example.org"} for i in range(3)],
    }
    run_campaign(api_client, body)
    assert len(smtp_server.messages) == 3
    pixels = set()
    for message in smtp_server.messages:
        html = _html(message)
        assert 'href="http://127.0.0.1:8000/u/keep"' in html
        assert "https://homes.example/open" not in html
        pixels.update(re.findall(r'<img src="http://127\.0\.0\.1:8000/t/o/([^"]+)"', html))
    assert len(pixels) == 3  # one per copy


def test_tracking_is_off_by_default(make_runtime: Any, smtp_server: DevSMTPServer) -> None:
    rt = make_runtime(track_opens=False, track_clicks=False)
    make_user(rt)
    delivery.deliver(rt, submit_send(rt, InlineQueue(), send_request(html=HTML)).send_id)
    html = _html(smtp_server.messages[0])
    assert "/t/" not in html and 'href="https://homes.example/listing?id=7&amp;utm=x"' in html
