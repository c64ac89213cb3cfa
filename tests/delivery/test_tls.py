"""The SMTP relay over TLS, against a real aiosmtpd server with a certificate from a throwaway CA:
STARTTLS when the relay offers it (the default), implicit TLS for port 465, certificates
verified, and the relay login never sent over a connection that is not encrypted."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator

import pytest
import trustme
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer
from dispatcher import alerts
from dispatcher.delivery import smartplan as delivery
from dispatcher.errors import ConfigError, DeliveryDeferred, NotAttempted
from dispatcher.models import Send, SendStatus
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from dispatcher.settings import Settings
from tests.helpers import make_user, send_request

LOGIN = ("relay-user", "relay-password-1")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _serve(**options: object) -> Iterator[DevSMTPServer]:
    server = DevSMTPServer(**options)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def starttls_relay(ca: trustme.CA) -> Iterator[DevSMTPServer]:
    yield from _serve(credentials=LOGIN, tls=_server_context(ca))


@pytest.fixture
def implicit_relay(ca: trustme.CA) -> Iterator[DevSMTPServer]:
    yield from _serve(credentials=LOGIN, tls=_server_context(ca), implicit_tls=True)


@pytest.fixture
def plaintext_relay() -> Iterator[DevSMTPServer]:
    yield from _serve(credentials=LOGIN)


def _send_one(rt: Runtime) -> str:
    make_user(rt)
    return submit_send(rt, InlineQueue(), send_request()).send_id


def _relay_runtime(
    make_runtime: Callable[..., Runtime], server: DevSMTPServer, **settings: object
) -> Runtime:
    return make_runtime(
        smtp_port=server.port, smtp_username=LOGIN[0], smtp_password=LOGIN[1], **settings
    )


def test_the_default_upgrades_to_starttls_verifies_the_certificate_and_logs_in(
    make_runtime: Callable[..., Runtime], starttls_relay: DevSMTPServer, ca_file: str
) -> None:
    rt = _relay_runtime(make_runtime, starttls_relay, smtp_ca_file=ca_file)
    assert rt.settings.smtp_tls == "opportunistic"
    assert delivery.deliver(rt, _send_one(rt)) is SendStatus.SENT
    assert [m.tls for m in starttls_relay.messages] == [True]


def test_implicit_tls_speaks_tls_from_the_first_byte(
    make_runtime: Callable[..., Runtime], implicit_relay: DevSMTPServer, ca_file: str
) -> None:
    rt = _relay_runtime(make_runtime, implicit_relay, smtp_tls="implicit", smtp_ca_file=ca_file)
    assert delivery.deliver(rt, _send_one(rt)) is SendStatus.SENT
    assert [m.tls for m in implicit_relay.messages] == [True]


def test_a_certificate_nobody_we_trust_signed_is_refused_and_nothing_is_sent(
    make_runtime: Callable[..., Runtime], starttls_relay: DevSMTPServer
) -> None:
    rt = _relay_runtime(make_runtime, starttls_relay, smtp_tls="starttls")  # system CAs only
    send_id = _send_one(rt)
    with pytest.raises(DeliveryDeferred) as deferred:
        delivery.deliver(rt, send_id)
    assert "certificate" in deferred.value.detail.lower()
    assert starttls_relay.messages == []
    with rt.sessions() as session:
        assert session.scalar(select(Send.status).where(Send.id == send_id)) is (
            SendStatus.RESERVED  # the credit held for the retry
        )


def test_the_login_is_never_sent_in_plain_text_unless_allowed(
    make_runtime: Callable[..., Runtime], plaintext_relay: DevSMTPServer
) -> None:
    # Given a relay that offers no TLS at all
    rt = _relay_runtime(make_runtime, plaintext_relay)
    send_id = _send_one(rt)
    # Then nothing is sent, every worker on the relay stops, and ops are alerted once
    with pytest.raises(NotAttempted):
        delivery.deliver(rt, send_id)
    assert plaintext_relay.messages == []
    assert [a.kind for a in alerts.recent(rt).items] == ["smtp_auth_failed"]
    assert "no TLS" in (rt.relay.halted() or ("", 0))[0]
    # And an operator who trusts the network may allow it
    rt.relay.resume()
    allowed = _relay_runtime(make_runtime, plaintext_relay, smtp_allow_plaintext_auth=True)
    assert delivery.deliver(allowed, send_id) is SendStatus.SENT
    assert [m.tls for m in plaintext_relay.messages] == [False]


def test_a_login_with_tls_off_is_a_configuration_error(settings: Settings) -> None:
    with pytest.raises(ConfigError) as error:
        settings.with_overrides(smtp_username="u", smtp_password="p", smtp_tls="off")
    assert error.value.variable == "SMTP_TLS"
    assert settings.with_overrides(
        smtp_username="u", smtp_password="p", smtp_tls="off", smtp_allow_plaintext_auth=True
    ).smtp_allow_plaintext_auth
