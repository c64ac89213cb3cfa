"""Relays' webhooks (``POST /v1/webhooks/{provider}``): Amazon SES through SNS, SendGrid,
Postmark and Mailgun payloads in their documented shapes, signed as each relay signs them
(with keys made here: the SNS certificate is a local one named by SES_SIGNING_CERT_FILE),
mapped to the same bounce and complaint handling as a DSN by mail; a bad signature is refused
and records nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer, Received
from dispatcher.api.app import create_api
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery import suppression
from dispatcher.models import FeedbackEvent
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from dispatcher.settings import Settings
from tests.helpers import make_user, send_request, timeline_rows

TOPIC = "arn:aws:sns:us-west-2:123456789012:ses-feedback"
POSTMARK_AUTH = "postmark-hook:s3cret-password"
MAILGUN_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
ANONYMOUS = {"Authorization": ""}  # a relay carries no bearer token


class Keys:
    """The relays' signing keys, made once for the module."""

    def __init__(self, folder: Path) -> None:
        self.sns = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.sns.public_key())
            .serial_number(1)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .sign(self.sns, hashes.SHA256())
        )
        self.sns_cert = folder / "sns.pem"
        self.sns_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.sendgrid = ec.generate_private_key(ec.SECP256R1())
        der = self.sendgrid.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.sendgrid_public = base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("relay-keys"))


@pytest.fixture
def settings(settings: Settings, keys: Keys) -> Settings:
    """The suite's settings with every relay's webhook key configured."""
    return settings.with_overrides(
        ses_signing_cert_file=str(keys.sns_cert),
        ses_topic_arns=(TOPIC,),
        sendgrid_webhook_public_key=keys.sendgrid_public,
        postmark_webhook_auth=POSTMARK_AUTH,
        mailgun_signing_key=MAILGUN_KEY,
    )


def sent(rt: Runtime, smtp: DevSMTPServer, n: int) -> tuple[str, Received]:
    """A SmartPlan email to contact{n}, sent; its send id and what the relay received."""
    send_id = submit_send(rt, InlineQueue(), send_request(n=n)).send_id
    assert delivery.deliver(rt, send_id).value == "sent"
    [got] = [m for m in smtp.messages if m.rcpt_tos == (f"contact{n}@example.org",)]
    return send_id, got


def nothing_recorded(rt: Runtime) -> bool:
    with rt.sessions() as session:
        events = session.scalars(select(FeedbackEvent)).all()
    return not events and not suppression.listing(rt, "agent-1").items


def reason_of(rt: Runtime, email: str) -> str | None:
    with rt.sessions() as session:
        return suppression.reason_for(session, "agent-1", email, rt.clock.now())


# --------------------------------------------------------------------------- Amazon SES


def sns(keys: Keys, rt: Runtime, notification: dict[str, Any], topic: str = TOPIC) -> bytes:
    """An SNS Notification carrying ``notification`` from ``topic``, signed (SignatureVersion
    2)."""
    message = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": topic,
        "Message": json.dumps(notification),
        "Timestamp": rt.clock.now().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "SignatureVersion": "2",
        "SigningCertURL": "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
        "UnsubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe",
    }
    signed = "".join(
        f"{name}\n{message[name]}\n"
        for name in ("Message", "MessageId", "Timestamp", "TopicArn", "Type")
    ).encode()
    message["Signature"] = base64.b64encode(
        keys.sns.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    ).decode()
    return json.dumps(message).encode()


def ses_bounce(original: Received, source: str) -> dict[str, Any]:
    """SES's documented bounce notification (with a DSN and the original headers)."""
    to = original.rcpt_tos[0]
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": "Permanent",
            "reportingMTA": "dns; email.example.com",
            "bouncedRecipients": [
                {
                    "emailAddress": to,
                    "status": "5.1.1",
                    "action": "failed",
                    "diagnosticCode": f"smtp; 550 5.1.1 <{to}>... User",
                }
            ],
            "bounceSubType": "General",
            "timestamp": "2016-01-27T14:59:38.237Z",
            "feedbackId": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa068a-000000",
            "remoteMtaIp": "127.0.2.0",
        },
        "mail": {
            "timestamp": "2016-01-27T14:59:38.237Z",
            "source": source,
            "sourceArn": "arn:aws:ses:us-east-1:888888888888:identity/example.com",
            "sourceIp": "127.0.3.0",
            "sendingAccountId": "123456789012",
            "messageId": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa068a-000000",
            "destination": [to],
            "headersTruncated": False,
            "commonHeaders": {
                "from": ["agent-1@kw.example.com"],
                "to": [to],
                "messageId": original.message_id,
                "subject": "Hello",
            },
        },
    }


