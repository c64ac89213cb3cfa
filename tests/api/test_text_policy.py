"""One text policy for every string the API takes: no lone surrogates, no control characters
where they make no sense, lengths that fit their columns (taken from the models here, so the
validation and the schema cannot drift apart). Refusals name the field, store nothing and take
no credit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dispatcher.credits.subscriptions import credits
from dispatcher.models import Campaign, Send, User
from dispatcher.runtime import Runtime
from dispatcher.sealing import Sealer, sealed_length
from dispatcher.sends import KEY_MAX
from dispatcher.validation import MAILCHIMP_KEY_MAX, column_length
from tests.api.client import RawJsonClient, agent_client
from tests.helpers import statuses

HEADERS = {"Authorization": "Bearer test-token-123"}
HALF_EMOJI = "Pat \ud83d"


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    return agent_client(runtime, RawJsonClient)


def send(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "user_id": "agent-1",
        "contact": {"id": "c-1", "email": "pat@example.org", "fields": {"first_name": "Pat"}},
        "smartplan": {"plan_id": "p", "run_id": "r", "step_id": "s"},
        "message": {"subject": "Hi {{ first_name }}", "html": "<p>Hello</p>"},
    }
    for path, value in changes.items():
        node = body
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return body


def campaign(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "user_id": "agent-1",
        "message": {"subject": "Open house", "html": "<p>Hi {{ first_name }}</p>"},
        "recipients": [{"id": "c-1", "email": "pat@example.org", "fields": {"first_name": "P"}}],
    }
    return body | changes


def nothing_happened(runtime: Runtime) -> None:
    assert statuses(runtime, "agent-1") == {}
    assert credits(runtime, "agent-1").used == 0
    with runtime.sessions() as session:
        assert session.scalars(select(Campaign.id)).all() == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"message__subject": HALF_EMOJI}, "message.subject"),
        ({"message__html": f"<p>{HALF_EMOJI}</p>"}, "message.html"),
        ({"message__text": HALF_EMOJI}, "message.text"),
        ({"contact__fields": {"first_name": HALF_EMOJI}}, "contact.fields.first_name"),
        ({"contact__fields": {"first_name": "Pat\x00"}}, "contact.fields.first_name"),
        ({"contact__fields": {"score": float("inf")}}, "contact.fields.score"),
        ({"message__subject": "Hi\x07"}, "message.subject"),
        ({"message__subject": "Hi\tthere"}, "message.subject"),
        ({"message__html": "<p>\x1b[31m</p>"}, "message.html"),
        ({"from_name": "Jo\u2028Agent"}, "from_name"),
        ({"user_id": "agent-1\n"}, "user_id"),
        ({"contact__id": "c-1\n"}, "contact.id"),
        ({"smartplan__step_id": "s\x00"}, "smartplan.step_id"),
        ({"contact__email": "pat@example.org\x00"}, "contact.email"),
    ],
)
def test_surrogates_and_control_characters_are_refused_naming_the_field(
    client: TestClient, runtime: Runtime, changes: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/sends", json=send(**changes))
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_field", field)
    nothing_happened(runtime)


def test_a_campaign_with_a_surrogate_in_its_subject_is_refused_and_takes_no_credit(
    client: TestClient, runtime: Runtime
) -> None:
    r = client.post("/v1/campaigns", json=campaign(message={"subject": HALF_EMOJI, "html": "x"}))
    assert r.status_code == 422 and r.json()["field"] == "message.subject", r.text
    nothing_happened(runtime)


def test_a_campaign_recipient_with_a_bad_merge_field_is_reported_never_sent(
    client: TestClient, runtime: Runtime
) -> None:
    good = {"id": "c-1", "email": "pat@example.org"}
    bad = {"id": "c-\ud83d", "email": "jo\x00@example.org", "fields": {"name": HALF_EMOJI}}
    also = {"id": "c-3", "email": "lee@example.org", "fields": {"name": HALF_EMOJI}}
    r = client.post("/v1/campaigns", json=campaign(recipients=[good, bad, also]))
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["recipients"] == 1
    assert answer["invalid"] == 2
    invalid = client.get(
        f"/v1/campaigns/{answer['id']}/invalid", params={"user_id": "agent-1"}
    ).json()["items"]
    assert [(i["index"], i["field"]) for i in invalid] == [
        (1, "recipients[1].id"),
        (2, "recipients[2].fields.name"),
    ]
    # What they gave is echoed escaped: the answer is valid UTF-8.
    assert invalid[0]["contact_id"] == "'c-\\ud83d'"
    assert credits(runtime, "agent-1").used == 1


def test_bodies_and_merge_fields_keep_tabs_and_line_breaks(client: TestClient) -> None:
    r = client.post(
        "/v1/sends",
        json=send(
            message__html="<p>\tHello\r\n</p>",
            message__text="Hello\n\tthere\r\n",
            contact__fields={"address": "1 Main St\nSpringfield", "n": 10**30},
        ),
    )
    assert r.status_code == 202, r.text


def test_a_send_with_five_ids_of_the_longest_length_is_stored_once(
    client: TestClient, runtime: Runtime
) -> None:
    longest = column_length(User.id)
    user = "u" * longest
    assert client.put(f"/v1/users/{user}", json={"platform_email": "a@kw.example.com"}).is_success
    ids = {
        "user_id": user,
        "contact__id": "c" * longest,
        "smartplan__plan_id": "p" * longest,
        "smartplan__run_id": "r" * longest,
        "smartplan__step_id": "s" * longest,
    }
    first = client.post("/v1/sends", json=send(**ids))
    assert first.status_code == 202, first.text
    again = client.post("/v1/sends", json=send(**ids))
    assert (again.json()["id"], again.json()["duplicate"]) == (first.json()["id"], True)
    with runtime.sessions() as session:
        [key] = session.scalars(select(Send.idempotency_key).where(Send.user_id == user)).all()
    assert len(key) <= KEY_MAX
    # A key that fits keeps its readable form.
    short = client.post("/v1/sends", json=send()).json()["id"]
    with runtime.sessions() as session:
        assert session.get(Send, short).idempotency_key.startswith("9:smartplan|7:agent-1|")  # type: ignore[union-attr]


def _email(length: int) -> str:
    """A valid address of exactly ``length`` characters (labels of at most 63)."""
    labels = "".join("." if i % 64 == 63 else "d" for i in range(length - 65 - 4))
    address = f"{'a' * 64}@{labels}.org"
    assert len(address) == length and not labels.endswith(".")
    return address


def _user_body(field: str, value: str) -> dict[str, Any]:
    body: dict[str, Any] = {"platform_email": "a@kw.example.com"}
    if field.startswith("mailchimp."):
        body["mailchimp"] = {"api_key": "k-us6", "list_id": "l1"} | {field[10:]: value}
    else:
        body[field] = value
    return body


#: (name, how to post a value of the field, the field as the refusal names it, its column)
CASES: list[tuple[str, Callable[[TestClient, str], Any], str, Any]] = [
    (
        "user id",
        lambda c, v: c.put(f"/v1/users/{v}", json={"platform_email": "a@kw.example.com"}),
        "user_id",
        User.id,
    ),
    (
        "contact id",
        lambda c, v: c.post("/v1/sends", json=send(contact__id=v)),
        "contact.id",
        Send.contact_id,
    ),
    (
        "contact email",
        lambda c, v: c.post("/v1/sends", json=send(contact__email=v)),
        "contact.email",
        Send.contact_email,
    ),
    (
        "plan id",
        lambda c, v: c.post("/v1/sends", json=send(smartplan__plan_id=v)),
        "smartplan.plan_id",
        Send.smartplan_id,
    ),
    (
        "run id",
        lambda c, v: c.post("/v1/sends", json=send(smartplan__run_id=v)),
        "smartplan.run_id",
        Send.run_id,
    ),
    (
        "step id",
        lambda c, v: c.post("/v1/sends", json=send(smartplan__step_id=v)),
        "smartplan.step_id",
        Send.step_id,
    ),
    (
        "from name",
        lambda c, v: c.post("/v1/sends", json=send(from_name=v)),
        "from_name",
        Send.from_name,
    ),
    (
        "reply-to",
        lambda c, v: c.post("/v1/sends", json=send(reply_to=v)),
        "reply_to",
        Send.reply_to,
    ),
    (
        "campaign name",
        lambda c, v: c.post("/v1/campaigns", json=campaign(name=v)),
        "name",
        Campaign.name,
    ),
    (
        "campaign from name",
        lambda c, v: c.post("/v1/campaigns", json=campaign(from_name=v)),
        "from_name",
        Campaign.from_name,
    ),
    (
        "campaign request key",
        lambda c, v: c.post("/v1/campaigns", json=campaign(idempotency_key=v)),
        "idempotency_key",
        Campaign.idempotency_key,
    ),
    (
        "platform email",
        lambda c, v: c.put("/v1/users/agent-1", json={"platform_email": v}),
        "platform_email",
        User.platform_email,
    ),
    (
        "MailChimp key",
        lambda c, v: c.put("/v1/users/agent-1", json=_user_body("mailchimp.api_key", v)),
        "mailchimp.api_key",
        MAILCHIMP_KEY_MAX,  # stored sealed: see the test below
    ),
    (
        "MailChimp audience",
        lambda c, v: c.put("/v1/users/agent-1", json=_user_body("mailchimp.list_id", v)),
        "mailchimp.list_id",
        User.mailchimp_list_id,
    ),
]


@pytest.mark.parametrize(("name", "post", "field", "column"), CASES, ids=[c[0] for c in CASES])
def test_every_limit_is_the_length_of_the_column_that_stores_it(
    client: TestClient, name: str, post: Callable[[TestClient, str], Any], field: str, column: Any
) -> None:
    # Given the longest value the column holds (PostgreSQL refuses a longer one)
    length = column if isinstance(column, int) else column_length(column)
    fits, too_long = (
        (_email(length), _email(length + 1))
        if "email" in field or field == "reply_to"
        else ("v" * length, "v" * (length + 1))
    )
    # Then it is accepted and stored, and one character more is refused naming the field
    r = post(client, fits)
    assert r.is_success, r.text
    r = post(client, too_long)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_the_longest_mailchimp_key_fits_its_column_sealed() -> None:
    assert sealed_length(MAILCHIMP_KEY_MAX) <= column_length(User.mailchimp_api_key)
    sealer = Sealer(())
    assert len(sealer.seal("k" * MAILCHIMP_KEY_MAX)) == sealed_length(MAILCHIMP_KEY_MAX)
