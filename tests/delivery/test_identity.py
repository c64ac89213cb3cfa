"""Sender identity, DKIM and the compliance footer, as a real SMTP server receives them:
DMARC alignment for agents on and off SENDER_DOMAINS, signatures dkimpy verifies, and the
footer's unsubscribe link and postal address in both parts."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func, select

from devstack.devsmtp import DevSMTPServer, Received
from dispatcher.campaigns import create
from dispatcher.campaigns.run import deliver as deliver_chunk
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import returnpath, smartplan, system_mail
from dispatcher.errors import ConfigError, InvalidInput
from dispatcher.models import Campaign, Send, SendStatus, SystemEmailKind, User
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import get_send, submit_send
from dispatcher.settings import Settings
from dispatcher.users import upsert_user
from tests.helpers import campaign_request, make_user, send_request

#: What is tested here does not depend on the database.
SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

ADDRESS = "350 Main St, Austin, TX 78701"
PLATFORM = "mail.example.com"  # MAIL_FROM's domain in the test settings
BROKERAGE = "brokerage.example"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # quick to make


def _pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _txt(key: rsa.RSAPrivateKey) -> bytes:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A key per sending domain (the brokerage's read from a file), the DKIM_KEYS that
    configure them, and the DNS that publishes their public halves."""
    brokerage, platform = _key(), _key()
    path = tmp_path_factory.mktemp("dkim") / "brokerage.pem"
    path.write_text(_pem(brokerage))
    published = {
        f"b2026._domainkey.{BROKERAGE}.".encode(): _txt(brokerage),
        f"ced._domainkey.{PLATFORM}.".encode(): _txt(platform),
    }

    def dns(name: bytes, timeout: float = 5) -> bytes | None:
        return published.get(name)

    config = {
        BROKERAGE: {"selector": "b2026", "private_key_file": str(path)},
        PLATFORM: {"private_key": _pem(platform)},  # DKIM_SELECTOR's selector
    }
    return {"config": json.dumps(config), "dns": dns}


@pytest.fixture
def rt(make_runtime: Callable[..., Runtime], keys: dict[str, Any]) -> Runtime:
    return make_runtime(
        sender_domains=f"{BROKERAGE}, {PLATFORM.upper()}",
        dkim_keys=keys["config"],
        dkim_selector="ced",
    )


def _signed_by(got: Received, keys: dict[str, Any]) -> str:
    """The d= of the message's one DKIM signature, which dkimpy verified."""
    assert got.data.startswith(b"DKIM-Signature: ")
    assert dkim.verify(got.data, dnsfunc=keys["dns"]), "the DKIM signature does not verify"
    found = re.search(rb"\bd=([^;\s]+)", got.data.split(b"\r\n\r\n", 1)[0])
    assert found is not None
    return found[1].decode()


def _footer(got: Received) -> tuple[str, str, str]:
    """The one-click link of the List-Unsubscribe header, the HTML part and the text part."""
    msg = got.parsed()
    link = re.match(r"<(https?://[^>]+)>", msg["List-Unsubscribe"])
    assert link is not None
    html = msg.get_body(("html",)).get_content()
    text = msg.get_body(("plain",)).get_content()
    return link[1], html, text


@SQLITE
def test_an_agent_on_a_sending_domain_sends_campaigns_as_themself_signed_by_that_domain(
    rt: Runtime, smtp_server: DevSMTPServer, keys: dict[str, Any]
) -> None:
    make_user(rt, platform_email=f"jo@{BROKERAGE}")
    view, work = create.create(
        rt, campaign_request(2, from_name="Jo Agent", html="<html><body><p>Hi</p></body></html>")
    )
    for chunk in work:
        deliver_chunk(rt, f"{view.id}:{chunk}")

    assert len(smtp_server.messages) == 2
    for got in smtp_server.messages:
        msg = got.parsed()
        assert msg["From"] == f"Jo Agent <jo@{BROKERAGE}>"
        assert msg["Reply-To"] is None
        # The send's own return path (VERP), on the From domain, and ours to read back.
        assert re.fullmatch(rf"bounce\+[0-9a-f]{{32}}-[a-z2-7]{{16}}@{BROKERAGE}", got.mail_from)
        assert returnpath.parse(rt.settings, got.mail_from) is not None
        assert msg["Message-ID"].endswith(f"@{BROKERAGE}>")
        assert _signed_by(got, keys) == BROKERAGE
        link, html, text = _footer(got)
        # The visible link is the header's, and the footer sits inside the document's body.
        assert f'href="{link}"' in html and ADDRESS in html
        assert html.rstrip().endswith("</body></html>")
        assert link in text and ADDRESS in text