def ses_complaint(original: Received) -> dict[str, Any]:
    """SES's documented complaint notification; its ``mail.source`` is a plain address, so
    the send is found by our Message-ID and the recipient."""
    to = original.rcpt_tos[0]
    return {
        "notificationType": "Complaint",
        "complaint": {
            "userAgent": "AnyCompany Feedback Loop (V0.01)",
            "complainedRecipients": [{"emailAddress": to}],
            "complaintFeedbackType": "abuse",
            "arrivalDate": "2016-01-27T14:59:38.237Z",
            "timestamp": "2016-01-27T14:59:38.237Z",
            "feedbackId": "000001378603177f-18c07c78-fa81-4a58-9dd1-fedc3cb8f49a-000000",
        },
        "mail": {
            "timestamp": "2016-01-27T14:59:38.237Z",
            "messageId": "000001378603177f-7a5433e7-8edb-42ae-af10-f0181f34d6ee-000000",
            "source": "agent-1@kw.example.com",
            "destination": [to],
            "commonHeaders": {"messageId": original.message_id.strip("<>"), "subject": "Hello"},
        },
    }


def test_ses_notifications_are_verified_and_mapped_and_a_bad_signature_records_nothing(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, keys: Keys
) -> None:
    make_user(runtime)
    first, to_first = sent(runtime, smtp_server, 1)
    _, to_second = sent(runtime, smtp_server, 2)
    bounce = ses_bounce(to_first, source=to_first.mail_from)

    # A tampered message, a signature by another key, or a message signed for another
    # account's topic are refused, and nothing is recorded.
    stranger = Keys.__new__(Keys)
    stranger.sns = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tampered = json.loads(sns(keys, runtime, bounce))
    tampered["Message"] = tampered["Message"].replace("Permanent", "Transient")
    elsewhere = sns(keys, runtime, bounce, topic="arn:aws:sns:us-west-2:999999999999:theirs")
    for body in (json.dumps(tampered).encode(), sns(stranger, runtime, bounce), elsewhere):
        r = api_client.post("/v1/webhooks/ses", content=body, headers=ANONYMOUS)
        assert r.status_code == 401, r.text
        assert r.json()["code"] == "webhook_unauthorized"
    assert nothing_recorded(runtime)

    # The documented bounce, signed: the address is suppressed, the timeline shows it.
    r = api_client.post("/v1/webhooks/ses", content=sns(keys, runtime, bounce), headers=ANONYMOUS)
    assert r.status_code == 200, r.text
    assert r.json() == {"provider": "ses", "reports": 1, "recorded": 1, "unmatched": 0}
    assert reason_of(runtime, "contact1@example.org") == "hard_bounce"
    [event] = [e for e in timeline_rows(runtime, "agent-1") if e.kind.value == "email_bounced"]
    assert (event.send_id, event.status.value, event.reason) == (first, "sent", "hard_bounce")
    # SNS delivers at least once: the same notification again records nothing new.
    again = api_client.post(
        "/v1/webhooks/ses", content=sns(keys, runtime, bounce), headers=ANONYMOUS
    )
    assert again.json()["recorded"] == 0

    # The documented complaint, matched by our Message-ID and the recipient.
    r = api_client.post(
        "/v1/webhooks/ses",
        content=sns(keys, runtime, ses_complaint(to_second)),
        headers=ANONYMOUS,
    )
    assert r.json() == {"provider": "ses", "reports": 1, "recorded": 1, "unmatched": 0}
    assert reason_of(runtime, "contact2@example.org") == "complaint"

    # A subscription confirmation, signed over its own fields, is taken and only logged.
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f"
        "3beb71854e285d6ad02428b09ceece29417f1f02d609c582afbacc99c583a916b9981dd2728f4ae6fdb82e",
        "TopicArn": "arn:aws:sns:us-west-2:123456789012:ses-feedback",
        "Message": "You have chosen to subscribe to the topic "
        "arn:aws:sns:us-west-2:123456789012:ses-feedback.",
        "SubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription",
        "Timestamp": runtime.clock.now().strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "SignatureVersion": "1",
        "SigningCertURL": "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
    }
    signed = "".join(
        f"{name}\n{confirmation[name]}\n"
        for name in (
            "Message",
            "MessageId",
            "SubscribeURL",
            "Timestamp",
            "Token",
            "TopicArn",
            "Type",
        )
    ).encode()
    confirmation["Signature"] = base64.b64encode(
        keys.sns.sign(signed, padding.PKCS1v15(), hashes.SHA1())
    ).decode()
    r = api_client.post("/v1/webhooks/ses", json=confirmation, headers=ANONYMOUS)
    assert r.json() == {"provider": "ses", "reports": 0, "recorded": 0, "unmatched": 0}


