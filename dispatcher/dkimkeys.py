"""How ``SENDER_DOMAINS`` and ``DKIM_KEYS`` are read: domain names, and each domain's DKIM
selector and RSA private key, parsed and checked when the settings are built (at start)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dispatcher.errors import ConfigError

#: A domain name as DNS writes it (lower case, ASCII: an IDN domain as xn--...).
DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")
#: A DKIM selector: one or more DNS labels (RFC 6376 section 3.1).
SELECTOR = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*")


def domains_text(value: Any) -> Any:
    """``SENDER_DOMAINS``: ``a.example,b.example``, each a domain name (any case)."""
    if not isinstance(value, str):
        return value
    domains = tuple(dict.fromkeys(d.strip().lower() for d in value.split(",") if d.strip()))
    for domain in domains:
        if not DOMAIN.fullmatch(domain):
            raise ConfigError("SENDER_DOMAINS", f"{domain!r} is not a domain name")
    return domains


@dataclass(frozen=True)
class DkimKey:
    """The DKIM key of one sending domain: the selector its public key is published under
    (``<selector>._domainkey.<domain>``; None: ``DKIMSELECTOR``) and the RSA private key."""

    domain: str
    selector: str | None
    private_key_pem: str = field(repr=False)


def dkim_keys_text(value: Any) -> Any:
    """``DKIM_KEYS`` as JSON: ``{"<domain>": {"selector": "...", "private_key": "<PEM>"}}``,
    or ``"private_key_file": "<path of a PEM file>"`` instead of ``private_key``. Each key is
    read and parsed here, at start: a bad one names the variable and its domain (never the key)."""
    if not isinstance(value, str):
        return value
    try:
        items = json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError("DKIM_KEYS", f"is not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(items, dict):
        raise ConfigError("DKIM_KEYS", "must be a JSON object of domain -> key")
    keys = []
    for raw_domain, item in items.items():
        domain = str(raw_domain).strip().lower()
        if not DOMAIN.fullmatch(domain):
            raise ConfigError("DKIM_KEYS", f"{raw_domain!r} is not a domain name")
        if not isinstance(item, dict) or set(item) - {
            "selector",
            "private_key",
            "private_key_file",
        }:
            raise ConfigError(
                "DKIM_KEYS", f"{domain}: has selector and private_key or private_key_file only"
            )
        selector = item.get("selector")
        if selector is not None and not (
            isinstance(selector, str) and SELECTOR.fullmatch(selector)
        ):
            raise ConfigError("DKIM_KEYS", f"{domain}: selector must be a DNS label")
        keys.append(DkimKey(domain, selector, _private_key(domain, item)))
    return tuple(keys)


def _private_key(domain: str, item: dict[str, Any]) -> str:
    """The PEM text of a ``DKIM_KEYS`` entry, checked to be an RSA key of 1024 bits or more."""
    inline, path = item.get("private_key"), item.get("private_key_file")
    if (inline is None) == (path is None):
        raise ConfigError("DKIM_KEYS", f"{domain}: give private_key or private_key_file (one)")
    if path is not None:
        if not isinstance(path, str):
            raise ConfigError("DKIM_KEYS", f"{domain}: private_key_file must be a path")
        try:
            inline = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                "DKIM_KEYS",
                f"{domain}: private_key_file {path} cannot be read ({exc.__class__.__name__})",
            ) from None
    if not isinstance(inline, str):
        raise ConfigError("DKIM_KEYS", f"{domain}: private_key must be PEM text")
    try:
        key = load_pem_private_key(inline.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ConfigError(
            "DKIM_KEYS", f"{domain}: the private key is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, RSAPrivateKey) or key.key_size < 1024:
        raise ConfigError("DKIM_KEYS", f"{domain}: the private key must be RSA, 1024 bits or more")
    return inline