@SQLITE
def test_an_agent_off_the_sending_domains_sends_as_the_platform_with_reply_to_the_agent(
    rt: Runtime, smtp_server: DevSMTPServer, keys: dict[str, Any]
) -> None:
    make_user(rt)  # agent-1@kw.example.com: not a sending domain
    result = submit_send(rt, InlineQueue(), send_request(from_name="Jo Agent"))
    assert smartplan.deliver(rt, result.send_id) is SendStatus.SENT

    [got] = smtp_server.messages
    msg = got.parsed()
    assert msg["From"] == f"Jo Agent <bounces@{PLATFORM}>"
    assert msg["Reply-To"] == "agent-1@kw.example.com"
    assert got.mail_from == returnpath.address_for(rt.settings, result.send_id, PLATFORM)
    assert msg["Message-ID"] == get_send(rt, result.send_id).message_id
    assert msg["Message-ID"].endswith(f"@{PLATFORM}>")
    assert _signed_by(got, keys) == PLATFORM
    # A SmartPlan step is commercial mail too: the same footer.
    link, html, text = _footer(got)
    assert f'href="{link}"' in html and ADDRESS in html
    assert link in text and ADDRESS in text


@SQLITE
def test_system_mail_is_from_the_platform_and_signed_by_its_domain(
    rt: Runtime, smtp_server: DevSMTPServer, keys: dict[str, Any]
) -> None:
    make_user(rt, platform_email=f"jo@{BROKERAGE}")
    with rt.sessions.begin() as session:
        user = session.get(User, "agent-1")
        assert user is not None
        email = system_mail.queue_email(
            session,
            rt.settings,
            user,
            SystemEmailKind.USAGE_NOTICE,
            "usage_notice",
            {
                "threshold": 80,
                "used": 4000,
                "used_after": 4000,
                "total": 5000,
                "plan_label": "Free",
                "period_end": "Nov 30",
            },
            rt.clock.now(),
        )
        assert email is not None
        email_id = email.id
    assert system_mail.deliver(rt, email_id) is SendStatus.SENT

    [got] = smtp_server.messages
    assert got.parsed()["From"] == f"Command Email <bounces@{PLATFORM}>"
    assert got.mail_from == f"bounces@{PLATFORM}"
    assert _signed_by(got, keys) == PLATFORM


@SQLITE
def test_without_sending_domains_agents_send_as_the_platform_unsigned(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime, platform_email=f"jo@{BROKERAGE}")
    result = submit_send(runtime, InlineQueue(), send_request())
    assert smartplan.deliver(runtime, result.send_id) is SendStatus.SENT
    [got] = smtp_server.messages
    assert got.parsed()["Reply-To"] == f"jo@{BROKERAGE}"
    assert b"DKIM-Signature" not in got.data


@SQLITE
def test_a_campaign_of_an_agent_without_a_postal_address_is_refused_with_nothing_taken(
    runtime: Runtime,
) -> None:
    make_user(runtime, postal_address=None)
    before = credits(runtime, "agent-1").used
    with pytest.raises(InvalidInput) as info:
        create.create(runtime, campaign_request(3))
    assert info.value.field == "postal_address"
    assert "postal address" in info.value.problem
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Campaign)) == 0
        assert session.scalar(select(func.count()).select_from(Send)) == 0
    assert credits(runtime, "agent-1").used == before
    # With one, the same campaign goes ahead.
    upsert_user(runtime, "agent-1", postal_address=ADDRESS)
    view, _ = create.create(runtime, campaign_request(3))
    assert view.recipients == 3