# --------------------------------------------------------------------------- SendGrid


def sendgrid_signed(keys: Keys, rt: Runtime, body: bytes) -> dict[str, str]:
    timestamp = str(int(rt.clock.now().timestamp()))
    signature = keys.sendgrid.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        **ANONYMOUS,
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def test_sendgrid_events_are_verified_and_mapped_and_a_bad_signature_records_nothing(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, keys: Keys
) -> None:
    make_user(runtime)
    first, to_first = sent(runtime, smtp_server, 1)
    _, to_second = sent(runtime, smtp_server, 2)
    # SendGrid's documented event shapes, batched as it posts them.
    events = [
        {
            "email": "contact1@example.org",
            "timestamp": 1513299569,
            "smtp-id": to_first.message_id,
            "event": "delivered",
            "sg_event_id": "rWVYmVk90MjZJ9iohOBa3w==",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "response": "250 OK",
        },
        {
            "email": "contact1@example.org",
            "timestamp": 1513299569,
            "smtp-id": to_first.message_id,
            "event": "bounce",
            "category": "cat facts",
            "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw==",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "reason": "500 unknown recipient",
            "status": "5.0.0",
            "type": "bounce",
        },
        {
            "email": "contact2@example.org",
            "timestamp": 1513299569,
            "smtp-id": to_second.message_id,
            "event": "spamreport",
            "sg_event_id": "37nvH5QBz858KGVYCM4uOA==",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
        },
        {
            "email": "someone@else.example",
            "timestamp": 1513299569,
            "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
            "event": "bounce",
            "type": "bounce",
            "status": "5.0.0",
            "reason": "500 unknown recipient",
        },
    ]
    body = json.dumps(events).encode()
    good = sendgrid_signed(keys, runtime, body)

    # An altered body, a forged signature, or none at all: 401, nothing recorded.
    altered = body.replace(b"spamreport", b"delivered!")
    forged = {
        **good,
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(b"x" * 70).decode(),
    }
    for content, headers in ((altered, good), (body, forged), (body, ANONYMOUS)):
        r = api_client.post("/v1/webhooks/sendgrid", content=content, headers=headers)
        assert r.status_code == 401, r.text
    assert nothing_recorded(runtime)

    r = api_client.post("/v1/webhooks/sendgrid", content=body, headers=good)
    assert r.status_code == 200, r.text
    # Another sender's email on the same SendGrid account matches no send of ours.
    assert r.json() == {"provider": "sendgrid", "reports": 3, "recorded": 2, "unmatched": 1}
    assert reason_of(runtime, "contact1@example.org") == "hard_bounce"
    assert reason_of(runtime, "contact2@example.org") == "complaint"
    kinds = {
        (e.send_id, e.kind.value)
        for e in timeline_rows(runtime, "agent-1")
        if e.kind.value in ("email_bounced", "email_complained")
    }
    assert (first, "email_bounced") in kinds and len(kinds) == 2


# --------------------------------------------------------------------------- Postmark, Mailgun


