"""SQLite's one writer, shared by processes: a process that waits for it goes next, instead of
polling SQLite's busy wait while another process writes transactions back to back."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from dispatcher.db import FileWriterLock, make_engine, make_read_sessionmaker, writers_waiting

#: Transactions the busy process writes back to back, each holding the database this long.
ROUNDS = 30
HOLD = 0.03


def _busy(url: str, holding: Any) -> None:
    engine = make_engine(url)
    for i in range(ROUNDS):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO log (who) VALUES (:who)"), {"who": f"a{i}"})
            holding.set()
            time.sleep(HOLD)
    engine.dispose()


def _one(url: str, holding: Any) -> None:
    engine = make_engine(url)
    holding.wait(30)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO log (who) VALUES ('b')"))
    engine.dispose()


def _wait_until_free(other: int, problem: str) -> None:
    """Wait (up to 10 s) until the open file ``other`` can take the lock, then let it go."""
    deadline = time.monotonic() + 10
    while True:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, problem
            time.sleep(0.01)
    fcntl.flock(other, fcntl.LOCK_UN)


def test_a_process_waiting_to_write_goes_after_the_transaction_under_way(tmp_path: Path) -> None:
    """One process writes 30 transactions back to back (a compact campaign's sends being
    written); another asks to write once, while the first transaction is under way. It gets
    in after at most a few of them, not after all 30 (as it mostly did with SQLite's busy
    wait alone, which looks again only after 1, 2, 5 ... 100 ms and finds the next
    transaction under way)."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, who TEXT)"))
    ctx = mp.get_context("fork")
    for _ in range(3):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM log"))
        holding = ctx.Event()
        busy = ctx.Process(target=_busy, args=(url, holding))
        one = ctx.Process(target=_one, args=(url, holding))
        busy.start()
        one.start()
        for p in (busy, one):
            p.join(60)
            assert p.exitcode == 0
        with engine.connect() as conn:
            order = [row.who for row in conn.execute(text("SELECT who FROM log ORDER BY id"))]
        assert len(order) == ROUNDS + 1
        assert order.index("b") <= 3, order
    engine.dispose()


def test_a_wait_given_up_lets_go_of_the_lock_when_it_comes(tmp_path: Path) -> None:
    """Another process holds the file's lock past the timeout: the transaction goes on
    without it (False), and the helper that went on waiting lets go of the lock the moment
    it gets it, so the next asker is not shut out by a lock nobody uses."""
    path = str(tmp_path / "db.sqlite-writer")
    other = os.open(path, os.O_RDWR | os.O_CREAT)  # another open file: as another process
    fcntl.flock(other, fcntl.LOCK_EX)
    lock = FileWriterLock(path)
    assert lock.acquire(0.2) is False
    fcntl.flock(other, fcntl.LOCK_UN)
    # The helper gets the lock now and lets it go; the other open file can take it again.
    _wait_until_free(other, "the lock given up on was kept")
    assert lock.acquire(5) is True
    with open(path, "rb") as probe:  # held: another open file is refused
        try:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the lock was not held")
        except BlockingIOError:
            pass
    lock.release()
    os.close(other)
    lock.close()


def test_a_holder_sees_whether_anyone_waits_for_the_lock(tmp_path: Path) -> None:
    """A process writing many transactions in a row asks whether others wait (to let them go
    first): yes while another one waits for the lock, no before and after."""
    path = str(tmp_path / "db.sqlite-writer")
    holder, other = FileWriterLock(path), FileWriterLock(path)  # two open files: two processes
    assert holder.acquire(1) is True
    assert holder.others_waiting() is False
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(other.acquire(30)))
    waiter.start()
    deadline = time.monotonic() + 10
    while not holder.others_waiting():
        assert time.monotonic() < deadline, "the waiting process was not seen"
        time.sleep(0.01)
    holder.release()
    waiter.join(10)
    assert got == [True]
    assert holder.others_waiting() is False  # it holds the lock now; nobody waits
    other.release()
    holder.close()
    other.close()


