"""SmartPlan step outcomes published from the ledger to the stream the SmartPlan engine reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import update

from dispatcher.delivery.outcomes import StepOutcome
from dispatcher.models import Send, SendKind
from dispatcher.runtime import Runtime


def publish_outcome(rt: Runtime, send_id: str) -> None:
    """Publish a SmartPlan send's terminal outcome once it is recorded (at least once)."""
    with rt.reads() as session:
        send = session.get(Send, send_id)
        if send is None or send.kind is not SendKind.SMARTPLAN or send.outcome_published:
            return
        if not send.status.terminal:
            return
        outcome = step_outcome(send)
    _publish(rt, [outcome])


def publish_settled(rt: Runtime, rows: Sequence[Any]) -> None:
    """Publish the outcomes of SmartPlan sends just settled, from the rows the settling
    returned (terminal, committed, not published yet: nothing to read again)."""
    _publish(rt, [step_outcome(r) for r in rows if r.kind is SendKind.SMARTPLAN])


def step_outcome(send: Any, status: str | None = None, reason: str | None = None) -> StepOutcome:
    """The outcome-stream entry of a SmartPlan send: its own status and reason, or those
    given (a bounce or complaint heard after it was sent)."""
    return StepOutcome(
        send_id=send.id,
        user_id=send.user_id,
        smartplan_id=send.smartplan_id or "",
        run_id=send.run_id or "",
        step_id=send.step_id or "",
        contact_id=send.contact_id,
        status=status or send.status.value,
        reason=reason if status else send.reason,
    )


def _publish(rt: Runtime, outcomes: list[StepOutcome]) -> None:
    """Write the outcomes to the stream, then remember they were (a crash in between writes
    them again: consumers dedupe on ``send_id``)."""
    if not outcomes:
        return
    rt.outcomes.publish_many(outcomes)
    with rt.sessions.begin() as session:
        session.execute(
            update(Send)
            .execution_options(synchronize_session=False)
            .where(Send.id.in_([o.send_id for o in outcomes]))
            .values(outcome_published=True)
        )
