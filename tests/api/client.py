"""A test client that sends ``json=`` as Python's ``json.dumps`` writes it: lone surrogates as
``\\ud83d`` escapes and non-finite numbers as ``Infinity``, as some producers do."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient


class RawJsonClient(TestClient):
    def request(self, method: str, url: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("json") is not None:
            kwargs["content"] = json.dumps(kwargs.pop("json"))
            kwargs["headers"] = {
                "Content-Type": "application/json",
                **(kwargs.get("headers") or {}),
            }
        return super().request(method, url, **kwargs)
