"""SmartPlan step outcomes published from the ledger to the stream the SmartPlan engine reads."""

from __future__ import annotations

from sqlalchemy import update

from dispatcher.delivery.outcomes import StepOutcome
from dispatcher.models import Send, SendKind
from dispatcher.runtime import Runtime


def publish_outcome(rt: Runtime, send_id: str) -> None:
    """Publish a SmartPlan send's terminal outcome once it is recorded (at least once)."""
    with rt.sessions() as session:
        send = session.get(Send, send_id)
        if send is None or send.kind is not SendKind.SMARTPLAN or send.outcome_published:
            return
        if not send.status.terminal:
            return
        outcome = StepOutcome(
            send_id=send.id,
            user_id=send.user_id,
            smartplan_id=send.smartplan_id or "",
            run_id=send.run_id or "",
            step_id=send.step_id or "",
            contact_id=send.contact_id,
            status=send.status.value,
            reason=send.reason,
        )
    rt.outcomes.publish(outcome)
    with rt.sessions.begin() as session:
        session.execute(update(Send).where(Send.id == send_id).values(outcome_published=True))
