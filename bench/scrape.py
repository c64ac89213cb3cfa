"""What one ``GET /metrics`` costs with a million sends stored.

Fills a fresh database with ``--rows`` sends (mostly sent, some queued, sending and failed,
finished over the last days), starts a private redis-server as the broker and quota store, and
times scrapes of the API's ``/metrics`` in process (no HTTP hop: the figure is the handler's).
Prints the median, p95 and worst scrape per database, beside the goal (under 50 ms).

    python -m bench.scrape [--rows 1000000] [--scrapes 50] [--database-url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient

from devstack.localredis import start_redis_server
from dispatcher import db
from dispatcher.settings import Settings
from workers.web import create_app

GOAL_MS = 50.0

#: One statement fills the table on either database: ids and keys from a counter, a status
#: and kind by its remainder. PostgreSQL counts with generate_series, SQLite with a recursive CTE.
_FILL = """
INSERT INTO sends (id, idempotency_key, kind, user_id, contact_id, contact_email, merge_fields,
  subject, html, status, reason, period, grant_seq, message_id, attempts, lease_until,
  outcome_published, refund_due, created_at, updated_at, finished_at)
SELECT printf_id, 'k-' || n, CASE WHEN n % 3 = 0 THEN 'campaign' ELSE 'smartplan' END,
  'agent-1', 'c-' || n, 'c' || n || '@example.org', '{{}}', 'Hi', '<p>Hi</p>',
  CASE WHEN n % 1000 = 1 THEN 'queued' WHEN n % 20000 = 2 THEN 'sending'
       WHEN n % 50 = 3 THEN 'failed' ELSE 'sent' END,
  CASE WHEN n % 50 = 3 THEN 'hard_bounce' END,
  '2026-11', 1, 'm-' || n || '@bench', 1, NULL, {true}, {false}, {created}, {created},
  CASE WHEN n % 1000 = 1 OR n % 20000 = 2 THEN NULL ELSE {created} END
FROM ({series}) AS s
"""
_PG = dict(
    series="SELECT n, 'send-' || n AS printf_id FROM generate_series(1, {rows}) AS n",
    created="now() - (n % 10000) * interval '1 minute'",
    true="true",
    false="false",
)
_SQLITE = dict(
    series=(
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {rows}) "
        "SELECT n, 'send-' || n AS printf_id FROM c"
    ),
    created="datetime('now', '-' || (n % 10000) || ' minutes')",
    true="1",
    false="0",
)


def fill(url: str, rows: int) -> float:
    """Migrate the database at ``url`` and store ``rows`` sends; seconds taken."""
    engine = db.make_engine(url)
    db.upgrade(engine)
    parts = _PG if engine.dialect.name == "postgresql" else _SQLITE
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO users (id, timezone, plan, grant_seq, created_at, updated_at) "
                "VALUES ('agent-1', 'UTC', 'free', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        series = parts["series"].format(rows=rows)
        conn.execute(sa.text(_FILL.format(**{**parts, "series": series})))
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE"))
        conn.commit()
    engine.dispose()
    return time.perf_counter() - started


def time_scrapes(settings: Settings, scrapes: int) -> list[float]:
    """Milliseconds of each of ``scrapes`` scrapes (after three to warm up)."""
    with TestClient(create_app(settings)) as client:
        for _ in range(3):
            assert client.get("/metrics").status_code == 200
        times = []
        for _ in range(scrapes):
            started = time.perf_counter()
            response = client.get("/metrics")
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scrape", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="sends stored (default %(default)s)"
    )
    parser.add_argument(
        "--scrapes", type=int, default=50, help="scrapes timed (default %(default)s)"
    )
    parser.add_argument(
        "--database-url",
        action="append",
        help="a PostgreSQL server's URL (a database of its own is made there and dropped); "
        "repeat for several; SQLite is always measured",
    )
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        print("bench.scrape needs redis-server on PATH", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    redis = start_redis_server(folder, folder / "redis.log", binary)
    results: list[tuple[str, float, list[float]]] = []
    try:
        targets: list[tuple[str, str, tuple[str, str] | None]] = [
            ("sqlite", f"sqlite:///{folder / 'bench.db'}", None)
        ]
        for url in args.database_url or []:
            name = f"bench_scrape_{uuid.uuid4().hex[:8]}"
            targets.append(("postgresql", url.rsplit("/", 1)[0] + "/" + name, (url, name)))
        for label, url, made in targets:
            if made is not None:
                _admin(made[0], f'CREATE DATABASE "{made[1]}"')
            try:
                filled = fill(url, args.rows)
                print(f"{label}: {args.rows:,} sends stored in {filled:.1f}s", flush=True)
                settings = Settings(database_url=url, redis_url=redis.url, log_level="WARNING")
                results.append((label, filled, time_scrapes(settings, args.scrapes)))
            finally:
                if made is not None:
                    _admin(made[0], f'DROP DATABASE IF EXISTS "{made[1]}" WITH (FORCE)')
    finally:
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nGET /metrics with {args.rows:,} sends stored, {args.scrapes} scrapes")
    print("| database | median ms | p95 ms | worst ms | goal |")
    print("| --- | --- | --- | --- | --- |")
    for label, _, times in results:
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        print(
            f"| {label} | {statistics.median(times):.1f} | {p95:.1f} | {ordered[-1]:.1f} "
            f"| < {GOAL_MS:.0f} ms {'met' if p95 < GOAL_MS else 'NOT met'} |"
        )
    return 0


def _admin(url: str, statement: str) -> None:
    engine = db.make_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(statement))
    engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
