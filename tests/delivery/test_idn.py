"""Internationalised addresses: a domain is sent as punycode, a non-ASCII local part with
SMTPUTF8 when the relay offers it, and refused for good (credit back) when it does not."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import default

import pytest

from devstack.devsmtp import DevSMTPServer
from dispatcher import validation
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery.mime import BulkMessage
from dispatcher.errors import InvalidInput
from dispatcher.models import SendStatus
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import get_send, submit_send
from tests.helpers import make_user, send_request


def test_an_internationalised_domain_is_stored_as_punycode() -> None:
    assert validation.address("to", " Ann@Bücher.example ") == "Ann@xn--bcher-kva.example"
    assert validation.address("to", "ann@xn--bcher-kva.example") == "ann@xn--bcher-kva.example"
    assert (
        validation.address("to", "jöhn@bücher.example", utf8_local=True)
        == "jöhn@xn--bcher-kva.example"
    )


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("ann@bü cher.example", "(domain"),
        ("ann@-bücher.example", "(domain"),
        ("jöhn@example.org", "accepted for contacts' addresses only"),
    ],
)
def test_bad_international_addresses_are_refused_naming_the_field(given: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        validation.address("reply_to", given)
    assert refused.value.field == "reply_to" and problem in refused.value.problem


def test_a_bulk_copy_to_a_utf8_address_carries_it_as_utf8() -> None:
    skeleton = BulkMessage(from_address="agent@kw.example.com", from_name="Ann", reply_to=None)
    raw = skeleton.render(
        to="jöhn@xn--bcher-kva.example",
        subject="Hi",
        message_id="<1@x>",
        date="Thu, 03 Dec 2026 10:00:00 +0000",
        text="t",
        html="<p>h</p>",
    )
    assert message_from_bytes(raw, policy=default)["To"] == "jöhn@xn--bcher-kva.example"


def test_a_send_to_an_international_address_goes_with_smtputf8(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    result = submit_send(runtime, InlineQueue(), send_request(contact_email="Jöhn@Bücher.example"))
    assert get_send(runtime, result.send_id).status == "queued"
    assert delivery.deliver(runtime, result.send_id) is SendStatus.SENT
    [got] = smtp_server.messages
    assert got.rcpt_tos == ("Jöhn@xn--bcher-kva.example",) and got.smtputf8
    assert got.parsed()["To"] == "Jöhn@xn--bcher-kva.example"
    # An ASCII address with an internationalised domain needs no SMTPUTF8.
    plain = submit_send(
        runtime, InlineQueue(), send_request(n=2, contact_email="ann@bücher.example")
    )
    assert delivery.deliver(runtime, plain.send_id) is SendStatus.SENT
    assert smtp_server.messages[1].rcpt_tos == ("ann@xn--bcher-kva.example",)
    assert not smtp_server.messages[1].smtputf8


def test_without_smtputf8_at_the_relay_the_send_fails_and_its_credit_comes_back(
    make_runtime: object,
) -> None:
    relay = DevSMTPServer(smtputf8=False)
    relay.start()
    try:
        rt = make_runtime(smtp_port=relay.port)  # type: ignore[operator]
        make_user(rt)
        result = submit_send(rt, InlineQueue(), send_request(contact_email="jöhn@example.org"))
        assert delivery.deliver(rt, result.send_id) is SendStatus.FAILED
        send = get_send(rt, result.send_id)
        assert send.reason == "smtp_rejected" and "SMTPUTF8" in (send.detail or "")
        assert relay.messages == [] and credits(rt, "agent-1").used == 0
    finally:
        relay.stop()


def test_on_a_relay_without_tls_the_first_message_of_a_connection_goes_with_smtputf8(
    make_runtime: object, smtp_server: DevSMTPServer
) -> None:
    # Given a relay spoken to without STARTTLS, so connecting does not greet it with EHLO
    rt = make_runtime(smtp_tls="off")  # type: ignore[operator]
    make_user(rt)
    # When the first message on a new connection is to an address that needs SMTPUTF8
    result = submit_send(rt, InlineQueue(), send_request(contact_email="jöhn@example.org"))
    # Then the relay's extensions are known before MAIL, and the message goes with SMTPUTF8
    assert delivery.deliver(rt, result.send_id) is SendStatus.SENT
    [got] = smtp_server.messages
    assert got.rcpt_tos == ("jöhn@example.org",) and got.smtputf8
