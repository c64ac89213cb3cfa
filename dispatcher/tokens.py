"""Who a bearer token is: the named API clients (``API_CLIENTS``), the producer tokens
(``API_TOKENS``) and the operators' (``OPS_TOKENS``), as one list of clients with scopes. The
HTTP API's auth and the operators' page login both ask here."""

from __future__ import annotations

import hmac

from dispatcher.settings import PRODUCER_SCOPES, ApiClient, Settings


def clients(settings: Settings) -> tuple[ApiClient, ...]:
    """Every API client: ``API_CLIENTS``, then ``API_TOKENS`` (api-1, api-2, ...: every scope
    but ops) and ``OPS_TOKENS`` (ops-1, ...: ops only)."""
    producers = tuple(
        ApiClient(f"api-{n}", token, frozenset(PRODUCER_SCOPES))
        for n, token in enumerate(settings.api_tokens, 1)
    )
    operators = tuple(
        ApiClient(f"ops-{n}", token, frozenset({"ops"}))
        for n, token in enumerate(settings.ops_tokens, 1)
    )
    return settings.api_clients + producers + operators


def client_for(token: str, settings: Settings) -> ApiClient | None:
    """The client whose token ``token`` is (an empty token never matches)."""
    given = token.encode()
    found = None
    # Compare against every token so timing says nothing about which one nearly matched.
    for client in clients(settings):
        if hmac.compare_digest(given, client.token.encode()) and given:
            found = client
    return found


def operators_configured(settings: Settings) -> bool:
    """Whether any token holds the ``ops`` scope (else operators use the CLI only)."""
    return bool(settings.ops_tokens) or any("ops" in c.scopes for c in settings.api_clients)
