"""Group commit: work that a process's threads hand in at the same moment, done as one batch.

A thread that finds fewer than ``at_once`` batches under way leads one with every item
waiting (up to a limit); threads arriving while that many are under way wait, and the first of
them leads the next batch once one is done. Nothing waits on purpose: a lone item goes at once,
by itself; under load the batches grow as large as the number of threads waiting. Each thread
gets its own item's result, or has the batch's error raised in it.

Used where one batch costs about what one item does (a transaction, a broker publish, a wave
of SMTP conversations): SmartPlan steps delivered by a worker's threads
(:class:`dispatcher.delivery.smartplan_batch.Coalescer`) and single sends accepted by the
API's request threads (:class:`dispatcher.sends.Submissions`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Run ``run`` on the items threads :meth:`submit` at the same moment, ``limit`` at most
    at a time (counted by ``size``: one per item unless given; an item larger than the limit
    goes alone). ``run`` returns one result per item, in order; should it raise, every thread
    of that batch has the error raised. At most ``at_once`` batches run at a time (1: one
    after the other; more lets a batch start while another waits on the database or the
    network, at the cost of smaller batches)."""

    def __init__(
        self,
        limit: int,
        run: Callable[[Sequence[T]], Sequence[R]],
        size: Callable[[T], int] | None = None,
        *,
        at_once: int = 1,
    ) -> None:
        self._limit = max(1, limit)
        self._run = run
        self._size = size or _one
        self._at_once = max(1, at_once)
        self._lock = threading.Lock()
        self._waiting: list[_Ticket[T, R]] = []
        self._running = 0  # batches under way or handed to a waiting thread to lead

    @property
    def waiting(self) -> int:
        """Items handed in and not yet in a batch (the next batches', so far)."""
        with self._lock:
            return len(self._waiting)

    def submit(self, item: T) -> R:
        """``item``'s result, from the batch it went in (led by this thread or another)."""
        ticket: _Ticket[T, R] = _Ticket(item)
        with self._lock:
            self._waiting.append(ticket)
            if self._running < self._at_once:
                self._running += 1
                ticket.leads = True
        if not ticket.leads:
            ticket.ready.wait()  # until its batch is done, or the lead is handed to it
        if ticket.leads:
            self._lead(ticket)
        return ticket.outcome()

    def _take(self, leader: _Ticket[T, R]) -> list[_Ticket[T, R]]:
        """The next batch, taken off the waiting list: ``leader``'s item, then the oldest
        waiting items no other thread leads, as many as fit the limit."""
        batch, total = [leader], self._size(leader.item)
        for ticket in self._waiting:
            if ticket.leads:
                continue  # the leader itself, or one handed a batch of its own
            total += self._size(ticket.item)
            if total > self._limit:
                break
            batch.append(ticket)
        self._waiting = [t for t in self._waiting if t not in batch]
        return batch

    def _lead(self, leader: _Ticket[T, R]) -> None:
        """Run ``leader``'s batch, then hand the lead on to the oldest waiting thread."""
        with self._lock:
            batch = self._take(leader)
        try:
            results = self._run([t.item for t in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except BaseException as exc:
            for t in batch:
                t.finish(error=exc)
            raise
        else:
            for t, result in zip(batch, results, strict=True):
                t.finish(result=result)
        finally:
            with self._lock:
                nxt = next((t for t in self._waiting if not t.leads), None)
                if nxt is not None:
                    nxt.leads = True
                    nxt.ready.set()
                else:
                    self._running -= 1


class _Ticket(Generic[T, R]):
    """One thread's item, and what its batch made of it."""

    def __init__(self, item: T) -> None:
        self.item = item
        self.ready = threading.Event()
        self.leads = False
        self._result: R | None = None
        self._error: BaseException | None = None

    def finish(self, *, result: R | None = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self.ready.set()

    def outcome(self) -> R:
        """The item's result (its batch finished it), or the batch's error raised."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # set by finish() with a result


def _one(_: object) -> int:
    """An item's size when none is given: every item counts one."""
    return 1
