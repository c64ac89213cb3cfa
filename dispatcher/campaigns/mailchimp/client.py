"""Async client of the MailChimp Marketing API v3 endpoints a campaign send needs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from dispatcher.backoff import backoff
from dispatcher.campaigns.limits import RedisSemaphore, SemaphoreTimeout
from dispatcher.campaigns.mailchimp.account import (
    MAX_CONNECTIONS,
    datacenter_url,
    key_fingerprint,
    mailchimp_semaphore,
)
from dispatcher.campaigns.mailchimp.answers import problem_of, quote_segment, retry_after_seconds
from dispatcher.campaigns.mailchimp.errors import (
    FieldError,
    MailchimpAuthFailed,
    MailchimpRejected,
    MailchimpUnavailable,
    _Retry,
)
from dispatcher.campaigns.mailchimp.values import (
    Campaign,
    Member,
    MemberError,
    Segment,
    UpsertResult,
)
from dispatcher.redisclient import RedisClient
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

#: ``MailchimpUnavailable.operation`` when no connection slot came free in time.
SLOT_WAIT = "connection_slot"
#: The API's maximum of members per batch subscribe and of emails per segment update.
BATCH_SIZE = 500
#: Largest page MailChimp returns from a collection.
PAGE_SIZE = 1000

T = TypeVar("T")


class MailchimpClient:
    """Async client of the few v3 endpoints a campaign send needs.

    Every request holds a slot of ``semaphore`` (shared by all workers for this key; without
    one, only this client is limited). 429, 5xx, timeouts and connection errors are retried
    with capped exponential backoff and jitter (:func:`dispatcher.backoff.backoff`), waiting at
    least ``Retry-After``; other
    4xx raise :class:`MailchimpRejected`. Use as ``async with`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        semaphore: RedisSemaphore | None = None,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 10.0,
        max_retry_after: float = 60.0,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be zero or more")
        self.base_url = (base_url or datacenter_url(api_key)).rstrip("/")
        self.fingerprint = key_fingerprint(api_key)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_retry_after = max_retry_after
        self._semaphore = semaphore
        self._local = asyncio.Semaphore(MAX_CONNECTIONS)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            auth=httpx.BasicAuth("command-email", api_key),
            timeout=timeout,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
            headers={"User-Agent": "command-email-dispatcher"},
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, api_key: str, redis: RedisClient | None = None, **options: Any
    ) -> MailchimpClient:
        """A client for ``api_key`` honouring ``MAILCHIMP_BASE_URL``, limited through ``redis``;
        its waits between tries within a run are never longer than the dispatcher's own retry
        backoff (``RETRY_BACKOFF_SECONDS``, ``RETRY_BACKOFF_MAX_SECONDS``)."""
        semaphore = mailchimp_semaphore(redis, api_key) if redis is not None else None
        options.setdefault("backoff_base", min(0.5, settings.retry_backoff_seconds))
        options.setdefault("backoff_cap", min(10.0, settings.retry_backoff_max_seconds))
        return cls(api_key, base_url=settings.mailchimp_base_url, semaphore=semaphore, **options)

    def __repr__(self) -> str:
        return f"MailchimpClient({self.base_url!r}, key={self.fingerprint})"

    async def __aenter__(self) -> MailchimpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ----------------------------------------------------------------- audience and segment

    async def upsert_members(self, list_id: str, members: Iterable[Member]) -> UpsertResult:
        """Add or update ``members`` in the audience, 500 per call (repeating is harmless)."""
        items = list(members)
        errors: list[MemberError] = []
        statuses: dict[str, str] = {}
        created = updated = 0
        for start in range(0, len(items), BATCH_SIZE):
            body = {
                "members": [m.payload() for m in items[start : start + BATCH_SIZE]],
                "update_existing": True,
            }
            data = await self._call(
                "upsert_members", "POST", f"/lists/{quote_segment(list_id)}", body
            )
            for key, counter in (("new_members", "created"), ("updated_members", "updated")):
                rows = data.get(key) or []
                for row in rows:
                    statuses[str(row.get("email_address", "")).lower()] = str(row.get("status"))
                if counter == "created":
                    created += len(rows)
                else:
                    updated += len(rows)
            errors.extend(
                MemberError(
                    str(e.get("email_address", "")),
                    str(e.get("error", "")),
                    str(e.get("error_code") or ""),
                )
                for e in data.get("errors") or []
            )
            log.debug(
                "mailchimp list %s: members %d-%d of %d upserted",
                list_id,
                start + 1,
                min(start + BATCH_SIZE, len(items)),
                len(items),
            )
        log.info(
            "mailchimp list %s: %d members created, %d updated, %d refused",
            list_id,
            created,
            updated,
            len(errors),
        )
        return UpsertResult(tuple(errors), statuses, created, updated)

    async def find_segment(self, list_id: str, name: str) -> Segment | None:
        """The static segment called ``name``, if the audience has one."""
        fields = "segments.id,segments.name,segments.member_count,total_items"
        async for row in self._pages(
            "find_segment",
            f"/lists/{quote_segment(list_id)}/segments",
            "segments",
            {"type": "static", "fields": fields},
        ):
            if row.get("name") == name:
                return Segment.of(row)
        return None

    async def create_static_segment(
        self, list_id: str, name: str, emails: Sequence[str]
    ) -> Segment:
        """Create the static segment ``name`` holding ``emails`` (which must be list members).

        The first 500 go in the create call and the rest in batches of 500, the API's limit
        per segment update. A create that timed out is looked up by name before it is repeated.
        """
        recovered = False

        async def create() -> Segment:
            body = {"name": name, "static_segment": list(emails[:BATCH_SIZE])}
            return Segment.of(
                await self._json("POST", f"/lists/{quote_segment(list_id)}/segments", body)
            )

        async def lookup() -> Segment | None:
            nonlocal recovered
            found = await self.find_segment(list_id, name)
            recovered = found is not None
            return found

        segment = await self._retrying("create_segment", create, recover=lookup)
        # A segment found after a failed create may lack its first batch: add everything then.
        rest = emails if recovered else emails[BATCH_SIZE:]
        errors = await self.add_segment_members(list_id, segment.id, rest) if rest else ()
        log.info("mailchimp list %s: static segment %s created", list_id, segment.id)
        return Segment(segment.id, name, len(emails) - len(errors), errors)

    async def add_segment_members(
        self, list_id: str, segment_id: int, emails: Sequence[str]
    ) -> tuple[MemberError, ...]:
        """Add ``emails`` to a static segment, 500 per call; returns the ones MailChimp refused."""
        errors: list[MemberError] = []
        path = f"/lists/{quote_segment(list_id)}/segments/{segment_id}"
        for start in range(0, len(emails), BATCH_SIZE):
            body = {"members_to_add": list(emails[start : start + BATCH_SIZE])}
            data = await self._call("add_segment_members", "POST", path, body)
            for e in data.get("errors") or []:
                errors.extend(
                    MemberError(str(addr), str(e.get("error", "")))
                    for addr in e.get("email_addresses") or []
                )
        return tuple(errors)

    # ----------------------------------------------------------------- campaign

    async def find_campaign(self, list_id: str, title: str) -> Campaign | None:
        """The regular campaign of ``list_id`` whose title is ``title``, newest first."""
        fields = (
            "campaigns.id,campaigns.status,campaigns.emails_sent,campaigns.settings.title,"
            "campaigns.recipients.list_id,campaigns.recipients.segment_opts,total_items"
        )
        params = {
            "list_id": list_id,
            "type": "regular",
            "sort_field": "create_time",
            "sort_dir": "DESC",
            "fields": fields,
        }
        async for row in self._pages("find_campaign", "/campaigns", "campaigns", params):
            if (row.get("settings") or {}).get("title") == title:
                return Campaign.of(row)
        return None

    async def create_campaign(
        self,
        *,
        list_id: str,
        segment_id: int,
        title: str,
        subject: str,
        from_name: str,
        reply_to: str,
    ) -> Campaign:
        """Create a regular campaign to the saved segment. ``title`` must be unique: a create
        that timed out or failed on MailChimp's side is looked up by it before it is repeated."""
        body = {
            "type": "regular",
            "recipients": {"list_id": list_id, "segment_opts": {"saved_segment_id": segment_id}},
            "settings": {
                "subject_line": subject,
                "title": title,
                "from_name": from_name,
                "reply_to": reply_to,
            },
        }

        async def create() -> Campaign:
            return Campaign.of(await self._json("POST", "/campaigns", body))

        campaign = await self._retrying(
            "create_campaign", create, recover=lambda: self.find_campaign(list_id, title)
        )
        log.info("mailchimp list %s: campaign %s created", list_id, campaign.id)
        return campaign

    async def set_content(self, campaign_id: str, html: str, text: str | None = None) -> None:
        """Replace the campaign's HTML (and plain-text) content."""
        body: dict[str, Any] = {"html": html}
        if text:
            body["plain_text"] = text
        path = f"/campaigns/{quote_segment(campaign_id)}/content"
        await self._call("set_content", "PUT", path, body)

    async def send(self, campaign_id: str) -> str:
        """Send the campaign now; returns its status. A send that timed out or failed on
        MailChimp's side is checked (status sending/sent/schedule) before it is repeated."""
        path = f"/campaigns/{quote_segment(campaign_id)}/actions/send"

        async def send() -> str:
            await self._json("POST", path, None)
            return "sending"

        async def check() -> str | None:
            campaign = await self.get_campaign(campaign_id)
            return campaign.status if campaign.went else None

        status = await self._retrying("send", send, recover=check)
        log.info("mailchimp campaign %s: sent (%s)", campaign_id, status)
        return status

    async def get_campaign(self, campaign_id: str) -> Campaign:
        """The campaign as MailChimp has it now (status, recipients, emails sent)."""
        return Campaign.of(
            await self._call("get_campaign", "GET", f"/campaigns/{quote_segment(campaign_id)}")
        )

    # ----------------------------------------------------------------- plumbing

    async def _pages(
        self, operation: str, path: str, item_key: str, params: Mapping[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item of a collection, a page at a time (stops at the first short page)."""
        offset = 0
        while True:
            query = {**params, "count": str(PAGE_SIZE), "offset": str(offset)}
            data = await self._call(operation, "GET", path, params=query)
            items = data.get(item_key) or []
            for item in items:
                yield item
            if len(items) < PAGE_SIZE:
                return
            offset += len(items)

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One request that is safe to repeat, with retries."""
        return await self._retrying(
            operation, functools.partial(self._json, method, path, body, params=params)
        )

    async def _retrying(
        self,
        operation: str,
        attempt: Callable[[], Awaitable[T]],
        *,
        recover: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """Run ``attempt`` until it succeeds, a permanent error, or retries run out.

        After a failure that may have taken effect (a timeout, a dropped connection, a 5xx),
        ``recover`` looks for the effect first and its answer is used instead of repeating.
        """
        ambiguous = False
        failure: _Retry | None = None
        for number in range(self.max_retries + 1):
            if ambiguous and recover is not None:
                found = await recover()
                if found is not None:
                    log.info("mailchimp %s: the earlier attempt had taken effect", operation)
                    return found
            try:
                return await attempt()
            except _Retry as exc:
                failure = exc
                ambiguous = ambiguous or exc.ambiguous
            except MailchimpRejected as exc:
                exc.operation = operation
                # e.g. "already sent" after a timed-out send: the first one went through.
                if ambiguous and recover is not None:
                    found = await recover()
                    if found is not None:
                        return found
                raise
            if failure.retry_after is not None and failure.retry_after > self.max_retry_after:
                break
            if number == self.max_retries:
                break
            delay = backoff(number, self.backoff_base, self.backoff_cap)
            delay = max(delay, failure.retry_after or 0.0)
            log.warning(
                "mailchimp %s: attempt %d of %d failed (%s); retrying in %.2fs",
                operation,
                number + 1,
                self.max_retries + 1,
                failure.detail,
                delay,
            )
            await asyncio.sleep(delay)
        assert failure is not None
        if ambiguous and recover is not None:
            found = await recover()
            if found is not None:
                return found
        raise MailchimpUnavailable(
            failure.detail,
            status=failure.status,
            operation=operation,
            retry_after=failure.retry_after,
        )

    async def _json(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One request under a connection slot: the decoded body (None when empty), or
        :class:`_Retry` / :class:`MailchimpRejected`."""
        try:
            async with self._slot():
                response = await self._http.request(method, path, json=body, params=params)
        except SemaphoreTimeout as exc:
            # Nothing reached MailChimp: the agent's connections were all busy.
            raise MailchimpUnavailable(str(exc), operation=SLOT_WAIT) from None
        except httpx.TimeoutException as exc:
            # Connect and pool timeouts happen before anything was sent.
            unsent = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            detail = f"timeout: {type(exc).__name__}"
            raise _Retry(detail, status=None, ambiguous=not unsent) from None
        except httpx.TransportError as exc:
            unsent = isinstance(exc, httpx.ConnectError)
            detail = f"network: {type(exc).__name__}"
            raise _Retry(detail, status=None, ambiguous=not unsent) from None
        status = response.status_code
        if status < 300:
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                raise _Retry(
                    f"{status} with a body that is not JSON", status=status, ambiguous=True
                ) from None
        problem = problem_of(response)
        detail = str(problem.get("detail") or problem.get("title") or response.reason_phrase)
        if status == 429 or status >= 500:
            raise _Retry(
                f"{status} {detail}",
                status=status,
                ambiguous=status >= 500,
                retry_after=retry_after_seconds(response),
            )
        error = MailchimpAuthFailed if status in (401, 403) else MailchimpRejected
        raise error(
            detail,
            status=status,
            title=str(problem.get("title") or ""),
            errors=[
                FieldError(str(e.get("field", "")), str(e.get("message", "")))
                for e in problem.get("errors") or []
                if isinstance(e, dict)
            ],
            instance=str(problem.get("instance") or ""),
        )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:
            async with self._local:
                yield
        else:
            async with self._semaphore.slot():
                yield
