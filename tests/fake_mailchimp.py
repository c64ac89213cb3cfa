"""A MailChimp-shaped HTTP server on loopback for tests.

It speaks the Marketing API v3 endpoints the dispatcher calls, with realistic JSON and
MailChimp's problem+json errors; checks HTTP basic auth (any user name, the API key as the
password); keeps state per API key (audience members, static segments, campaigns going
save -> sending -> sent); answers 429 beyond 10 simultaneous requests per key, recording the
most it saw; and plays injected faults per endpoint::

    with FakeMailchimp() as fake:
        fake.inject(SEND, Fault.error(503), Fault.late(1.0))
        client = MailchimpClient(fake.api_key, base_url=fake.base_url, ...)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import json
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_KEY = "0123456789abcdef0123456789abcdef-us6"
DEFAULT_LIST = "a1b2c3d4e5"
ERROR_DOCS = "https://mailchimp.com/developer/marketing/docs/errors/"
MAX_CONNECTIONS = 10
MAX_BATCH = 500

# Endpoints, named as the fault schedule and the call counters name them.
BATCH_SUBSCRIBE = "POST /lists/{list_id}"
LIST_SEGMENTS = "GET /lists/{list_id}/segments"
CREATE_SEGMENT = "POST /lists/{list_id}/segments"
UPDATE_SEGMENT = "POST /lists/{list_id}/segments/{segment_id}"
LIST_CAMPAIGNS = "GET /campaigns"
CREATE_CAMPAIGN = "POST /campaigns"
GET_CAMPAIGN = "GET /campaigns/{campaign_id}"
SET_CONTENT = "PUT /campaigns/{campaign_id}/content"
SEND = "POST /campaigns/{campaign_id}/actions/send"
ROUTES = (
    BATCH_SUBSCRIBE,
    LIST_SEGMENTS,
    CREATE_SEGMENT,
    UPDATE_SEGMENT,
    LIST_CAMPAIGNS,
    CREATE_CAMPAIGN,
    GET_CAMPAIGN,
    SET_CONTENT,
    SEND,
)


@dataclass(frozen=True)
class Fault:
    """How to answer one call of an endpoint instead of (or on top of) the normal answer.

    ``delay`` waits before answering; with ``after_action`` the action is done first (so a
    client that gave up still finds it done). ``status`` answers that error instead of the
    normal answer.
    """

    status: int | None = None
    title: str = ""
    detail: str = ""
    errors: tuple[dict[str, str], ...] = ()
    retry_after: str | None = None
    delay: float = 0.0
    after_action: bool = False

    @classmethod
    def error(cls, status: int = 503, *, after_action: bool = False) -> Fault:
        """A server-side failure (5xx); with ``after_action`` it happens after the action."""
        titles = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
        return cls(
            status,
            titles.get(status, "Internal Server Error"),
            "An unexpected internal error has occurred. Please contact Support for more "
            "information.",
            after_action=after_action,
        )

    @classmethod
    def throttle(cls, retry_after: float | None = None) -> Fault:
        """429 Too Many Requests, optionally with ``Retry-After`` (seconds)."""
        return cls(
            429,
            "Too Many Requests",
            f"You have exceeded the limit of {MAX_CONNECTIONS} simultaneous connections.",
            retry_after=None if retry_after is None else str(retry_after),
        )

    @classmethod
    def reject(
        cls, detail: str, status: int = 400, title: str = "Bad Request", **extra: Any
    ) -> Fault:
        """A client error with MailChimp's problem body."""
        return cls(status, title, detail, **extra)

    @classmethod
    def late(cls, seconds: float) -> Fault:
        """Do the action, then answer only after ``seconds`` (past the client's timeout)."""
        return cls(delay=seconds, after_action=True)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Wait ``seconds``, then do the action and answer."""
        return cls(delay=seconds)


@dataclass
class Call:
    """One request as the server received it; ``status`` is set once it is answered."""

    route: str
    path: str
    body: Any
    status: int = 0


class Problem(Exception):
    """Raised by an action: answered as MailChimp's problem+json."""

    def __init__(
        self, status: int, title: str, detail: str, errors: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.errors = status, title, detail, errors


NOT_FOUND = (404, "Resource Not Found", "The requested resource could not be found.")


def problem_response(
    status: int,
    title: str,
    detail: str,
    errors: list[dict[str, str]] | tuple[dict[str, str], ...] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": ERROR_DOCS,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": str(uuid.uuid4()),
    }
    if errors:
        body["errors"] = list(errors)
    return Response(
        json.dumps(body),
        status_code=status,
        media_type="application/problem+json; charset=utf-8",
        headers=dict(headers or {}),
    )


def ok(body: Any) -> Response:
    return Response(json.dumps(body), media_type="application/json; charset=utf-8")


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- state


@dataclass
class FakeMember:
    email: str
    status: str
    merge_fields: dict[str, str] = field(default_factory=dict)

    def json(self, list_id: str) -> dict[str, Any]:
        digest = hashlib.md5(self.email.lower().encode()).hexdigest()
        return {
            "id": digest,
            "email_address": self.email,
            "unique_email_id": digest[:10],
            "email_type": "html",
            "status": self.status,
            "merge_fields": {"FNAME": "", "LNAME": "", **self.merge_fields},
            "list_id": list_id,
        }


@dataclass
class FakeSegment:
    id: int
    name: str
    list_id: str
    members: set[str] = field(default_factory=set)  # lower-cased emails
    created_at: str = field(default_factory=now_iso)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "member_count": len(self.members),
            "type": "static",
            "created_at": self.created_at,
            "updated_at": now_iso(),
            "options": {},
            "list_id": self.list_id,
            "_links": [],
        }


