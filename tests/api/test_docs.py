"""/docs and /redoc work offline: their pages load Swagger UI and ReDoc from this server."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from dispatcher.api.app import create_api
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_reference_only_assets_this_server_answers(
    runtime: Runtime, page: str
) -> None:
    client = TestClient(create_api(runtime, InlineQueue()))
    r = client.get(page)
    assert r.status_code == 200
    urls = set(re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", r.text))
    assert urls, r.text
    assert not [u for u in urls if "//" in u], urls  # no CDN, no other host
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert "/openapi.json" in urls
