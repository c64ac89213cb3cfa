"""``dispatcher demo``: push a small quota-exhaustion scenario through a running local stack.

A fresh agent is created with 3 credits left in the current period (their earlier sends are
seeded straight into the SQL ledger, which the Redis grant is rebuilt from on first use); five
SmartPlan emails are then submitted over HTTP. Three must arrive in the outbox and two must fail
with ``quota_exhausted`` on the contacts' timelines.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any, TextIO

import httpx
from sqlalchemy import insert

from devstack.processes import StackError
from dispatcher import db
from dispatcher.cli.stack import StackInfo
from dispatcher.delivery.message import message_id_for
from dispatcher.models import Send, SendKind, SendStatus, User
from dispatcher.reasons import Reason
from dispatcher.sends import SendRequest

CREDITS_LEFT = 3
CONTACTS = ("Avery", "Blake", "Casey", "Devon", "Emerson")
TIMEZONE = "America/Chicago"
#: The demo agent's postal address (the footer of their mail shows it).
DEMO_POSTAL_ADDRESS = "350 Main St, Austin, TX 78701"
TERMINAL = {s.value for s in SendStatus if s.terminal}


@dataclass(frozen=True)
class Outcome:
    """One demo send as the API reports it at the end."""

    contact_id: str
    email: str
    send_id: str
    status: str
    reason: str | None


class DemoFailed(StackError):
    """The scenario did not turn out as expected, or the stack could not be used."""


def seed_earlier_sends(database_url: str, user_id: str, count: int) -> str:
    """Write ``count`` sent SmartPlan sends of the user's current grant; returns its period.

    They stand for the agent's earlier activity this month: the quota ledger counts them when
    it builds the user's Redis grant on the first reservation. They are marked
    :attr:`SendKind.IMPORTED`, so the outcome counts operators read (``dispatcher status``)
    leave them out.
    """
    now = datetime.now(UTC)
    engine = db.make_engine(database_url)
    try:
        with db.make_sessionmaker(engine)() as session:
            user = session.get(User, user_id)
            if user is None or user.period is None:
                raise DemoFailed(f"user {user_id} has no current grant")
            period, seq = user.period, user.grant_seq
    finally:
        engine.dispose()
    rows: list[dict[str, Any]] = []
    for i in range(count):
        request = SendRequest(
            user_id=user_id,
            contact_id=f"earlier-{i}",
            contact_email=f"earlier{i}@example.org",
            smartplan_id="earlier-plan",
            run_id="earlier-run",
            step_id=f"step-{i}",
        )
        key = request.idempotency_key
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "idempotency_key": key,
                # Not a send of this dispatcher: counted against the grant, left out of the
                # send counts operators read.
                "kind": SendKind.IMPORTED,
                "user_id": user_id,
                "contact_id": request.contact_id,
                "contact_email": request.contact_email,
                "merge_fields": {},
                "smartplan_id": request.smartplan_id,
                "run_id": request.run_id,
                "step_id": request.step_id,
                "subject": "(earlier send, seeded by dispatcher demo)",
                "html": "<p>seeded</p>",
                "status": SendStatus.SENT,
                "period": period,
                "grant_seq": seq,
                "message_id": message_id_for(key, "demo.command-email.localhost"),
                "attempts": 1,
                "outcome_published": True,
                "created_at": now,
                "updated_at": now,
                "finished_at": now,
            }
        )
    engine = db.make_engine(database_url)
    try:
        with db.make_sessionmaker(engine).begin() as session:
            if rows:
                session.execute(insert(Send), rows)
    finally:
        engine.dispose()
    return period


class Demo:
    """The scenario against one running stack."""

    def __init__(self, info: StackInfo, out: TextIO, timeout: float) -> None:
        self.info = info
        self.out = out
        self.timeout = timeout
        self.http = httpx.Client(
            base_url=info.api_url,
            headers={"Authorization": f"Bearer {info.token}"},
            timeout=10.0,
        )
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        self.user_id = f"demo-{stamp}-{uuid.uuid4().hex[:6]}"

    def say(self, line: str = "") -> None:
        """Print one line of the demo's story."""
        print(line, file=self.out, flush=True)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; anything but 2xx is a :class:`DemoFailed` quoting the API's answer."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DemoFailed(
                f"the API at {self.info.api_url} did not answer ({type(exc).__name__}); "
                "is `dispatcher run` still running?"
            ) from None
        if response.is_error:
            raise DemoFailed(f"{method} {path} answered {response.status_code}: {response.text}")
        return response.json()

    def run(self) -> int:
        """Create the agent, seed the ledger, submit the sends and report; exit code."""
        info = self.info
        health = self.call("GET", "/healthz")
        self.say(f"stack at {info.api_url}: {health.get('status')}; outbox {info.outbox}/")
        total = info.free_plan_credits
        if total < CREDITS_LEFT:
            raise DemoFailed(f"FREE_PLAN_CREDITS is {total}; the demo needs at least 3")

        # Given an agent with 3 credits left this month
        self.call(
            "PUT",
            f"/v1/users/{self.user_id}",
            json={
                "platform_email": f"{self.user_id}@kw.example.com",
                "timezone": TIMEZONE,
                # Shown in the footer of the agent's mail; campaigns need one.
                "postal_address": DEMO_POSTAL_ADDRESS,
            },
        )
        period = seed_earlier_sends(info.database_url, self.user_id, total - CREDITS_LEFT)
        self.say(
            f"agent {self.user_id} ({TIMEZONE}, free plan, {total} credits a month): "
            f"{total - CREDITS_LEFT} already used in {period}, {CREDITS_LEFT} left"
        )

        # When five SmartPlan steps each send one email
        outbox = Path(info.outbox)
        before = set(outbox.glob("*.eml"))
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        submitted: list[tuple[str, str, str]] = []
        for i, name in enumerate(CONTACTS, start=1):
            contact_id = f"{self.user_id}-c{i}"
            email = f"{name.lower()}@example.org"
            accepted = self.call(
                "POST",
                "/v1/sends",
                json={
                    "user_id": self.user_id,
                    "contact": {"id": contact_id, "email": email, "fields": {"first_name": name}},
                    "smartplan": {"plan_id": "demo-welcome", "run_id": run_id, "step_id": "1"},
                    "message": {
                        "subject": "Welcome, {{ first_name }}",
                        "html": "<p>Hi {{ first_name }}, here are this week's listings.</p>",
                    },
                },
            )
            submitted.append((contact_id, email, accepted["id"]))
        self.say(f"submitted {len(submitted)} SmartPlan sends; waiting for their outcomes")

        # Then three are sent and two fail with quota_exhausted on the timeline
        outcomes = self.wait_for_outcomes(submitted)
        # and the agent hears about it: usage notices in the app and by email (system queue)
        notices = self.call("GET", f"/v1/users/{self.user_id}/notifications")["items"]
        arrived = self.wait_for_mail(outbox, before, len(submitted) - 2 + len(notices))
        return self.report(outcomes, arrived, notices)

    def wait_for_mail(self, outbox: Path, before: set[Path], expected: int) -> list[Path]:
        """New .eml files once ``expected`` have arrived, or whatever came within 10 s."""
        deadline = time.monotonic() + 10
        while True:
            arrived = sorted(set(outbox.glob("*.eml")) - before)
            if len(arrived) >= expected or time.monotonic() > deadline:
                return arrived
            time.sleep(0.2)

    def wait_for_outcomes(self, submitted: list[tuple[str, str, str]]) -> list[Outcome]:
        """Poll every (contact, email, send id) until all are terminal, or time out."""
        deadline = time.monotonic() + self.timeout
        while True:
            owner = {"user_id": self.user_id}
            views = {
                sid: self.call("GET", f"/v1/sends/{sid}", params=owner) for _c, _e, sid in submitted
            }
            if all(v["status"] in TERMINAL for v in views.values()):
                return [
                    Outcome(c, e, sid, views[sid]["status"], views[sid]["reason"])
                    for c, e, sid in submitted
                ]
            if time.monotonic() > deadline:
                pending = ", ".join(f"{sid} {v['status']}" for sid, v in views.items())
                raise DemoFailed(
                    f"sends not finished after {self.timeout:.0f}s ({pending}); is the worker "
                    f"running? see {self.info.logs}/worker.log"
                )
            time.sleep(0.2)

    def report(
        self, outcomes: list[Outcome], arrived: list[Path], notices: list[dict[str, Any]]
    ) -> int:
        """Print sends, new .eml files, notices and failed contacts' timelines; 0 when as
        expected."""
        self.say()
        self.say("sends:")
        for o in outcomes:
            reason = f" ({o.reason})" if o.reason else ""
            self.say(f"  {o.email:<22} {o.status}{reason}   send {o.send_id}")

        self.say()
        self.say(f"new .eml files in {self.info.outbox}/:")
        recipients: list[str] = []
        agent = f"{self.user_id}@kw.example.com"
        notice_mail = 0
        for path in arrived:
            msg = message_from_bytes(path.read_bytes(), policy=default)
            if str(msg["To"]) == agent:
                notice_mail += 1
            else:
                recipients.append(str(msg["To"]))
            self.say(f"  {path.name}   To: {msg['To']}   Subject: {msg['Subject']}")
        if not arrived:
            self.say("  (none)")

        self.say()
        self.say(f"in-app notifications of {self.user_id} (also emailed, at no credit):")
        for n in notices:
            self.say(f"  {n['threshold']:>3}%  {n['title']}")

        failed = [o for o in outcomes if o.status == SendStatus.FAILED.value]
        timelines_ok = True
        for o in failed:
            events = self.call(
                "GET", f"/v1/contacts/{o.contact_id}/timeline", params={"user_id": self.user_id}
            )["items"]
            self.say()
            self.say(f"timeline of {o.contact_id} ({o.email}):")
            for e in events:
                source = e.get("source") or {}
                step = (
                    f"{source.get('smartplan_id')}/{source.get('run_id')}/{source.get('step_id')}"
                )
                self.say(
                    f"  {e['occurred_at']}  {e['kind']}  {e['status']}  reason={e['reason']}  "
                    f"smartplan={step}"
                )
                if e.get("detail"):
                    self.say(f"      {e['detail']}")
            timelines_ok &= any(e["reason"] == Reason.QUOTA_EXHAUSTED for e in events)

        sent = [o for o in outcomes if o.status == SendStatus.SENT.value]
        exhausted = [o for o in failed if o.reason == Reason.QUOTA_EXHAUSTED]
        problems: list[str] = []
        if len(sent) != CREDITS_LEFT:
            problems.append(f"{len(sent)} sent, expected {CREDITS_LEFT}")
        if len(exhausted) != len(outcomes) - CREDITS_LEFT or len(failed) != len(exhausted):
            problems.append(f"{len(exhausted)} failed with {Reason.QUOTA_EXHAUSTED}, expected 2")
        if len(recipients) != CREDITS_LEFT:
            problems.append(f"{len(recipients)} emails to contacts, expected {CREDITS_LEFT}")
        if not notices or notice_mail != len(notices):
            problems.append(f"{len(notices)} notifications but {notice_mail} notice emails")
        if sorted(recipients) != sorted(o.email for o in sent):
            problems.append("the .eml recipients are not the sent contacts")
        if not timelines_ok:
            problems.append(f"a failed contact's timeline has no {Reason.QUOTA_EXHAUSTED} event")
        self.say()
        if problems:
            self.say("UNEXPECTED: " + "; ".join(problems))
            return 1
        self.say(
            f"as expected: {CREDITS_LEFT} sent (in the outbox), "
            f"{len(exhausted)} failed with {Reason.QUOTA_EXHAUSTED} (on the contacts' timelines, "
            "never retried)"
        )
        return 0

    def close(self) -> None:
        """Release the HTTP client."""
        self.http.close()


def run(directory: Path, timeout: float = 60.0, out: TextIO = sys.stdout) -> int:
    """Run the demo against the stack in ``directory``; 0 when the outcome is as expected.

    Raises :class:`DemoFailed` when the stack cannot be reached or a send does not finish.
    """
    info = StackInfo.load(directory.expanduser().resolve())
    demo = Demo(info, out, timeout)
    try:
        return demo.run()
    finally:
        demo.close()