@dataclass
class FakeCampaign:
    id: str
    web_id: int
    list_id: str
    segment_id: int | None
    settings: dict[str, Any]
    created: float = field(default_factory=time.time)
    status: str = "save"
    html: str | None = None
    text: str | None = None
    send_started: float | None = None
    recipient_count: int = 0
    emails_sent: int = 0


@dataclass
class Account:
    """Everything one API key sees."""

    lists: dict[str, dict[str, FakeMember]]
    segments: dict[int, FakeSegment] = field(default_factory=dict)
    campaigns: dict[str, FakeCampaign] = field(default_factory=dict)


# --------------------------------------------------------------------------- the server


class FakeMailchimp:
    """The server and its state; start with ``with`` (or :meth:`start` / :meth:`stop`)."""

    def __init__(
        self,
        api_keys: tuple[str, ...] = (DEFAULT_KEY,),
        lists: tuple[str, ...] = (DEFAULT_LIST,),
        *,
        latency: float = 0.0,
        sending_seconds: float = 0.1,
    ) -> None:
        self.api_key = api_keys[0]
        #: Seconds every request waits before it is handled (to create real concurrency).
        self.latency = latency
        #: How long a sent campaign stays ``sending`` before it is ``sent``.
        self.sending_seconds = sending_seconds
        self.accounts = {key: Account({lid: {} for lid in lists}) for key in api_keys}
        self.calls: list[Call] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()  # concurrency 429s answered, per key
        self.send_actions: Counter[str] = Counter()  # accepted send actions per campaign
        self.refused: dict[str, str] = {}  # lower email -> error the batch subscribe reports
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.app = self._build_app()

    # ----------------------------------------------------------------- control from tests

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/3.0"

    def inject(self, route: str, *faults: Fault) -> None:
        """Queue ``faults`` for the next calls of ``route`` (one per call, in order)."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
        with self._lock:
            self._faults[route].extend(faults)

    def refuse(self, email: str, error: str) -> None:
        """Make the batch subscribe refuse ``email`` with ``error``."""
        with self._lock:
            self.refused[email.lower()] = error

    def add_member(
        self, email: str, status: str = "subscribed", list_id: str = DEFAULT_LIST, key: str = ""
    ) -> None:
        with self._lock:
            members = self.accounts[key or self.api_key].lists[list_id]
            members[email.lower()] = FakeMember(email, status)

    def members(self, list_id: str = DEFAULT_LIST, key: str = "") -> dict[str, FakeMember]:
        with self._lock:
            return dict(self.accounts[key or self.api_key].lists[list_id])

    def segments(self, key: str = "") -> list[FakeSegment]:
        with self._lock:
            return list(self.accounts[key or self.api_key].segments.values())

    def campaigns(self, key: str = "") -> list[FakeCampaign]:
        with self._lock:
            account = self.accounts[key or self.api_key]
            for c in account.campaigns.values():
                self._tick(c)
            return list(account.campaigns.values())

    def count(self, route: str) -> int:
        """How many calls of ``route`` were handled (faulted ones included)."""
        with self._lock:
            return sum(1 for c in self.calls if c.route == route)

    def bodies(self, route: str) -> list[Any]:
        with self._lock:
            return [c.body for c in self.calls if c.route == route]

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.run(sockets=[sock]), name="fake-mailchimp", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake MailChimp server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> FakeMailchimp:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- HTTP

    def _build_app(self) -> ASGIApp:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        fake = self

        def route(name: str) -> Callable[[Callable[..., Any]], Any]:
            method, path = name.split(" ", 1)
            return app.api_route("/3.0" + path, methods=[method], name=name)

        @route(BATCH_SUBSCRIBE)
        async def batch_subscribe(request: Request, list_id: str) -> Response:
            return await fake._handle(request, BATCH_SUBSCRIBE, fake._batch_subscribe, list_id)

        @route(LIST_SEGMENTS)
        async def list_segments(request: Request, list_id: str) -> Response:
            return await fake._handle(request, LIST_SEGMENTS, fake._list_segments, list_id)

        @route(CREATE_SEGMENT)
        async def create_segment(request: Request, list_id: str) -> Response:
            return await fake._handle(request, CREATE_SEGMENT, fake._create_segment, list_id)

        @route(UPDATE_SEGMENT)
        async def update_segment(request: Request, list_id: str, segment_id: str) -> Response:
            return await fake._handle(
                request, UPDATE_SEGMENT, fake._update_segment, list_id, segment_id
            )

        @route(LIST_CAMPAIGNS)
        async def list_campaigns(request: Request) -> Response:
            return await fake._handle(request, LIST_CAMPAIGNS, fake._list_campaigns)

        @route(CREATE_CAMPAIGN)
        async def create_campaign(request: Request) -> Response:
            return await fake._handle(request, CREATE_CAMPAIGN, fake._create_campaign)

        @route(GET_CAMPAIGN)
        async def get_campaign(request: Request, campaign_id: str) -> Response:
            return await fake._handle(request, GET_CAMPAIGN, fake._get_campaign, campaign_id)

        @route(SET_CONTENT)
        async def set_content(request: Request, campaign_id: str) -> Response:
            return await fake._handle(request, SET_CONTENT, fake._set_content, campaign_id)

        @route(SEND)
        async def send(request: Request, campaign_id: str) -> Response:
            return await fake._handle(request, SEND, fake._send, campaign_id)

        return ConnectionGate(app, self)

    async def _handle(
        self, request: Request, route: str, action: Callable[..., Response], *args: str
    ) -> Response:
        """Parse, apply the next fault of ``route`` if any, and run ``action`` under the lock."""
        key: str = request.scope["mailchimp.key"]
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        call = Call(route, request.url.path, body)
        with self._lock:
            self.calls.append(call)
            fault = self._faults[route].popleft() if self._faults[route] else None
        response = await self._answer(fault, key, body, dict(request.query_params), action, args)
        call.status = response.status_code
        return response

    async def _answer(
        self,
        fault: Fault | None,
        key: str,
        body: Any,
        query: dict[str, str],
        action: Callable[..., Response],
        args: tuple[str, ...],
    ) -> Response:
        def run() -> Response:
            if isinstance(body, str):
                return problem_response(
                    400, "JSON Parse Error", "We encountered an unspecified JSON parsing error."
                )
            with self._lock:
                try:
                    return action(self.accounts[key], body, query, *args)
                except Problem as p:
                    return problem_response(p.status, p.title, p.detail, p.errors)

        if fault is None:
            if self.latency:
                await asyncio.sleep(self.latency)
            return run()
        if fault.after_action:
            response = run()
            await asyncio.sleep(fault.delay)
        else:
            await asyncio.sleep(fault.delay)
            response = run() if fault.status is None else Response()
        if fault.status is None:
            return response
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
        return problem_response(fault.status, fault.title, fault.detail, fault.errors, headers)

    # ----------------------------------------------------------------- actions (under the lock)

    def _list(self, account: Account, list_id: str) -> dict[str, FakeMember]:
        if list_id not in account.lists:
            raise Problem(*NOT_FOUND)
        return account.lists[list_id]

    def _batch_subscribe(
        self, account: Account, body: Any, _query: dict[str, str], list_id: str
    ) -> Response:
        members = self._list(account, list_id)
        items = (body or {}).get("members")
        if not isinstance(items, list):
            raise invalid("members", "This value should not be blank.")
        if len(items) > MAX_BATCH:
            raise invalid("members", f"Schema describes array, maximum {MAX_BATCH} items.")
        update_existing = bool(body.get("update_existing"))
        new: list[dict[str, Any]] = []
        updated: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        for item in items:
            email = str(item.get("email_address", ""))
            lower = email.lower()
            refusal = self.refused.get(lower)
            if refusal is None and not looks_like_email(email):
                refusal = f"{email} looks fake or invalid, please enter a real email address."
            if refusal is not None:
                errors.append(member_error(email, refusal))
                continue
            merge = {k: str(v) for k, v in (item.get("merge_fields") or {}).items()}
            member = members.get(lower)
            if member is None:
                status = item.get("status") or item.get("status_if_new")
                if not status:
                    errors.append(member_error(email, "The status field is required."))
                    continue
                member = members[lower] = FakeMember(email, str(status), merge)
                new.append(member.json(list_id))
            elif update_existing:
                member.merge_fields.update(merge)
                if item.get("status"):
                    member.status = str(item["status"])
                updated.append(member.json(list_id))
            else:
                errors.append(
                    member_error(
                        email, f"{email} is already a list member.", "ERROR_CONTACT_EXISTS"
                    )
                )
        return ok(
            {
                "new_members": new,
                "updated_members": updated,
                "errors": errors,
                "total_created": len(new),
                "total_updated": len(updated),
                "error_count": len(errors),
                "_links": [],
            }
        )

    def _list_segments(
        self, account: Account, _body: Any, query: dict[str, str], list_id: str
    ) -> Response:
        self._list(account, list_id)
        rows = [s.json() for s in account.segments.values() if s.list_id == list_id]
        page = paginate(rows, query)
        return ok(pick({"segments": page, "list_id": list_id, "total_items": len(rows)}, query))

    def _create_segment(
        self, account: Account, body: Any, _query: dict[str, str], list_id: str
    ) -> Response:
        members = self._list(account, list_id)
        body = body or {}
        if not body.get("name"):
            raise invalid("name", "This value should not be blank.")
        emails = body.get("static_segment")
        if not isinstance(emails, list):
            raise invalid("static_segment", "This value should be of type array.")
        segment = FakeSegment(next(self._ids), str(body["name"]), list_id)
        # Emails that are not list members are ignored, as MailChimp documents.
        segment.members = {e.lower() for e in emails if str(e).lower() in members}
        account.segments[segment.id] = segment
        return ok(segment.json())

    def _update_segment(
        self, account: Account, body: Any, _query: dict[str, str], list_id: str, segment_id: str
    ) -> Response:
        members = self._list(account, list_id)
        segment = account.segments.get(int(segment_id)) if segment_id.isdigit() else None
        if segment is None or segment.list_id != list_id:
            raise Problem(*NOT_FOUND)
        add = (body or {}).get("members_to_add") or []
        remove = (body or {}).get("members_to_remove") or []
        for name, value in (("members_to_add", add), ("members_to_remove", remove)):
            if len(value) > MAX_BATCH:
                raise Problem(
                    400,
                    "Invalid Resource",
                    "Maximum allowed member items exceeded, please provide at most "
                    f"{MAX_BATCH} items in members_to_add field or members_to_remove field",
                    [{"field": name, "message": f"at most {MAX_BATCH} items"}],
                )
        added = [e for e in add if str(e).lower() in members]
        segment.members |= {e.lower() for e in added}
        segment.members -= {str(e).lower() for e in remove}
        return ok(
            {
                "members_added": [members[e.lower()].json(list_id) for e in added],
                "members_removed": [],
                "errors": [],
                "total_added": len(added),
                "total_removed": 0,
                "error_count": 0,
                "_links": [],
            }
        )

    def _create_campaign(self, account: Account, body: Any, _query: dict[str, str]) -> Response:
        body = body or {}
        if body.get("type") != "regular":
            raise invalid("type", "Value is not one of the allowed values.")
        recipients = body.get("recipients") or {}
        list_id = str(recipients.get("list_id", ""))
        if list_id not in account.lists:
            raise invalid("recipients.list_id", "The list id provided is invalid.")
        segment_id = (recipients.get("segment_opts") or {}).get("saved_segment_id")
        if segment_id is not None and segment_id not in account.segments:
            raise invalid("recipients.segment_opts.saved_segment_id", "Invalid saved segment.")
        settings = dict(body.get("settings") or {})
        reply_to = settings.get("reply_to")
        if reply_to is not None and not looks_like_email(str(reply_to)):
            raise invalid("settings.reply_to", "This value should be a valid email.")
        campaign = FakeCampaign(
            uuid.uuid4().hex[:10], next(self._ids), list_id, segment_id, settings
        )
        account.campaigns[campaign.id] = campaign
        return ok(self._campaign_json(account, campaign))

    def _list_campaigns(self, account: Account, _body: Any, query: dict[str, str]) -> Response:
        rows = [
            c
            for c in account.campaigns.values()
            if query.get("list_id") in (None, c.list_id)
            and query.get("status") in (None, self._tick(c))
            and query.get("type") in (None, "regular")
        ]
        if query.get("sort_field") == "create_time":
            rows.sort(key=lambda c: c.created, reverse=query.get("sort_dir") == "DESC")
        page = paginate([self._campaign_json(account, c) for c in rows], query)
        return ok(pick({"campaigns": page, "total_items": len(rows), "_links": []}, query))

    def _get_campaign(
        self, account: Account, _body: Any, query: dict[str, str], campaign_id: str
    ) -> Response:
        campaign = self._campaign(account, campaign_id)
        return ok(pick(self._campaign_json(account, campaign), query))

    def _set_content(
        self, account: Account, body: Any, _query: dict[str, str], campaign_id: str
    ) -> Response:
        campaign = self._campaign(account, campaign_id)
        if self._tick(campaign) != "save":
            raise Problem(400, "Bad Request", "Cannot update the content of a sent campaign.")
        body = body or {}
        campaign.html = body.get("html")
        campaign.text = body.get("plain_text")
        return ok(
            {
                "plain_text": campaign.text or "",
                "html": campaign.html or "",
                "archive_html": campaign.html or "",
                "_links": [],
            }
        )

    def _send(
        self, account: Account, _body: Any, _query: dict[str, str], campaign_id: str
    ) -> Response:
        campaign = self._campaign(account, campaign_id)
        if self._tick(campaign) != "save":
            raise Problem(400, "Bad Request", "Cannot send a campaign that has already been sent.")
        count = self._recipient_count(account, campaign)
        settings = campaign.settings
        if not (campaign.html and count and settings.get("subject_line")):
            raise Problem(400, "Bad Request", "Your Campaign is not ready to send.")
        if not (settings.get("from_name") and settings.get("reply_to")):
            raise Problem(400, "Bad Request", "Your Campaign is not ready to send.")
        campaign.status = "sending"
        campaign.send_started = time.time()
        campaign.recipient_count = count
        self.send_actions[campaign.id] += 1
        return Response(status_code=204)

    # ----------------------------------------------------------------- helpers (under the lock)

    def _campaign(self, account: Account, campaign_id: str) -> FakeCampaign:
        if campaign_id not in account.campaigns:
            raise Problem(*NOT_FOUND)
        return account.campaigns[campaign_id]

    def _tick(self, campaign: FakeCampaign) -> str:
        """Move a sending campaign to sent once its sending time has passed."""
        started = campaign.send_started
        if (
            campaign.status == "sending"
            and started
            and time.time() - started >= self.sending_seconds
        ):
            campaign.status = "sent"
            campaign.emails_sent = campaign.recipient_count
        return campaign.status

    def _recipient_count(self, account: Account, campaign: FakeCampaign) -> int:
        members = account.lists[campaign.list_id]
        if campaign.segment_id is None:
            emails: set[str] = set(members)
        else:
            emails = account.segments[campaign.segment_id].members
        return sum(1 for e in emails if e in members and members[e].status == "subscribed")

    def _campaign_json(self, account: Account, c: FakeCampaign) -> dict[str, Any]:
        status = self._tick(c)
        segment = account.segments.get(c.segment_id) if c.segment_id is not None else None
        return {
            "id": c.id,
            "web_id": c.web_id,
            "type": "regular",
            "create_time": datetime.fromtimestamp(c.created, UTC).isoformat(),
            "archive_url": f"http://eepurl.com/{c.id}",
            "status": status,
            "emails_sent": c.emails_sent,
            "send_time": (
                datetime.fromtimestamp(c.send_started, UTC).isoformat() if c.send_started else ""
            ),
            "content_type": "html",
            "needs_block_refresh": False,
            "recipients": {
                "list_id": c.list_id,
                "list_is_active": True,
                "list_name": "Agent audience",
                "segment_text": f"Saved segment: {segment.name}" if segment else "",
                "recipient_count": (
                    c.recipient_count if status != "save" else self._recipient_count(account, c)
                ),
                "segment_opts": (
                    {"saved_segment_id": c.segment_id, "match": "all"} if c.segment_id else {}
                ),
            },
            "settings": {
                "subject_line": "",
                "title": "",
                "from_name": "",
                "reply_to": "",
                "to_name": "",
                "auto_footer": False,
                **c.settings,
            },
            "tracking": {"opens": True, "html_clicks": True, "text_clicks": False},
            "_links": [],
        }


class ConnectionGate:
    """ASGI middleware: basic auth, and at most 10 requests in flight per API key (429 beyond).

    A request counts from its arrival until its last response byte is sent.
    """

    def __init__(self, app: ASGIApp, fake: FakeMailchimp) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = api_key_of(dict(scope["headers"]).get(b"authorization", b""))
        fake = self.fake
        if key is None or key not in fake.accounts:
            response = problem_response(
                401,
                "API Key Invalid",
                "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
            )
            await response(scope, receive, send)
            return
        with fake._lock:
            if fake.in_flight[key] >= MAX_CONNECTIONS:
                fake.throttled[key] += 1
                busy = True
            else:
                busy = False
                fake.in_flight[key] += 1
                fake.max_in_flight[key] = max(fake.max_in_flight[key], fake.in_flight[key])
        if busy:
            throttle = Fault.throttle()
            response = problem_response(429, throttle.title, throttle.detail)
            await response(scope, receive, send)
            return
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                with fake._lock:
                    fake.in_flight[key] -= 1

        async def counted_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finish()

        scope["mailchimp.key"] = key
        try:
            await self.app(scope, receive, counted_send)
        finally:
            finish()


def api_key_of(header: bytes) -> str | None:
    """The password of an HTTP basic ``Authorization`` header."""
    scheme, _, value = header.decode("latin-1").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep else None


def looks_like_email(value: str) -> bool:
    local, _, domain = value.partition("@")
    return bool(local) and "." in domain and " " not in value and not domain.startswith(".")


def member_error(email: str, error: str, code: str = "ERROR_GENERIC") -> dict[str, str]:
    return {
        "email_address": email,
        "error": error,
        "error_code": code,
        "field": "",
        "field_message": "",
    }


def invalid(field_name: str, message: str) -> Problem:
    return Problem(
        400,
        "Invalid Resource",
        "The resource submitted could not be validated. For field-specific details, see the "
        "'errors' array.",
        [{"field": field_name, "message": message}],
    )


def paginate(rows: list[dict[str, Any]], query: Mapping[str, str]) -> list[dict[str, Any]]:
    count = min(int(query.get("count", 10)), 1000)
    offset = int(query.get("offset", 0))
    return rows[offset : offset + count]


def pick(data: dict[str, Any], query: Mapping[str, str]) -> dict[str, Any]:
    """Apply MailChimp's ``fields`` parameter (dotted paths; lists apply to each item)."""
    if not query.get("fields"):
        return data
    tree: dict[str, Any] = {}
    for path in query["fields"].split(","):
        node = tree
        for part in path.strip().split("."):
            node = node.setdefault(part, {})

    def keep(value: Any, node: dict[str, Any]) -> Any:
        if not node:
            return value
        if isinstance(value, list):
            return [keep(v, node) for v in value]
        if isinstance(value, dict):
            return {k: keep(value[k], sub) for k, sub in node.items() if k in value}
        return value

    result: dict[str, Any] = keep(data, tree)
    return result