def test_writers_waiting_on_a_sqlite_engine_sees_another_process_wait(tmp_path: Path) -> None:
    """What a compact campaign's writer asks between two transactions, on the engine it
    writes with: nobody waits, then the busy process's transactions wait while this one
    holds the database."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, who TEXT)"))
    assert writers_waiting(engine) is False
    ctx = mp.get_context("fork")
    holding = ctx.Event()
    # Forked before this process opens a transaction: a child forked during one would find
    # SQLite's record of this process's locks copied, and never get in.
    one = ctx.Process(target=_one, args=(url, holding))
    one.start()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO log (who) VALUES ('first')"))
        holding.set()
        deadline = time.monotonic() + 10
        while not writers_waiting(engine):
            assert time.monotonic() < deadline, "the waiting process was not seen"
            time.sleep(0.01)
    one.join(30)
    assert one.exitcode == 0
    assert writers_waiting(engine) is False
    assert writers_waiting(make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")) is False
    engine.dispose()


def test_a_disposed_engine_closes_its_lock_files_and_opens_them_again_when_used(
    tmp_path: Path,
) -> None:
    """A test suite or a process making many engines does not keep three open files and a
    thread for each: disposing of the engine closes them; using it again reopens them."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    lock_files = (f"{tmp_path / 'db.sqlite'}-writer", f"{tmp_path / 'db.sqlite'}-writer-waiting")

    def open_lock_files() -> int:
        fds = Path("/proc/self/fd")
        targets = [os.path.realpath(fds / fd) for fd in os.listdir(fds)]
        return sum(1 for t in targets if t in lock_files)

    def helpers() -> int:  # this engine's (each thread is named after its lock file)
        return sum(1 for t in threading.enumerate() if t.name == f"sqlite-writer {lock_files[0]}")

    before = helpers()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE log (who TEXT)"))
    assert open_lock_files() == 3
    assert helpers() == before + 1
    engine.dispose()
    # The helper closes the lock's own file as it stops (a wait given up may still be on it).
    deadline = time.monotonic() + 10
    while helpers() > before:
        assert time.monotonic() < deadline, "the helper thread did not stop"
        time.sleep(0.01)
    assert open_lock_files() == 0
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO log (who) VALUES ('again')"))
    assert open_lock_files() == 3
    engine.dispose()


class _TimeLimit(Exception):
    """What a task's time limit raises in the middle of whatever it was doing."""


def test_a_wait_interrupted_by_a_time_limit_does_not_keep_the_lock(tmp_path: Path) -> None:
    """A task's time limit interrupts a transaction waiting for another process's lock: when
    that process lets go, the lock is not kept by the interrupted wait's helper, with nobody
    to let it go (every other process would wait 30 s per transaction)."""
    path = str(tmp_path / "db.sqlite-writer")
    other = os.open(path, os.O_RDWR | os.O_CREAT)  # another open file: as another process
    fcntl.flock(other, fcntl.LOCK_EX)
    lock = FileWriterLock(path)

    def time_limit(_signum: int, _frame: Any) -> None:
        raise _TimeLimit

    previous = signal.signal(signal.SIGALRM, time_limit)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        try:
            lock.acquire(10)
            raise AssertionError("the wait was not interrupted")
        except _TimeLimit:
            pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    fcntl.flock(other, fcntl.LOCK_UN)
    time.sleep(0.2)  # the interrupted wait's helper gets the lock now (it was first in line)
    _wait_until_free(other, "the interrupted wait kept the lock")
    os.close(other)
    lock.close()


def test_a_read_session_neither_waits_for_the_writer_nor_can_write(tmp_path: Path) -> None:
    """A session that only reads (``Runtime.reads``) reads the last commit while another
    thread's write transaction is under way, without waiting for it; a write in it fails at
    once, and the connection writes again as usual afterwards."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    reads = make_read_sessionmaker(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, who TEXT)"))
        conn.execute(text("INSERT INTO log (who) VALUES ('committed')"))
    writing, read_done = threading.Event(), threading.Event()
    held_through_read: list[bool] = []

    def write() -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO log (who) VALUES ('under way')"))
            writing.set()
            held_through_read.append(read_done.wait(10))

    writer = threading.Thread(target=write)
    writer.start()
    assert writing.wait(10)
    with reads() as session:
        seen = list(session.execute(text("SELECT who FROM log")).scalars())
    read_done.set()
    writer.join(10)
    assert seen == ["committed"]
    assert held_through_read == [True]  # the write was still under way when the read ended

    with reads() as session, pytest.raises(OperationalError, match="readonly"):
        session.execute(text("INSERT INTO log (who) VALUES ('from a reader')"))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO log (who) VALUES ('after')"))
        whos = list(conn.execute(text("SELECT who FROM log ORDER BY id")).scalars())
    assert whos == ["committed", "under way", "after"]
    engine.dispose()
