"""The Python producer API: what the HTTP API offers, as calls on one object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dispatcher import sends, users
from dispatcher.campaigns import control, create
from dispatcher.credits import notices, plans, subscriptions
from dispatcher.credits.notices import NotificationView
from dispatcher.credits.subscriptions import ChangeResult, CreditsView
from dispatcher.delivery import timeline
from dispatcher.delivery.timeline import EventView
from dispatcher.models import CampaignStatus
from dispatcher.pages import DEFAULT_LIMIT, Keyset, Page
from dispatcher.ports import TaskQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import Outcome, SendRequest, SendView, SubmitResult
from dispatcher.users import UserView

#: The plan catalog, smallest first.
PLANS = Keyset("plans", descending=False)


class Producer:
    """Submit SmartPlan sends, manage agents and read outcomes without going through HTTP.

    Build it with ``workers.producer.connect()`` to enqueue onto the Celery broker; errors are
    the same as the API's: :class:`~dispatcher.errors.InvalidInput` naming the field,
    :class:`~dispatcher.errors.NotFound`.
    """

    def __init__(self, runtime: Runtime, queue: TaskQueue) -> None:
        self.runtime = runtime
        self.queue = queue
        #: Single sends this process's threads submit at the same moment go together.
        self.singles = sends.Submissions(runtime, queue)

    def submit_send(self, request: SendRequest) -> SubmitResult:
        """Store and enqueue one SmartPlan email; a repeated run+step+contact is not re-sent.
        Sends other threads submit at the same moment are stored and enqueued with it (see
        :class:`dispatcher.sends.Submissions`)."""
        return sends.submit_send(self.runtime, self.queue, request, self.singles)

    def submit_sends(self, requests: Sequence[SendRequest]) -> list[Outcome]:
        """Store and enqueue many SmartPlan emails at once: one answer per request, in order,
        a :class:`SubmitResult` or the error that refused that request alone (see
        :func:`dispatcher.sends.submit_batch`)."""
        return sends.submit_batch(self.runtime, self.queue, requests)

    def get_send(self, send_id: str, user_id: str | None = None) -> SendView:
        return sends.get_send(self.runtime, send_id, user_id)

    def upsert_user(self, user_id: str, **fields: Any) -> tuple[UserView, bool]:
        """Create or update an agent (see :func:`dispatcher.users.upsert_user`)."""
        return users.upsert_user(self.runtime, user_id, **fields)

    def timeline(
        self,
        user_id: str,
        contact_id: str,
        *,
        cursor: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> Page[EventView]:
        """A page of the contact's events for ``user_id``, newest first."""
        with self.runtime.sessions() as session:
            users.get_user(session, user_id)
            return timeline.events(session, user_id, contact_id, cursor=cursor, limit=limit)

    def plans(self, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT) -> Page[plans.Plan]:
        """A page of the plan catalog, smallest first."""
        return PLANS.of(list(plans.catalog(self.runtime.settings).values()), cursor, limit)

    def change_subscription(
        self, user_id: str, action: str, plan: str | None = None
    ) -> ChangeResult:
        """Upgrade, downgrade or cancel (see :func:`dispatcher.subscriptions.change`)."""
        return subscriptions.change(self.runtime, user_id, action, plan)

    def credits(self, user_id: str) -> CreditsView:
        return subscriptions.credits(self.runtime, user_id)

    def notifications(
        self, user_id: str, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> Page[NotificationView]:
        """A page of the user's in-app notifications, newest first."""
        return notices.notifications(self.runtime, user_id, cursor=cursor, limit=limit)

    def create_campaign(self, request: create.CampaignRequest) -> control.CampaignView:
        """Create a campaign (see :func:`dispatcher.campaigns.create`) and enqueue its work."""
        view, chunks = create.create(self.runtime, request)
        if not view.replayed:  # a repeat: the first request handed out the work
            # A compact campaign (answered ``reserving``) is marked enqueued by its first
            # chunk task, which writes its sends and hands out the other chunks: the request
            # writes nothing after handing that task out, or it would wait for that task's
            # transaction to answer.
            compact = view.status == CampaignStatus.RESERVING.value
            control.enqueue(self.runtime, view.id, chunks, self.queue, record=not compact)
        return view