def test_postmark_and_mailgun_webhooks_are_verified_and_mapped(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    _, to_first = sent(runtime, smtp_server, 1)
    _, to_second = sent(runtime, smtp_server, 2)

    # Postmark's documented bounce record; the send is named by the metadata we set.
    assert to_first.parsed()["X-PM-Metadata-ced_return_path"] == to_first.mail_from
    record = {
        "RecordType": "Bounce",
        "ID": 42,
        "Type": "HardBounce",
        "TypeCode": 1,
        "Name": "Hard bounce",
        "Tag": "Test",
        "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
        "Description": "The server was unable to deliver your message (ex: unknown user, "
        "mailbox not found).",
        "Details": "Test bounce details",
        "Email": "contact1@example.org",
        "BouncedAt": "2014-08-01T13:28:10.2735393-04:00",
        "DumpAvailable": True,
        "Inactive": True,
        "CanActivate": True,
        "Subject": "Test subject",
        # What Postmark echoes: the metadata field every email carries while its webhook is
        # configured (Postmark removes X-PM-* fields before delivery).
        "Metadata": {"ced_return_path": to_first.parsed()["X-PM-Metadata-ced_return_path"]},
    }
    body = json.dumps(record).encode()
    wrong = base64.b64encode(b"postmark-hook:guess").decode()
    r = api_client.post(
        "/v1/webhooks/postmark", content=body, headers={"Authorization": f"Basic {wrong}"}
    )
    assert r.status_code == 401
    assert nothing_recorded(runtime)
    right = base64.b64encode(POSTMARK_AUTH.encode()).decode()
    r = api_client.post(
        "/v1/webhooks/postmark", content=body, headers={"Authorization": f"Basic {right}"}
    )
    assert r.json() == {"provider": "postmark", "reports": 1, "recorded": 1, "unmatched": 0}
    assert reason_of(runtime, "contact1@example.org") == "hard_bounce"

    # Mailgun's documented "failed" event (permanent), signed with the webhook signing key.
    timestamp, token = (
        str(int(runtime.clock.now().timestamp())),
        "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0",
    )
    payload = {
        "signature": {
            "timestamp": timestamp,
            "token": token,
            "signature": hmac.new(
                MAILGUN_KEY.encode(), (timestamp + token).encode(), hashlib.sha256
            ).hexdigest(),
        },
        "event-data": {
            "event": "failed",
            "severity": "permanent",
            "reason": "bounce",
            "recipient": "contact2@example.org",
            "envelope": {"sender": to_second.mail_from, "transport": "smtp"},
            "message": {"headers": {"message-id": to_second.message_id.strip("<>")}},
            "delivery-status": {
                "code": 550,
                "message": "5.1.1 The email account that you tried to reach does not exist.",
                "description": "",
            },
            "id": "G9Bn5sl1TC6nu79C8C0bwg",
        },
    }
    forged = json.loads(json.dumps(payload))
    forged["signature"]["signature"] = "0" * 64
    r = api_client.post("/v1/webhooks/mailgun", json=forged, headers=ANONYMOUS)
    assert r.status_code == 401
    assert reason_of(runtime, "contact2@example.org") is None
    r = api_client.post("/v1/webhooks/mailgun", json=payload, headers=ANONYMOUS)
    assert r.json() == {"provider": "mailgun", "reports": 1, "recorded": 1, "unmatched": 0}
    assert reason_of(runtime, "contact2@example.org") == "hard_bounce"


def test_a_relay_without_a_configured_key_is_refused_and_an_unknown_relay_is_invalid(
    make_runtime: Any,
) -> None:
    rt: Runtime = make_runtime(
        ses_topic_arns=(),
        sendgrid_webhook_public_key=None,
        postmark_webhook_auth=None,
        mailgun_signing_key=None,
    )
    with TestClient(create_api(rt, InlineQueue())) as client:
        for provider, variable in (
            ("ses", "SES_TOPIC_ARNS"),
            ("sendgrid", "SENDGRID_WEBHOOK_PUBLIC_KEY"),
            ("postmark", "POSTMARK_WEBHOOK_AUTH"),
            ("mailgun", "MAILGUN_SIGNING_KEY"),
        ):
            r = client.post(f"/v1/webhooks/{provider}", content=b"{}")
            assert r.status_code == 404, r.text
            assert r.json()["code"] == "webhook_not_configured"
            assert variable in r.json()["detail"]
        r = client.post("/v1/webhooks/sparkpost", content=b"{}")
        assert r.status_code == 422
        assert r.json()["field"] == "provider"
