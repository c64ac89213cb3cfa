"""Small builders shared by tests: users, send requests, seeded history."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from dispatcher.campaigns.create import CampaignRequest, Recipient
from dispatcher.models import Send, SendKind, SendStatus, TimelineEvent, User
from dispatcher.runtime import Runtime
from dispatcher.sends import SendRequest
from dispatcher.settings import Settings
from dispatcher.users import upsert_user


def make_user(rt: Runtime, user_id: str = "agent-1", **fields: Any) -> str:
    fields.setdefault("platform_email", f"{user_id}@kw.example.com")
    fields.setdefault("postal_address", "350 Main St, Austin, TX 78701")
    upsert_user(rt, user_id, **fields)
    return user_id


def send_request(user_id: str = "agent-1", n: int = 1, **overrides: Any) -> SendRequest:
    values: dict[str, Any] = dict(
        user_id=user_id,
        contact_id=f"contact-{n}",
        contact_email=f"contact{n}@example.org",
        smartplan_id="plan-7",
        run_id="run-1",
        step_id="step-1",
        subject="Hello {{ first_name }}",
        html="<p>Hi {{ first_name }}, your home value report is ready.</p>",
        merge_fields={"first_name": f"Contact{n}"},
    )
    values.update(overrides)
    return SendRequest(**values)


def campaign_request(n: int, provider: str = "command_email", **overrides: Any) -> CampaignRequest:
    """A campaign of agent-1 to contacts c0..c{n-1} (person{i}@example.org, first_name P{i})."""
    values: dict[str, Any] = dict(
        user_id="agent-1",
        provider=provider,
        subject="Open house, {{ first_name }}",
        html="<p>Hi {{ first_name }}</p>",
        recipients=[
            Recipient(f"c{i}", f"person{i}@example.org", {"first_name": f"P{i}"}) for i in range(n)
        ],
    )
    values.update(overrides)
    return CampaignRequest(**values)


def seed_used_credits(rt: Runtime, user_id: str, count: int) -> None:
    """Write ``count`` earlier sent emails of the user's current grant to the SQL ledger."""
    now = rt.clock.now()
    with rt.sessions() as session:
        user = session.get(User, user_id)
        assert user is not None and user.period is not None
        period, seq = user.period, user.grant_seq
    rows = [
        dict(
            id=str(uuid.uuid4()),
            idempotency_key=f"seed|{user_id}|{i}",
            kind=SendKind.SMARTPLAN,
            user_id=user_id,
            contact_id=f"old-{i}",
            contact_email=f"old{i}@example.org",
            merge_fields={},
            subject="s",
            html="h",
            status=SendStatus.SENT,
            period=period,
            grant_seq=seq,
            message_id=f"<seed-{i}@x>",
            attempts=1,
            outcome_published=True,
            created_at=now,
            updated_at=now,
            finished_at=now,
        )
        for i in range(count)
    ]
    with rt.sessions.begin() as session:
        for start in range(0, len(rows), 1000):
            session.execute(insert(Send), rows[start : start + 1000])


def statuses(rt: Runtime, user_id: str) -> dict[str, int]:
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.status, func.count())
            .where(Send.user_id == user_id, ~Send.idempotency_key.startswith("seed|"))
            .group_by(Send.status)
        ).all()
    return {s.value: n for s, n in rows}


def timeline_rows(rt: Runtime, user_id: str) -> list[TimelineEvent]:
    with rt.sessions() as session:
        return list(
            session.scalars(
                select(TimelineEvent)
                .where(TimelineEvent.user_id == user_id)
                .order_by(TimelineEvent.id)
            ).all()
        )


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def settings_environ(settings: Settings) -> dict[str, str]:
    """The variables that make ``Settings.from_env`` read exactly ``settings`` (one variable
    per field, named as the field in capitals), the test's clock offset included."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if name == "plan_catalog":
            raise NotImplementedError("processes started by tests use the built-in catalog")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        env[name.upper()] = text
    return env


def worker_env(settings: Settings) -> dict[str, str]:
    """The whole environment of a process started by a test: this one's, with every setting
    replaced by ``settings`` (so it reads the test's databases and the test's clock)."""
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(settings_environ(settings))
    env["PYTHONUNBUFFERED"] = "1"
    return env


#: Runs a test on the Redis broker with both databases, and on RabbitMQ with SQLite (the
#: broker is what the RabbitMQ run is for).
ON_BOTH_BROKERS = pytest.mark.parametrize(
    ("broker", "database_url"),
    [("redis", "sqlite"), ("redis", "postgresql"), ("rabbitmq", "sqlite")],
    ids=["sqlite-redis", "postgresql-redis", "sqlite-rabbitmq"],
    indirect=True,
)


def reserved_attempts(rt: Runtime, campaign_id: str) -> set[int]:
    """The SMTP attempts counted on a campaign's recipients still waiting (``reserved``)."""
    with rt.sessions() as session:
        return set(
            session.scalars(
                select(Send.attempts).where(
                    Send.campaign_id == campaign_id, Send.status == SendStatus.RESERVED
                )
            ).all()
        )


def campaign_body(contacts: range, name: str = "Open house") -> dict[str, Any]:
    """A campaign request body of agent-1 to contacts c{i} (person{i}@example.org)."""
    return {
        "user_id": "agent-1",
        "name": name,
        "message": {"subject": "Open house, {{ first_name }}", "html": "<p>Hi</p>"},
        "recipients": [
            {"id": f"c{i}", "email": f"person{i}@example.org", "fields": {"first_name": f"P{i}"}}
            for i in contacts
        ],
    }


def run_campaign(api: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Create the campaign through the HTTP API and wait until it completed."""
    r = api.post("/v1/campaigns", json=body)
    assert r.status_code == 202, r.text
    created: dict[str, Any] = r.json()

    def done() -> bool:
        return bool(
            api.get(f"/v1/campaigns/{created['id']}", params={"user_id": "agent-1"}).json()[
                "status"
            ]
            == "completed"
        )

    wait_for(done, timeout=60, what="campaign completed")
    return created
