"""Database engine, sessions and migrations (SQLite file by default, PostgreSQL in production)."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.errors import SchemaNotReady

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger(__name__)

#: Set on a SQLite connection while its transaction holds the process's writer lock.
_HOLDS_WRITER = "dispatcher_holds_writer"
#: Set on a SQLite connection while its transaction holds the file's writer lock.
_HOLDS_FILE = "dispatcher_holds_file"
#: Set on a SQLite connection while its transaction is a reader's (``PRAGMA query_only`` on).
_QUERY_ONLY = "dispatcher_query_only"
#: The execution option of connections whose transactions only read
#: (:func:`make_read_sessionmaker`).
READ_ONLY = "dispatcher_read_only"


def make_engine(
    url: str,
    *,
    statement_timeout: float = 0.0,
    lock_timeout: float = 0.0,
    sqlite_synchronous: str = "normal",
    pool_size: int | None = None,
    **kwargs: Any,
) -> Engine:
    """Build an engine; SQLite gets WAL and a busy timeout so API and workers can share it.
    On PostgreSQL, ``statement_timeout`` and ``lock_timeout`` (seconds, 0 for none) bound every
    statement and every lock wait of every connection. ``sqlite_synchronous`` is SQLite's
    ``PRAGMA synchronous`` (``normal`` or ``full``, see ``SQLITE_SYNCHRONOUS``). ``pool_size``
    is how many connections the engine keeps open for reuse (None: SQLAlchemy's 5); up to
    10 more are opened when that many are in use at once, and closed once given back."""
    if sqlite_synchronous not in ("normal", "full"):
        raise ValueError(f"sqlite_synchronous must be normal or full, not {sqlite_synchronous!r}")
    if pool_size is not None and url not in ("sqlite://", "sqlite:///:memory:"):
        kwargs["pool_size"] = pool_size
    if url.startswith("sqlite"):
        return _sqlite_engine(url, sqlite_synchronous, **kwargs)
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgresql+psycopg://") and "connect_timeout=" not in url:
        # A server that stopped answering must not hold a worker (or a lease renewal) for
        # the kernel's minutes-long TCP timeout (a connect_timeout in the URL wins).
        kwargs["connect_args"] = {"connect_timeout": 10, **kwargs.get("connect_args", {})}
    if url.startswith("postgresql+psycopg://"):
        options = [
            f"-c {name}={int(seconds * 1000)}"
            for name, seconds in (
                ("statement_timeout", statement_timeout),
                ("lock_timeout", lock_timeout),
            )
            if seconds > 0
        ]
        if options:
            args = kwargs.get("connect_args", {})
            kwargs["connect_args"] = {**args, "options": " ".join(options)}
    return create_engine(url, pool_pre_ping=True, **kwargs)


#: How long a transaction waits for the database's writer lock (this process's, then the
#: file's) before going on without it, to SQLite's own busy wait (the same 30 s).
WRITER_WAIT_SECONDS = 30.0


class FileWriterLock:
    """The writer lock of one SQLite file across processes: an ``flock`` on a file beside it
    (``<database>-writer``), taken before ``BEGIN IMMEDIATE``.

    SQLite's own busy wait polls: a connection that finds the database locked sleeps 1, 2,
    5 ... then 100 ms at a time, and gets in only if the lock happens to be free when it
    looks. A process writing transactions back to back (a compact campaign's sends being
    written) left the API and the SmartPlan worker waiting through all of them. A process
    waiting here instead waits in the kernel and is woken as the holder lets go, so it goes
    next. Each process opens its own file (a forked child too: ``flock`` locks belong to an
    open file, which a fork shares), and one thread of a process at a time asks (the
    engine's thread lock is taken first). The wait runs on a helper thread so that it can
    be given up after a timeout; the helper then lets go of the lock as soon as it gets it.

    A process that waits says so meanwhile with a shared lock on a second file
    (``<database>-writer-waiting``), so that one writing many transactions in a row can ask
    :meth:`others_waiting` and let them go first.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = -1
        self._fd = -1
        self._waiting = -1  # this process's shared lock while it waits
        self._probe = -1  # another open file of it, to ask whether anyone waits
        self._asks: queue.SimpleQueue[_Ask | None] = queue.SimpleQueue()
        self._files = threading.Lock()  # opening and closing them

    def _fileno(self) -> int:
        pid = os.getpid()
        if self._pid == pid:
            return self._fd
        with self._files:
            if self._pid == pid:
                return self._fd
            # First use in this process (or in a forked child, or after close).
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
            self._waiting = os.open(f"{self.path}-waiting", flags, 0o600)
            self._probe = os.open(f"{self.path}-waiting", flags, 0o600)
            self._asks = queue.SimpleQueue()
            threading.Thread(
                target=self._helper,
                args=(self._fd, self._asks),
                name=f"sqlite-writer {self.path}",
                daemon=True,
            ).start()
            self._pid = pid
        return self._fd

    def acquire(self, timeout: float) -> bool:
        """Take the lock; False when another process held it for ``timeout`` seconds."""
        fd = self._fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        fcntl.flock(self._waiting, fcntl.LOCK_SH)
        ask = _Ask(fd)
        try:
            self._asks.put(ask)
            return ask.result(timeout)
        except BaseException:
            # Interrupted while waiting (a task's time limit): a lock that comes later, or
            # came just now, must not stay with nobody to let it go.
            ask.abandon()
            raise
        finally:
            fcntl.flock(self._waiting, fcntl.LOCK_UN)

    def release(self) -> None:
        fcntl.flock(self._fileno(), fcntl.LOCK_UN)

    def others_waiting(self) -> bool:
        """Whether a transaction (of another process, or of this one) waits for the lock."""
        self._fileno()
        try:
            fcntl.flock(self._probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._probe, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        """Close this process's files and stop its helper thread (the engine was disposed or
        is gone); a later transaction opens them again. The helper closes the lock's own file
        once it has no wait left (one given up may still be under way on it)."""
        with self._files:
            if self._pid != os.getpid():
                return
            self._pid = -1
            self._asks.put(None)
            os.close(self._waiting)
            os.close(self._probe)

    @staticmethod
    def _helper(fd: int, asks: queue.SimpleQueue[_Ask | None]) -> None:
        while (ask := asks.get()) is not None:
            ask.wait()
        os.close(fd)


class _Ask:
    """One wait for a :class:`FileWriterLock` on its helper thread. Whichever comes first,
    the lock or the asker giving up, decides under a lock whether the lock is kept."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._guard = threading.Lock()
        self._done = threading.Event()
        self._got = False
        self._given_up = False
        self._error: OSError | None = None

    def wait(self) -> None:
        fd = self._fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the GIL is let go meanwhile
        except OSError as exc:
            self._error = exc
        else:
            with self._guard:
                if self._given_up:
                    fcntl.flock(fd, fcntl.LOCK_UN)  # nobody is waiting for it any more
                else:
                    self._got = True
        self._done.set()

    def result(self, timeout: float) -> bool:
        """Wait for the lock up to ``timeout`` seconds: True when this asker holds it."""
        self._done.wait(timeout)
        if self._error is not None:
            raise self._error
        with self._guard:
            self._given_up = not self._got
            return self._got

    def abandon(self) -> None:
        """The asker will not use the lock: let go of it if it came, or as soon as it comes."""
        with self._guard:
            self._given_up = True
            if self._got:
                self._got = False
                fcntl.flock(self._fd, fcntl.LOCK_UN)


#: Each SQLite engine's file writer lock.
_FILE_LOCKS: weakref.WeakKeyDictionary[Engine, FileWriterLock] = weakref.WeakKeyDictionary()


def writers_waiting(engine: Engine) -> bool:
    """Whether transactions wait for the database's writer lock now: on SQLite, where one
    writer excludes every other, a process writing many transactions in a row lets them go
    first; elsewhere (PostgreSQL) writers do not wait for each other, and this is False."""
    lock = _FILE_LOCKS.get(engine)
    return lock is not None and lock.others_waiting()


def _sqlite_engine(url: str, synchronous: str, **kwargs: Any) -> Engine:
    """A SQLite engine API and workers can share: WAL, a busy timeout, every transaction
    ``BEGIN IMMEDIATE`` behind this process's writer lock and the file's
    (:class:`FileWriterLock`), ``PRAGMA synchronous``."""
    path = url.split("///", 1)[-1]
    files = None
    if path and path != ":memory:" and not path.startswith("file:"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        files = FileWriterLock(f"{path}-writer")
    engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
    if files is not None:
        _FILE_LOCKS[engine] = files
        event.listen(engine, "engine_disposed", lambda _engine: files.close())
        weakref.finalize(engine, files.close)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # The driver's own transaction handling is switched off so that every transaction
        # starts with BEGIN IMMEDIATE (below): a deferred transaction that reads and then
        # writes fails at once with "database is locked" when another process wrote in
        # between, whatever the busy timeout.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    # SQLite has one writer at a time, and a connection that finds the database locked
    # sleeps in steps of up to 100 ms before it looks again: a process's threads (a worker
    # pool's) queue on this lock instead and go the moment the previous one is done, and
    # processes queue on the file's lock the same way (FileWriterLock).
    writer = threading.Lock()

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        if conn.get_execution_options().get(READ_ONLY):
            # A reader: WAL lets it see the last commit without waiting for any writer;
            # query_only makes a write in it fail at once instead of taking the database.
            conn.exec_driver_sql("BEGIN")
            conn.info[_QUERY_ONLY] = True
            conn.connection.dbapi_connection.execute("PRAGMA query_only=1")
            return
        if writer.acquire(timeout=WRITER_WAIT_SECONDS):
            conn.info[_HOLDS_WRITER] = True
        else:
            log.warning(
                "waited %g s for this process's SQLite writer lock; going on without",
                WRITER_WAIT_SECONDS,
            )
        try:
            if files is not None and conn.info.get(_HOLDS_WRITER):
                if files.acquire(WRITER_WAIT_SECONDS):
                    conn.info[_HOLDS_FILE] = True
                else:
                    log.warning(
                        "waited %g s for another process's SQLite writer lock; going on without",
                        WRITER_WAIT_SECONDS,
                    )
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release(conn)
            raise

    def _release(conn: Any) -> None:
        _let_go(conn.info, conn.connection.dbapi_connection)

    def _let_go(info: dict[str, Any], dbapi_conn: Any) -> None:
        if info.pop(_QUERY_ONLY, False):
            dbapi_conn.execute("PRAGMA query_only=0")
        if info.pop(_HOLDS_FILE, False) and files is not None:
            files.release()
        if info.pop(_HOLDS_WRITER, False):
            writer.release()

    event.listen(engine, "commit", _release)
    event.listen(engine, "rollback", _release)

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        # A connection given back without commit or rollback (invalidated) lets go too.
        _let_go(record.info, dbapi_conn)

    return engine


#: SQLite's page cache while one transaction writes many rows (KiB, as ``PRAGMA cache_size``
#: takes a negative number), and otherwise (SQLite's default, 2 MiB). A 100,000-recipient
#: campaign's rows and their indexes outgrow the default, and every insert then reads pages
#: back: in process, accepting one took 3.4 s with the default and 2.3 s with this.
BULK_CACHE_KIB = 65_536
_DEFAULT_CACHE_KIB = 2_000


@contextmanager
def bulk_writes(conn: Connection) -> Iterator[None]:
    """Around many inserts in ``conn``'s transaction: on SQLite, a page cache large enough for
    them, given back afterwards (the connection returns to the pool with the default); on
    PostgreSQL nothing (the server's shared buffers serve every connection)."""
    if conn.dialect.name != "sqlite":
        yield
        return
    conn.exec_driver_sql(f"PRAGMA cache_size=-{BULK_CACHE_KIB}")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size=-{_DEFAULT_CACHE_KIB}")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that only read. On SQLite their transactions start with a plain (deferred)
    ``BEGIN`` and wait for no writer lock: in WAL a reader sees the last commit and neither
    waits for the writer nor holds it up, and ``PRAGMA query_only`` makes a write in one fail
    at once. On PostgreSQL they are ordinary sessions."""
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str:
    """The revision the code's migrations end at."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert head is not None, "the migrations have one head"
    return head


def wait_until_migrated(
    engine: Engine,
    timeout: float,
    *,
    interval: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Return the database's revision once it is the migrations' head, waiting up to
    ``timeout`` seconds (a release process still migrating) and logging once that it waits.

    A revision these migrations do not know (newer code migrated the database) is logged and
    accepted: refusing would stop a rollback of the code. Raises :class:`SchemaNotReady` when
    the database answers at an older revision, or none, once the time is up. A database that
    does not answer until then is logged and given up on (returns None): the process starts
    and meets the outage as it would meet one later (503, retried tasks), rather than exit.
    """
    scripts = ScriptDirectory.from_config(alembic_config(engine))
    head = head_revision(engine)
    known = {script.revision for script in scripts.walk_revisions()}
    deadline = time.monotonic() + timeout
    waiting_since: float | None = None
    while True:
        try:
            current = current_revision(engine)
        except DBAPIError as exc:
            current, unreachable = None, True
            problem = f"not reachable ({type(exc.orig).__name__})"
        else:
            unreachable = False
            problem = f"at revision {current}" if current else "not migrated"
            if current == head:
                if waiting_since is not None:
                    log.info(
                        "database migrated to %s after %.1fs",
                        head,
                        time.monotonic() - waiting_since,
                    )
                return current
            if current is not None and current not in known:
                log.warning(
                    "database at revision %s, which this code's migrations (head %s) do not "
                    "know: newer code migrated it; starting anyway",
                    current,
                    head,
                )
                return current
        if waiting_since is None:
            waiting_since = time.monotonic()
            log.warning(
                "database %s is %s; waiting up to %.0fs for it to reach %s (the release "
                "process, `dispatcher db upgrade`, migrates it)",
                engine.url.render_as_string(hide_password=True),
                problem,
                timeout,
                head,
            )
        if time.monotonic() >= deadline:
            if unreachable:
                log.warning(
                    "database %s still %s after %.0fs; starting without knowing its revision",
                    engine.url.render_as_string(hide_password=True),
                    problem,
                    time.monotonic() - waiting_since,
                )
                return None
            raise SchemaNotReady(current, head, time.monotonic() - waiting_since)
        sleep(interval)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to print and log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
