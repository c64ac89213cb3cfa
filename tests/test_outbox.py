"""The outbox sweep enqueues work that was stored while the broker was out of reach."""

from __future__ import annotations

from datetime import timedelta

from dispatcher import campaigns, outbox
from dispatcher.clock import FrozenClock
from dispatcher.ports import InlineQueue, OutboxOnly
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from dispatcher.subscriptions import change
from tests.helpers import make_user, send_request


def test_work_stored_without_a_broker_is_enqueued_once_by_the_sweep(
    runtime: Runtime, clock: FrozenClock
) -> None:
    # Given a process that cannot reach the broker (the CLI's queue leaves work to the sweep)
    make_user(runtime, mailchimp_api_key="k-us6", mailchimp_list_id="list1")
    runtime.queue = OutboxOnly()
    change(runtime, "agent-1", "upgrade", "10k")  # a receipt email
    c, _ = campaigns.create(
        runtime,
        campaigns.CampaignRequest(
            user_id="agent-1",
            provider="command_email",
            subject="s",
            html="<p>h</p>",
            recipients=[campaigns.Recipient(f"c{i}", f"p{i}@example.org") for i in range(3)],
        ),
    )
    campaigns.enqueue(runtime, c.id, [0])
    # A MailChimp campaign's recipients wait as queued sends for their campaign's job: the
    # sweep enqueues the campaign, never the recipients as sends of their own.
    mc, _ = campaigns.create(
        runtime,
        campaigns.CampaignRequest(
            user_id="agent-1",
            provider="mailchimp",
            subject="s",
            html="<p>h</p>",
            recipients=[campaigns.Recipient(f"m{i}", f"m{i}@example.org") for i in range(3)],
        ),
    )
    submit_send(runtime, runtime.queue, send_request())
    queue = InlineQueue()
    runtime.queue = queue
    # When the sweep runs too early, nothing moves; after the grace, everything goes once
    assert outbox.sweep(runtime) == (0, 0, 0)
    clock.advance(timedelta(minutes=2))
    assert outbox.sweep(runtime) == (1, 1, 2)
    assert (len(queue.enqueued), len(queue.system_emails), sorted(queue.campaign_chunks)) == (
        1,
        1,
        sorted([(c.id, 0), (mc.id, 0)]),
    )
    assert outbox.sweep(runtime) == (0, 0, 0)
