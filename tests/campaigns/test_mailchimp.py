"""MailChimp campaign sends against a local MailChimp-shaped server and a real Redis."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from dispatcher.campaigns.limits import RedisSemaphore, SemaphoreTimeout
from dispatcher.campaigns.mailchimp import (
    MailchimpAuthFailed,
    MailchimpClient,
    MailchimpRejected,
    MailchimpUnavailable,
    Member,
    datacenter_url,
    key_fingerprint,
    mailchimp_semaphore,
    send_campaign,
)
from dispatcher.errors import PermanentError, TransientError
from tests.fake_mailchimp import (
    BATCH_SUBSCRIBE,
    CREATE_CAMPAIGN,
    CREATE_SEGMENT,
    DEFAULT_KEY,
    DEFAULT_LIST,
    LIST_CAMPAIGNS,
    LIST_SEGMENTS,
    SEND,
    SET_CONTENT,
    UPDATE_SEGMENT,
    FakeMailchimp,
    Fault,
)

# The timeout is generous so that an ordinary request is never timed out (and retried, which
# would change the request counts asserted below) because the test process paused, e.g. for a
# garbage collection on a busy machine; the fake server runs in this process and pauses with it.
FAST: dict[str, Any] = dict(timeout=2.0, max_retries=4, backoff_base=0.01, backoff_cap=0.05)
# Where MailChimp answers late on purpose, the client gives up sooner to keep those tests quick.
# A pause there can only add a timeout to some other request, and that is exactly the case the
# tests exercise: whatever timed out is looked up before it is repeated, or is safe to repeat.
GIVES_UP: dict[str, Any] = dict(timeout=0.3)
LATE = 0.6  # seconds the late answers take: well past GIVES_UP's timeout


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never became true"
        time.sleep(0.01)


@pytest.fixture
def fake() -> Iterator[FakeMailchimp]:
    with FakeMailchimp() as server:
        yield server


@pytest.fixture
def make_client(fake: FakeMailchimp, redis_client: redis.Redis) -> Callable[..., MailchimpClient]:
    """Clients of the fake, limited through the test's Redis; build them inside the loop."""

    def make(api_key: str = DEFAULT_KEY, **overrides: Any) -> MailchimpClient:
        options: dict[str, Any] = {
            "base_url": fake.base_url,
            "semaphore": mailchimp_semaphore(redis_client, api_key),
            **FAST,
            **overrides,
        }
        return MailchimpClient(api_key, **options)

    return make


def recipients(n: int, start: int = 0) -> list[Member]:
    return [Member(f"contact{i}@example.org", f"First{i}", f"Last{i}") for i in range(start, n)]


def campaign(title: str = "ced-campaign-42", people: list[Member] | None = None) -> dict[str, Any]:
    return dict(
        list_id=DEFAULT_LIST,
        title=title,
        recipients=recipients(3) if people is None else people,
        subject="Your home value report",
        html="<p>Hi, your home value report is ready.</p>",
        text="Hi, your home value report is ready.",
        from_name="Agent Smith",
        reply_to="agent@kw.example.com",
    )


def send(make_client: Callable[..., MailchimpClient], **kwargs: Any) -> Any:
    client_options = kwargs.pop("client", {})

    async def go() -> Any:
        async with make_client(**client_options) as client:
            return await send_campaign(client, **campaign(**kwargs))

    return asyncio.run(go())


# --------------------------------------------------------------------------- the happy path


