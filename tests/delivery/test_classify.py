"""SMTP replies are classified by reply code and enhanced status code, in one place."""

from __future__ import annotations

import pytest

from dispatcher.delivery.transports.classify import classify, enhanced_code
from dispatcher.errors import DeliveryDeferred, DeliveryRejected


@pytest.mark.parametrize(
    ("code", "message", "kind", "reason"),
    [
        (550, "No such user here", DeliveryRejected, "hard_bounce"),
        (553, "5.1.8 Sender address rejected: domain not found", DeliveryRejected, "smtp_rejected"),
        (550, "5.1.7 Bad sender mailbox syntax", DeliveryRejected, "smtp_rejected"),
        (550, "5.1.10 Recipient domain has null MX", DeliveryRejected, "hard_bounce"),
        (421, "4.7.0 Try again later, closing connection", DeliveryDeferred, "smtp_deferred"),
        (451, "4.3.0 Mail server temporarily rejected message", DeliveryDeferred, "smtp_deferred"),
        (452, "4.2.2 Mailbox full", DeliveryDeferred, "smtp_deferred"),
        (
            550,
            "5.1.1 The email account that you tried to reach does not exist",
            DeliveryRejected,
            "hard_bounce",
        ),
        (553, "5.1.3 Invalid address", DeliveryRejected, "hard_bounce"),
        (551, "User not local", DeliveryRejected, "hard_bounce"),
        (550, "5.7.1 Message rejected as spam", DeliveryRejected, "policy_rejected"),
        (554, "Transaction failed", DeliveryRejected, "policy_rejected"),
        (554, "5.7.1 Blocked by policy", DeliveryRejected, "policy_rejected"),
        (552, "5.3.4 Message size exceeds fixed limit", DeliveryRejected, "smtp_rejected"),
        (500, "5.5.2 Syntax error", DeliveryRejected, "smtp_rejected"),
        (550, "4.2.0 Mailbox busy, try later", DeliveryDeferred, "smtp_deferred"),
    ],
)
def test_replies_are_classified(code: int, message: str, kind: type, reason: str) -> None:
    error = classify(code, message, "rcpt")
    assert isinstance(error, kind)
    assert error.reason == reason
    assert error.code == code and error.detail.startswith(f"{code} ")


@pytest.mark.parametrize(
    ("code", "message", "stage", "reason"),
    [
        (550, "Message rejected as spam", "data", "smtp_rejected"),  # about the message
        (550, "5.1.1 no such user", "data", "hard_bounce"),  # checked after DATA: still the address
        (550, "5.1.1 no such user", "mail", "smtp_rejected"),  # a refusal of our sender
        (554, "5.7.1 relaying denied", "mail", "policy_rejected"),
        (554, "Transaction failed", "data", "policy_rejected"),
    ],
)
def test_the_stage_decides_whether_a_refusal_is_about_the_recipient(
    code: int, message: str, stage: str, reason: str
) -> None:
    assert classify(code, message, stage).reason == reason


def test_enhanced_codes_are_read_from_the_start_of_the_text() -> None:
    assert enhanced_code("5.1.1 no such user") == (5, 1, 1)
    assert enhanced_code("  4.7.0 later") == (4, 7, 0)
    assert enhanced_code("no code here 5.1.1") is None
