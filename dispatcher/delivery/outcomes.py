"""SmartPlan step outcomes on a Redis Stream, read by the SmartPlan engine through a group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from dispatcher.redisclient import RedisClient

#: Entries kept on the stream (approximate trim); consumers ack long before this.
STREAM_MAXLEN = 1_000_000


@dataclass(frozen=True)
class StepOutcome:
    """The terminal outcome of one SmartPlan send, keyed by run, step and contact."""

    send_id: str
    user_id: str
    smartplan_id: str
    run_id: str
    step_id: str
    contact_id: str
    #: sent | failed | unknown (the terminal outcome, once), or bounced | complained (reported
    #: later about a sent email; the terminal outcome stands: see delivery/feedback.py)
    status: str
    reason: str | None = None

    def fields(self) -> dict[str, str]:
        data = {
            "send_id": self.send_id,
            "user_id": self.user_id,
            "smartplan_id": self.smartplan_id,
            "run_id": self.run_id,
            "step_id": self.step_id,
            "contact_id": self.contact_id,
            "status": self.status,
        }
        if self.reason:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> StepOutcome:
        return cls(
            send_id=fields["send_id"],
            user_id=fields["user_id"],
            smartplan_id=fields["smartplan_id"],
            run_id=fields["run_id"],
            step_id=fields["step_id"],
            contact_id=fields["contact_id"],
            status=fields["status"],
            reason=fields.get("reason"),
        )


class OutcomeStream:
    """Publisher and consumer helpers for the step-outcome stream.

    Delivery is at least once: a publisher that crashed between writing the outcome and marking
    it published writes it again, so consumers dedupe on ``send_id``.
    """

    def __init__(self, redis: RedisClient, stream: str) -> None:
        self._redis = redis
        self.stream = stream

    def publish(self, outcome: StepOutcome) -> str:
        entry_id = self._redis.xadd(
            self.stream,
            cast("dict[Any, Any]", outcome.fields()),
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def publish_many(self, outcomes: Sequence[StepOutcome]) -> None:
        """:meth:`publish` for many, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for outcome in outcomes:
            pipe.xadd(
                self.stream,
                cast("dict[Any, Any]", outcome.fields()),
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
        pipe.execute()

    def ensure_group(self, group: str) -> None:
        """Create the consumer group (reading from the start) if it does not exist."""
        try:
            self._redis.xgroup_create(self.stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(
        self, group: str, consumer: str, count: int = 100, block_ms: int | None = None
    ) -> list[tuple[str, StepOutcome]]:
        """New entries for ``consumer`` in ``group``; ack each with :meth:`ack` once handled."""
        self.ensure_group(group)
        reply: Any = self._redis.xreadgroup(
            group, consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        out: list[tuple[str, StepOutcome]] = []
        for _stream, entries in reply or []:
            for entry_id, raw in entries:
                fields = {_s(k): _s(v) for k, v in raw.items()}
                out.append((_s(entry_id), StepOutcome.from_fields(fields)))
        return out

    def ack(self, group: str, *entry_ids: str) -> int:
        return int(self._redis.xack(self.stream, group, *entry_ids))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
