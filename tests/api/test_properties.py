"""Property: whatever JSON (or not-JSON) a producer posts to any write endpoint, with whatever
strings in it (lone surrogates, control characters, huge numbers, deep nesting), the answer is
never a 5xx, and every refusal is a Problem ``{code, detail, field}``."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.runtime import Runtime
from tests.api.client import agent_client

HEADERS = {"Authorization": "Bearer test-token-123", "Content-Type": "application/json"}

#: Every character class, surrogates and controls included, plus the usual suspects.
CHARS = st.characters(codec=None, categories=None) | st.sampled_from(
    "\x00\n\r\t\x07\x1b\x7f\x85\u2028\ud83d\ude00\ufeff"
)
TEXT = st.text(CHARS, max_size=40) | st.sampled_from(
    ["", " ", "agent-1", "c-2", "Pat", "pat@example.org", "10k", "cancel", "a" * 129, "x" * 600]
)
NUMBERS = (
    st.integers()
    | st.integers(min_value=10**300, max_value=10**310)
    | st.floats(allow_nan=True, allow_infinity=True)
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

SEND = {
    "user_id": "agent-1",
    "contact": {"id": "c-1", "email": "pat@example.org", "fields": {"first_name": "Pat"}},
    "smartplan": {"plan_id": "p", "run_id": "r", "step_id": "s"},
    "message": {"subject": "Hi {{ first_name }}", "html": "<p>Hello</p>", "text": "Hello"},
    "from_name": "Jo",
    "reply_to": "jo@kw.example.com",
}
CAMPAIGN = {
    "user_id": "agent-1",
    "provider": "command_email",
    "name": "Open house",
    "message": {"subject": "Open house", "html": "<p>Hi {{ first_name }}</p>"},
    "recipients": [{"id": "c-1", "email": "pat@example.org", "fields": {"first_name": "P"}}],
    "idempotency_key": "k-1",
}
USER = {
    "platform_email": "a@kw.example.com",
    "timezone": "UTC",
    "mailchimp": {"api_key": "abc-us6", "list_id": "l1"},
}
SUBSCRIPTION = {"action": "upgrade", "plan": "10k"}
SUPPRESSION = {"email": "x@example.org", "reason": "manual", "detail": "asked"}

#: (method, path template, a valid body): every write endpoint.
ENDPOINTS: list[tuple[str, str, Any]] = [
    ("POST", "/v1/sends", SEND),
    ("POST", "/v1/sends/batch", {"sends": [SEND, {**SEND, "user_id": "nobody"}]}),
    ("POST", "/v1/campaigns", CAMPAIGN),
    ("PUT", "/v1/users/{}", USER),
    ("POST", "/v1/users/{}/subscription", SUBSCRIPTION),
    ("POST", "/v1/users/{}/suppressions", SUPPRESSION),
    ("DELETE", "/v1/users/agent-1/suppressions/{}", None),
    ("POST", "/v1/campaigns/{}/pause", None),
    ("POST", "/v1/campaigns/c-1/{}", None),
    ("POST", "/v1/relay/resume", None),
    ("POST", "/u/{}", None),
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in ``value`` a mutation can put something."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return copy


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A request to a write endpoint: a valid body with one place replaced by anything, a body
    that is anything, or bytes that are not JSON at all; a path segment that is anything."""
    method, template, valid = draw(st.sampled_from(ENDPOINTS))
    segment = draw(st.sampled_from(["agent-1", "c-1"]) | TEXT.filter(bool))
    path = template.format(quote(segment.encode("utf-8", "surrogatepass"), safe=""))
    how = draw(st.sampled_from(["as is", "mutate", "mutate", "mutate", "anything", "bytes"]))
    if how == "bytes":
        return method, path, draw(st.binary(max_size=64))
    if how == "as is":
        body = valid
    elif how == "anything" or valid is None:
        body = draw(JSON)
    else:
        body = _replace(valid, draw(st.sampled_from(_paths(valid))), draw(JSON))
    return method, path, json.dumps(body).encode()


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    return agent_client(runtime, raise_server_exceptions=False, headers={})


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
def test_no_request_to_a_write_endpoint_gets_a_5xx_and_every_refusal_is_a_problem(
    client: TestClient, request: tuple[str, str, bytes]
) -> None:
    method, path, content = request
    r = client.request(method, path, content=content, headers=HEADERS)
    assert r.status_code < 500, (method, path, content[:300], r.text[:500])
    if r.status_code >= 400:
        problem = r.json()
        assert {"code", "detail", "field"} <= set(problem), problem
        assert isinstance(problem["code"], str) and isinstance(problem["detail"], str)
        assert problem["field"] is None or isinstance(problem["field"], str)
