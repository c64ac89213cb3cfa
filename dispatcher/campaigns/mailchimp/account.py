"""An agent's MailChimp API key: its datacenter, its fingerprint, and its connection limit."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from dispatcher.campaigns.limits import RedisSemaphore
from dispatcher.campaigns.mailchimp.errors import MailchimpAuthFailed
from dispatcher.redisclient import RedisClient

#: MailChimp answers 429 beyond this many simultaneous connections per API key.
MAX_CONNECTIONS = 10

_DATACENTER = re.compile(r"^[a-z]+[0-9]+$")


def key_fingerprint(api_key: str) -> str:
    """A stable, non-reversible name for an API key (Redis keys and logs never hold the key)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def datacenter_url(api_key: str) -> str:
    """``https://<dc>.api.mailchimp.com/3.0`` from the key's ``-<dc>`` suffix."""
    _, sep, dc = api_key.rpartition("-")
    if not sep or not _DATACENTER.match(dc):
        raise MailchimpAuthFailed("the API key has no datacenter suffix (like '-us6')")
    return f"https://{dc}.api.mailchimp.com/3.0"


def mailchimp_semaphore(redis: RedisClient, api_key: str, **options: Any) -> RedisSemaphore:
    """The cross-process limit of simultaneous requests for one API key."""
    return RedisSemaphore(
        redis, f"mailchimp:{key_fingerprint(api_key)}", MAX_CONNECTIONS, **options
    )