def test_send_campaign_syncs_audience_segments_exactly_the_recipients_and_sends_once(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    # Given an audience with one subscribed and one unsubscribed contact, and an address
    # MailChimp refuses
    fake.add_member("contact1@example.org", "subscribed")
    fake.add_member("gone@example.org", "unsubscribed")
    fake.refuse("blocked@example.org", "blocked@example.org was permanently deleted.")
    people = [
        *recipients(3),
        Member("CONTACT2@example.org"),  # the same contact again, other case
        Member("gone@example.org"),
        Member("blocked@example.org"),
        Member("not-an-address"),
    ]

    # When the campaign is sent through MailChimp
    outcome = send(make_client, people=people)

    # Then the deliverable recipients are members with their names, and exactly they are in
    # the campaign's static segment
    deliverable = {f"contact{i}@example.org" for i in range(3)}
    members = fake.members()
    assert {e for e, m in members.items() if m.status == "subscribed"} == deliverable
    assert members["contact0@example.org"].merge_fields == {"FNAME": "First0", "LNAME": "Last0"}
    assert members["gone@example.org"].status == "unsubscribed"  # never resubscribed
    [segment] = fake.segments()
    assert segment.members == deliverable
    assert set(outcome.recipients) == deliverable
    # And the campaign went once, to that segment, with its content
    [sent] = fake.campaigns()
    assert (outcome.campaign_id, outcome.segment_id) == (sent.id, segment.id)
    assert sent.settings == {
        "subject_line": "Your home value report",
        "title": "ced-campaign-42",
        "from_name": "Agent Smith",
        "reply_to": "agent@kw.example.com",
    }
    assert sent.segment_id == segment.id and sent.recipient_count == 3
    assert sent.html == campaign()["html"] and sent.text == campaign()["text"]
    assert fake.send_actions[sent.id] == 1 and fake.count(SEND) == 1
    assert outcome.status in ("sending", "sent") and not outcome.already_sent
    # And every recipient MailChimp will not mail is reported with MailChimp's reason
    errors = {e.email: e.error for e in outcome.errors}
    assert errors == {
        "gone@example.org": "the contact is unsubscribed in the MailChimp audience",
        "blocked@example.org": "blocked@example.org was permanently deleted.",
        "not-an-address": (
            "not-an-address looks fake or invalid, please enter a real email address."
        ),
    }


def test_campaign_status_moves_from_sending_to_sent(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    outcome = send(make_client)
    time.sleep(fake.sending_seconds)

    async def status() -> tuple[str, int]:
        async with make_client() as client:
            got = await client.get_campaign(str(outcome.campaign_id))
            return got.status, got.emails_sent

    assert asyncio.run(status()) == ("sent", 3)


def test_large_audiences_go_in_batches_of_500(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    outcome = send(make_client, people=recipients(1203))

    assert [len(b["members"]) for b in fake.bodies(BATCH_SUBSCRIBE)] == [500, 500, 203]
    assert [len(b["static_segment"]) for b in fake.bodies(CREATE_SEGMENT)] == [500]
    assert [len(b["members_to_add"]) for b in fake.bodies(UPDATE_SEGMENT)] == [500, 203]
    [segment] = fake.segments()
    assert len(segment.members) == 1203 == len(outcome.recipients)
    assert fake.send_actions[str(outcome.campaign_id)] == 1


# --------------------------------------------------------------------------- transient faults


def test_throttling_and_outages_on_every_step_still_send_exactly_once(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    fake.inject(BATCH_SUBSCRIBE, Fault.error(503), Fault.throttle(retry_after=0.02))
    fake.inject(LIST_CAMPAIGNS, Fault.throttle())
    fake.inject(LIST_SEGMENTS, Fault.error(500))
    fake.inject(CREATE_SEGMENT, Fault.error(503), Fault.throttle())
    fake.inject(CREATE_CAMPAIGN, Fault.throttle(), Fault.error(502))
    fake.inject(SET_CONTENT, Fault.error(502), Fault.throttle())
    fake.inject(SEND, Fault.error(503), Fault.throttle(), Fault.error(500))

    outcome = send(make_client)

    [segment] = fake.segments()
    [sent] = fake.campaigns()
    assert outcome.campaign_id == sent.id and segment.members == set(outcome.recipients)
    assert fake.send_actions == {sent.id: 1}
    assert fake.count(SEND) == 4  # three faults, then the one that went


def test_retry_after_is_waited_for(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    fake.inject(LIST_SEGMENTS, Fault.throttle(retry_after=0.4))

    async def go() -> float:
        async with make_client(backoff_cap=0.001) as client:
            started = time.monotonic()
            await client.find_segment(DEFAULT_LIST, "anything")
            return time.monotonic() - started

    assert asyncio.run(go()) >= 0.4
    assert fake.count(LIST_SEGMENTS) == 2


def test_a_retry_after_longer_than_we_wait_is_handed_to_the_caller(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    fake.inject(LIST_SEGMENTS, Fault.throttle(retry_after=120))

    async def go() -> None:
        async with make_client() as client:
            await client.find_segment(DEFAULT_LIST, "anything")

    with pytest.raises(MailchimpUnavailable) as caught:
        asyncio.run(go())
    assert caught.value.retry_after == 120 and caught.value.status == 429
    assert fake.count(LIST_SEGMENTS) == 1


def test_exhausted_retries_raise_the_transient_error(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    fake.inject(LIST_SEGMENTS, *[Fault.error(503)] * 5)

    async def go() -> None:
        async with make_client(max_retries=2) as client:
            await client.find_segment(DEFAULT_LIST, "anything")

    with pytest.raises(MailchimpUnavailable) as caught:
        asyncio.run(go())
    error = caught.value
    assert isinstance(error, TransientError) and error.reason == "mailchimp_unavailable"
    assert error.status == 503 and error.operation == "find_segment"
    assert fake.count(LIST_SEGMENTS) == 3


# --------------------------------------------------------------------------- at most once


def test_a_create_that_timed_out_is_found_instead_of_repeated(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    # MailChimp creates the segment and the campaign but answers after the client gave up.
    fake.inject(CREATE_SEGMENT, Fault.late(LATE))
    fake.inject(CREATE_CAMPAIGN, Fault.late(LATE))

    outcome = send(make_client, client=GIVES_UP)

    assert fake.count(CREATE_SEGMENT) == 1 and fake.count(CREATE_CAMPAIGN) == 1
    [segment] = fake.segments()
    [sent] = fake.campaigns()
    assert segment.members == set(outcome.recipients)
    assert (outcome.campaign_id, outcome.segment_id) == (sent.id, segment.id)
    assert fake.send_actions == {sent.id: 1}


def test_a_create_that_failed_after_taking_effect_is_found_instead_of_repeated(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    fake.inject(CREATE_CAMPAIGN, Fault.error(500, after_action=True))

    outcome = send(make_client)

    [sent] = fake.campaigns()
    assert outcome.campaign_id == sent.id and fake.count(CREATE_CAMPAIGN) == 1


def test_a_send_that_timed_out_is_checked_instead_of_repeated(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    fake.inject(SEND, Fault.late(LATE))

    outcome = send(make_client, client=GIVES_UP)

    [sent] = fake.campaigns()
    assert fake.count(SEND) == 1 and fake.send_actions == {sent.id: 1}
    assert outcome.status in ("sending", "sent")


def test_a_send_that_failed_after_taking_effect_is_not_repeated(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    fake.inject(SEND, Fault.error(503, after_action=True))

    send(make_client)

    [sent] = fake.campaigns()
    assert fake.count(SEND) == 1 and fake.send_actions == {sent.id: 1}


def test_a_send_still_in_flight_when_repeated_goes_out_once(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    # The first send is still being processed when the client, having timed out, checks (the
    # campaign is not sending yet) and sends again: MailChimp takes only one of them.
    fake.inject(SEND, Fault.slow(LATE))

    send(make_client, client=GIVES_UP)

    def all_answered() -> bool:  # the slow first send, too, has been handled by the server
        return all(c.status for c in list(fake.calls) if c.route == SEND)

    wait_until(all_answered)

    [sent] = fake.campaigns()
    assert fake.send_actions == {sent.id: 1}


def test_a_repeated_send_campaign_reuses_what_the_first_run_made(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    # Given a first run that created segment and campaign, then gave up on the send
    fake.inject(SEND, *[Fault.error(503)] * 3)
    with pytest.raises(MailchimpUnavailable):
        send(make_client, client={"max_retries": 2})
    [draft] = fake.campaigns()
    assert draft.status == "save"

    # When the job is retried, and then redelivered once more
    first = send(make_client)
    again = send(make_client)

    # Then one segment and one campaign exist, and it was sent once
    assert len(fake.segments()) == 1 and len(fake.campaigns()) == 1
    assert first.campaign_id == again.campaign_id == draft.id and not first.already_sent
    assert again.already_sent and again.segment_id == first.segment_id
    assert fake.send_actions == {draft.id: 1} and fake.count(CREATE_CAMPAIGN) == 1


# --------------------------------------------------------------------------- permanent errors


def test_a_rejected_create_raises_the_permanent_error_with_mailchimps_detail(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    fake.inject(
        CREATE_CAMPAIGN,
        Fault.reject("This campaign's title is too long.", errors=({"field": "settings.title",
                     "message": "at most 100 characters"},)),
    )  # fmt: skip

    with pytest.raises(MailchimpRejected) as caught:
        send(make_client)

    error = caught.value
    assert isinstance(error, PermanentError) and error.reason == "mailchimp_rejected"
    assert (error.status, error.title) == (400, "Bad Request")
    assert error.detail == "This campaign's title is too long."
    assert [(e.field, e.message) for e in error.errors] == [
        ("settings.title", "at most 100 characters")
    ]
    assert error.operation == "create_campaign" and error.instance
    assert "settings.title: at most 100 characters" in str(error)
    assert fake.count(CREATE_CAMPAIGN) == 1 and fake.count(SEND) == 0  # not retried


def test_mailchimps_own_validation_errors_come_through(
    fake: FakeMailchimp, make_client: Callable[..., MailchimpClient]
) -> None:
    async def go() -> None:
        async with make_client() as client:
            await client.create_campaign(
                list_id=DEFAULT_LIST,
                segment_id=1,
                title="t",
                subject="s",
                from_name="f",
                reply_to="r@example.org",
            )

    with pytest.raises(MailchimpRejected) as caught:
        asyncio.run(go())
    assert caught.value.title == "Invalid Resource"
    assert caught.value.errors[0].field == "recipients.segment_opts.saved_segment_id"


def test_a_wrong_key_is_an_auth_failure(fake: FakeMailchimp) -> None:
    async def go() -> None:
        async with MailchimpClient("ffff-us6", base_url=fake.base_url, **FAST) as client:
            await client.get_campaign("abc")

    with pytest.raises(MailchimpAuthFailed) as caught:
        asyncio.run(go())
    assert caught.value.status == 401 and isinstance(caught.value, PermanentError)
    assert caught.value.reason == "mailchimp_auth_failed"


def test_the_base_url_comes_from_the_keys_datacenter() -> None:
    assert datacenter_url("0123abcd-us19") == "https://us19.api.mailchimp.com/3.0"
    client = MailchimpClient("0123abcd-us19")
    assert client.base_url == "https://us19.api.mailchimp.com/3.0"
    assert "0123abcd" not in repr(client)
    assert MailchimpClient("0123abcd-us19", base_url="http://x/3.0/").base_url == "http://x/3.0"
    with pytest.raises(MailchimpAuthFailed):
        MailchimpClient("no-datacenter-suffix!")


# --------------------------------------------------------------------------- 10 connections


def _watch_keys(client: redis.Redis, stop: threading.Event, seen: set[str]) -> None:
    while not stop.is_set():
        names: list[bytes] = client.keys("*")  # type: ignore[assignment]
        for name in names:
            seen.add(name.decode())
            if client.type(name) == b"zset":
                members: list[bytes] = client.zrange(name, 0, -1)  # type: ignore[assignment]
                seen.update(m.decode() for m in members)
        time.sleep(0.005)


def test_forty_concurrent_requests_from_four_clients_keep_ten_in_flight(
    fake: FakeMailchimp,
    make_client: Callable[..., MailchimpClient],
    redis_client: redis.Redis,
) -> None:
    # Long enough that all 10 slot holders are at the server at once, even after a pause.
    fake.latency = 0.3
    stop, seen = threading.Event(), set[str]()
    watcher = threading.Thread(target=_watch_keys, args=(redis_client, stop, seen))
    watcher.start()

    async def go() -> None:
        clients = [make_client(timeout=5) for _ in range(4)]
        try:
            await asyncio.gather(
                *(c.find_segment(DEFAULT_LIST, "none") for c in clients for _ in range(10))
            )
        finally:
            for c in clients:
                await c.aclose()

    try:
        asyncio.run(go())
    finally:
        stop.set()
        watcher.join()

    assert fake.count(LIST_SEGMENTS) == 40
    assert fake.max_in_flight[DEFAULT_KEY] == 10  # saturated, never over
    assert fake.throttled[DEFAULT_KEY] == 0
    # The limit lived in Redis under a fingerprint of the key, never the key itself.
    assert f"ced:sem:mailchimp:{key_fingerprint(DEFAULT_KEY)}" in seen
    assert not any(DEFAULT_KEY in s or DEFAULT_KEY.split("-")[0] in s for s in seen)
    assert redis_client.keys("*") == []  # every slot was given back


def test_the_fake_answers_429_beyond_ten_simultaneous_requests(fake: FakeMailchimp) -> None:
    # Control: without our limit, MailChimp's would bite. The first 10 are still being
    # answered when the other 10 arrive, even if the test process pauses in between.
    fake.latency = 1.0

    async def go() -> list[httpx.Response]:
        auth = httpx.BasicAuth("any", DEFAULT_KEY)
        async with httpx.AsyncClient(base_url=fake.base_url, auth=auth) as client:
            url = f"{fake.base_url}/lists/{DEFAULT_LIST}/segments"
            return list(await asyncio.gather(*(client.get(url) for _ in range(20))))

    answers = asyncio.run(go())
    throttled = [r for r in answers if r.status_code == 429]
    assert len(throttled) == 10 and fake.max_in_flight[DEFAULT_KEY] == 10
    problem = throttled[0].json()
    assert problem["title"] == "Too Many Requests" and problem["status"] == 429
    assert problem["detail"] == "You have exceeded the limit of 10 simultaneous connections."
    assert throttled[0].headers["content-type"].startswith("application/problem+json")


def _hammer(
    redis_url: str, base_url: str, shared: bool, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    """20 simultaneous requests from this process, limited through Redis when ``shared``."""

    async def go() -> int:
        client = redis.Redis.from_url(redis_url)
        semaphore = mailchimp_semaphore(client, DEFAULT_KEY) if shared else None
        options = {**FAST, "timeout": 5.0, "max_retries": 0}
        async with MailchimpClient(
            DEFAULT_KEY, base_url=base_url, semaphore=semaphore, **options
        ) as mailchimp:
            answers = await asyncio.gather(
                *(mailchimp.find_segment(DEFAULT_LIST, "none") for _ in range(20)),
                return_exceptions=True,
            )
        client.close()
        return sum(1 for a in answers if not isinstance(a, BaseException))

    barrier.wait(60)
    results.put(asyncio.run(go()))


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["shared_limit", "control_without"])
def test_two_processes_share_the_ten_connection_limit(
    fake: FakeMailchimp, redis_url: str, shared: bool
) -> None:
    # Two worker processes start 20 requests each at the same moment. Each alone stays within
    # 10 connections; only the limit in Redis keeps the two together within 10 (the control
    # run, with process-local limits only, shows that they really overlap).
    # Each process needs two rounds of 0.5 s, so the two overlap even if one starts late.
    fake.latency = 0.5
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=_hammer, args=(redis_url, fake.base_url, shared, barrier, results))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    succeeded = sum(results.get(timeout=5) for _ in workers)
    assert fake.max_in_flight[DEFAULT_KEY] == 10
    if shared:
        assert succeeded == 40 == fake.count(LIST_SEGMENTS)
        assert fake.throttled[DEFAULT_KEY] == 0
    else:
        assert fake.throttled[DEFAULT_KEY] > 0 and succeeded < 40


def test_logs_hold_neither_the_key_nor_the_message(
    fake: FakeMailchimp,
    make_client: Callable[..., MailchimpClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.inject(SEND, Fault.error(503))
    fake.inject(CREATE_CAMPAIGN, Fault.late(LATE))
    with caplog.at_level(logging.DEBUG):
        send(make_client, client=GIVES_UP)
    assert "mailchimp" in caplog.text
    for secret in (DEFAULT_KEY, DEFAULT_KEY.split("-")[0], "home value report is ready"):
        assert secret not in caplog.text


# --------------------------------------------------------------------------- the semaphore


def test_semaphore_never_lets_more_than_its_limit_in(redis_client: redis.Redis) -> None:
    semaphores = [RedisSemaphore(redis_client, "test", 3, poll_interval=0.01) for _ in range(3)]
    inside = peak = 0

    async def work(sem: RedisSemaphore) -> None:
        nonlocal inside, peak
        async with sem.slot():
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    async def go() -> None:
        await asyncio.gather(*(work(semaphores[i % 3]) for i in range(30)))

    asyncio.run(go())
    assert peak == 3 and redis_client.keys("*") == []


def test_a_crashed_holders_slot_comes_back_when_its_lease_runs_out(
    redis_client: redis.Redis,
) -> None:
    clock = [1_000.0]
    sem = RedisSemaphore(redis_client, "crash", 1, lease_seconds=30, now=lambda: clock[0])
    assert sem.try_acquire("crashed-holder")  # and never released
    assert not sem.try_acquire("next") and sem.in_use() == 1
    clock[0] += 31
    assert sem.in_use() == 0
    assert sem.try_acquire("next")
    assert redis_client.zrange(sem.key, 0, -1) == [b"next"]
    assert 0 < redis_client.pttl(sem.key) <= 90_000  # an abandoned key goes away too


def test_a_held_slot_is_renewed_past_its_lease(redis_client: redis.Redis) -> None:
    # The lease runs on this clock, so a pause of the test process cannot make it run out. The
    # holder renews on real time (every third of the lease), which must still come well within
    # one lease: a holder renewing less often would lose its slot.
    clock = [1_000.0]
    lease = 3.0
    sem = RedisSemaphore(redis_client, "renew", 1, lease_seconds=lease, now=lambda: clock[0])

    def expiry(token: str) -> float:
        return float(redis_client.zscore(sem.key, token) or 0) / 1000

    async def go() -> bool:
        async with sem.slot() as token:
            held = time.monotonic()
            first_expiry = expiry(token)
            clock[0] += 0.8 * lease  # most of the lease is gone
            while expiry(token) <= first_expiry:  # until the holder renews it
                assert time.monotonic() - held < lease, "the lease was not renewed in time"
                await asyncio.sleep(0.01)
            clock[0] = first_expiry + 0.2 * lease  # past where the first lease ran out
            return sem.try_acquire("intruder")

    assert asyncio.run(go()) is False
    assert sem.in_use() == 0


def test_a_cancelled_waiter_leaks_no_slot(redis_client: redis.Redis) -> None:
    sem = RedisSemaphore(redis_client, "cancel", 1, poll_interval=0.01)

    async def go() -> None:
        token = await sem.acquire()
        waiter = asyncio.create_task(sem.acquire())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await sem.arelease(token)
        assert sem.in_use() == 0
        with pytest.raises(SemaphoreTimeout) as caught:
            async with sem.slot(), sem.slot(wait_timeout=0.05):
                pass
        assert isinstance(caught.value, TransientError)

    asyncio.run(go())
    assert sem.in_use() == 0
