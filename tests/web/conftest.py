"""The pages in a real browser: Debian's Chromium driven by Playwright, against the API served
by uvicorn on a free port. One browser per module; each test gets a fresh browser context
(no cookies) and its own server over its own database and Redis."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import expect, sync_playwright

from dispatcher.api.app import create_api
from dispatcher.ports import InlineQueue, TaskQueue
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.conftest import IN_CI, free_port
from tests.helpers import wait_for

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
TOKEN = "test-token-123"
OPS_TOKEN = "ops-token-4567"

#: A desktop's and a phone's width.
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium, headless, for the whole module; skipped where it is not installed (failed
    when CI=true: CI runs the pages in a browser)."""
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: the page tests need Debian's chromium package"
        if IN_CI:
            pytest.fail(message + "; CI runs them (`apt-get install chromium`)")
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture
def web_port() -> int:
    return free_port()


@pytest.fixture
def settings(settings: Settings, web_port: int) -> Settings:
    """The suite's settings, with the links pointing at this test's server, an operator
    token, and campaigns in small chunks (a pause stops them within a few messages)."""
    return settings.with_overrides(
        public_base_url=f"http://127.0.0.1:{web_port}",
        ops_tokens=(OPS_TOKEN,),
        campaign_chunk_size=10,
    )


@pytest.fixture
def serve(runtime: Runtime, web_port: int) -> Iterator[Callable[..., str]]:
    """Serve the API (and its pages) over ``runtime`` with a queue (default: inline) on the
    test's port; returns the base URL. Stopped at the end of the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(queue: TaskQueue | None = None, broker: Any = None) -> str:
        app = create_api(runtime, queue or InlineQueue(), broker=broker)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=web_port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for(lambda: server.started, timeout=15, what="the API to listen")
        return f"http://127.0.0.1:{web_port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) at a desktop's width."""
    made = browser.new_context(viewport=DESKTOP)
    yield made
    made.close()


def portal_link(base: str, user_id: str = "agent-1") -> str:
    """A portal link made through the API, as a producer makes one."""
    r = httpx.post(
        f"{base}/v1/users/{user_id}/portal-link", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert r.status_code == 200, r.text
    url: str = r.json()["url"]
    assert url.startswith(base + "/portal/enter/")
    return url


def log_in(page: Any, base: str, token: str = OPS_TOKEN) -> None:
    """Log in to the operators' pages with ``token``."""
    page.goto(base + "/ops")
    expect(page.locator("h1")).to_have_text("Operator login")
    page.get_by_label("Operator token (OPS_TOKENS)").fill(token)
    page.get_by_role("button", name="Log in").click()
