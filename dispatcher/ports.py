"""Interfaces the core needs from the outside world, implemented elsewhere (e.g. by workers/)."""

from __future__ import annotations

from typing import Protocol


class TaskQueue(Protocol):
    """Hands a stored send to the workers. Called only after the send's row is committed."""

    def enqueue_send(self, send_id: str) -> None: ...


class InlineQueue:
    """Runs nothing: records what would be enqueued (tests drive delivery themselves)."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []

    def enqueue_send(self, send_id: str) -> None:
        self.enqueued.append(send_id)
