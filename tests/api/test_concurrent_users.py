"""The first PUT of an agent, sent 16 times at once across two web processes on PostgreSQL:
exactly one creates the agent, the others update it, and none answers a 5xx."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from dispatcher.settings import Settings
from tests.conftest import free_port
from tests.helpers import settings_environ

WEBS = 2
PUTS = 16


def _start_web(settings: Settings, folder: Path) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "workers.web:create_app"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, **settings_environ(settings)}
    proc = subprocess.Popen(argv, env=env, cwd=folder)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port, proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "web did not start"
            time.sleep(0.1)


@pytest.fixture
def webs(settings: Settings, database_url: str, tmp_path: Path) -> Iterator[list[int]]:
    if not database_url.startswith("postgresql"):
        pytest.skip("concurrent writers across processes are played on PostgreSQL")
    started = [_start_web(settings, tmp_path) for _ in range(WEBS)]
    yield [port for port, _ in started]
    for _, proc in started:
        proc.terminate()
        proc.wait(10)


def test_sixteen_first_puts_across_two_web_processes_create_one_agent(
    webs: list[int], settings: Settings
) -> None:
    token = settings.api_tokens[0]

    def put(n: int) -> int:
        port = webs[n % len(webs)]
        r = httpx.put(
            f"http://127.0.0.1:{port}/v1/users/raced-agent",
            json={"platform_email": "raced@kw.example.com", "timezone": "America/Denver"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        return r.status_code

    with ThreadPoolExecutor(PUTS) as pool:
        answers = Counter(pool.map(put, range(PUTS)))
    assert answers == {201: 1, 200: PUTS - 1}, answers
    credits = httpx.get(
        f"http://127.0.0.1:{webs[0]}/v1/users/raced-agent/credits",
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    assert credits["total"] == settings.free_plan_credits and credits["used"] == 0
