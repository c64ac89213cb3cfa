"""GroupCommit with more than one batch under way (``at_once``): never more batches at once than
allowed, every item in exactly one batch with its own result, and a lead handed on by two
batches finishing together never lost (a lost one would leave fewer batches able to run)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from dispatcher.groupcommit import GroupCommit


class _Gate:
    """A batch function that records each batch and holds it until let go."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[list[int]] = []
        self.running = 0
        self.most = 0
        self.go = threading.Event()

    def run(self, items: Sequence[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(items))
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            assert self.go.wait(10), "the test never let the batches go"
            return [n * 10 for n in items]
        finally:
            with self.lock:
                self.running -= 1


def _submit_all(
    group: GroupCommit[int, int], items: Sequence[int]
) -> tuple[dict[int, int], list[threading.Thread]]:
    """Each item submitted from its own thread, in order; the results as they come."""
    results: dict[int, int] = {}

    def one(n: int) -> None:
        results[n] = group.submit(n)

    threads = [threading.Thread(target=one, args=(n,)) for n in items]
    for t in threads:
        t.start()
        time.sleep(0.005)  # in order, each waiting before the next comes
    return results, threads


def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_at_most_at_once_batches_run_and_every_item_gets_its_own_result() -> None:
    gate = _Gate()
    group: GroupCommit[int, int] = GroupCommit(50, gate.run, at_once=2)

    pending, threads = _submit_all(group, range(10))
    # The first two lead a batch each at once; the other eight wait for one to be done.
    _until(lambda: group.waiting == 8, "eight items waiting")
    assert gate.batches == [[0], [1]]
    gate.go.set()
    for t in threads:
        t.join(10)

    assert pending == {n: n * 10 for n in range(10)}
    assert gate.most == 2
    assert sorted(n for b in gate.batches for n in b) == list(range(10))
    assert len(gate.batches) <= 4  # the eight went in at most two more batches


def test_two_batches_finishing_together_with_one_waiter_keep_both_slots() -> None:
    """Both finished batches hand the lead on: the first to the one waiting item, the second
    finds none other and frees its slot. Two items coming afterwards run side by side again.
    Many rounds on one group, so that the second often looks before the waiter has taken its
    batch (a lead handed twice to it would lose a slot for good)."""
    gate = _Gate()
    group: GroupCommit[int, int] = GroupCommit(50, gate.run, at_once=2)
    for round_ in range(30):
        base = round_ * 10
        gate.go.clear()
        first, threads = _submit_all(group, [base, base + 1, base + 2])
        _until(lambda: group.waiting == 1, "the third item waiting behind the two batches")
        gate.go.set()
        for t in threads:
            t.join(10)
        assert first == {n: n * 10 for n in (base, base + 1, base + 2)}

        gate.go.clear()
        second, threads = _submit_all(group, [base + 3, base + 4])
        _until(lambda: gate.running == 2, f"two batches under way again (round {round_})")
        gate.go.set()
        for t in threads:
            t.join(10)
        assert second == {base + 3: (base + 3) * 10, base + 4: (base + 4) * 10}


def test_one_at_once_runs_the_batches_one_after_the_other() -> None:
    gate = _Gate()
    group: GroupCommit[int, int] = GroupCommit(50, gate.run)
    pending, threads = _submit_all(group, range(6))
    _until(lambda: group.waiting == 5, "five items waiting behind the first")
    gate.go.set()
    for t in threads:
        t.join(10)
    assert pending == {n: n * 10 for n in range(6)}
    assert gate.most == 1
    assert gate.batches == [[0], [1, 2, 3, 4, 5]]
