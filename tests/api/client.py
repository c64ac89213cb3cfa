"""A test client that sends ``json=`` as Python's ``json.dumps`` writes it: lone surrogates as
``\\ud83d`` escapes and non-finite numbers as ``Infinity``, as some producers do."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from dispatcher.api.app import create_api
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime

HEADERS = {"Authorization": "Bearer test-token-123"}


class RawJsonClient(TestClient):
    def request(self, method: str, url: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("json") is not None:
            kwargs["content"] = json.dumps(kwargs.pop("json"))
            kwargs["headers"] = {
                "Content-Type": "application/json",
                **(kwargs.get("headers") or {}),
            }
        return super().request(method, url, **kwargs)


def agent_client(
    runtime: Runtime, cls: type[TestClient] = TestClient, **options: Any
) -> TestClient:
    """A client of the API over ``runtime`` (producer token in every request unless
    ``headers`` says otherwise) once agent ``agent-1`` exists with an address to send from and
    a postal address (campaigns need one)."""
    options.setdefault("headers", HEADERS)
    c = cls(create_api(runtime, InlineQueue()), **options)
    assert c.put(
        "/v1/users/agent-1",
        json={
            "platform_email": "a1@kw.example.com",
            "postal_address": "350 Main St, Austin, TX 78701",
        },
        headers=HEADERS,
    ).is_success
    return c