@SQLITE
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("350 Main St\nAustin", "line breaks"),
        ("x" * 301, "the limit is 300"),
        ("   ", "must not be empty"),
    ],
)
def test_a_bad_postal_address_is_refused_naming_the_field(
    runtime: Runtime, value: str, problem: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        make_user(runtime, postal_address=value)
    assert (info.value.field, problem in info.value.problem) == ("postal_address", True)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"sender_domains": "brokerage.example"}, "has no key for brokerage.example"),
        ({"dkim_keys": json.dumps({"other.example": {"private_key": "PEM"}})}, "not listed"),
        (
            {
                "sender_domains": "brokerage.example",
                "dkim_keys": json.dumps({"brokerage.example": {"private_key": "-----BEGIN"}}),
            },
            "brokerage.example: the private key is not an unencrypted PEM private key",
        ),
        (
            {
                "sender_domains": "brokerage.example",
                "dkim_keys": json.dumps({"brokerage.example": {"private_key_file": "/nope.pem"}}),
            },
            "cannot be read",
        ),
        ({"dkim_keys": "{"}, "is not JSON"),
        ({"sender_domains": "not a domain"}, "is not a domain name"),
    ],
)
def test_sender_domains_and_dkim_keys_are_checked_at_start(
    changes: dict[str, str], problem: str
) -> None:
    pem = json.dumps(_pem(_key()))[1:-1]  # a real key where the case needs one
    environ = {k.upper(): v.replace('"PEM"', f'"{pem}"') for k, v in changes.items()}
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ, env_file=None)
    assert info.value.variable in ("DKIM_KEYS", "SENDER_DOMAINS")
    assert problem in info.value.problem


@SQLITE
def test_operators_change_the_footer_with_a_folder_of_their_own(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        make_runtime(footer_dir=str(tmp_path))
    assert (info.value.variable, "has no _footer.html" in info.value.problem) == (
        "FOOTER_DIR",
        True,
    )
    (tmp_path / "_footer.html").write_text(
        '<p class="legal">Sent for {{ sender_name }} &middot; {{ postal_address }} &middot; '
        '<a href="{{ unsubscribe_url }}">Stop these emails</a></p>'
    )
    (tmp_path / "_footer.txt").write_text("Stop these emails: {{ unsubscribe_url }}\n")
    rt = make_runtime(footer_dir=str(tmp_path))
    make_user(rt, postal_address="1 <Main> St")
    result = submit_send(rt, InlineQueue(), send_request())
    assert smartplan.deliver(rt, result.send_id) is SendStatus.SENT

    [got] = smtp_server.messages
    link, html, text = _footer(got)
    assert "Stop these emails</a></p>" in html and f'href="{link}"' in html
    assert "1 &lt;Main&gt; St" in html  # the agent's text is escaped in HTML
    assert f"Stop these emails: {link}" in text


@SQLITE
def test_the_api_refuses_a_campaign_without_a_postal_address_naming_the_field(
    runtime: Runtime, api_client: Any
) -> None:
    assert api_client.put(
        "/v1/users/agent-1", json={"platform_email": "jo@kw.example.com"}
    ).is_success
    body = {
        "user_id": "agent-1",
        "provider": "command_email",
        "message": {"subject": "Open house", "html": "<p>Come by</p>"},
        "recipients": [{"id": "c-1", "email": "pat@example.org"}],
    }
    r = api_client.post("/v1/campaigns", json=body)
    assert r.status_code == 422
    assert (r.json()["code"], r.json()["field"]) == ("invalid_field", "postal_address")
    assert api_client.get("/v1/users/agent-1/credits").json()["used"] == 0


def test_a_footer_that_cannot_render_stops_the_process_at_start(tmp_path: Path) -> None:
    (tmp_path / "_footer.html").write_text("<p>{{ agent_phone }}</p>")  # not a footer value
    (tmp_path / "_footer.txt").write_text("{{ unsubscribe_url }}")
    with pytest.raises(ConfigError) as info:
        Runtime(Settings(footer_dir=str(tmp_path)))  # fails before it connects anywhere
    assert info.value.variable == "FOOTER_DIR"
    assert "agent_phone" in info.value.problem
