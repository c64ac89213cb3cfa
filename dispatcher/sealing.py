"""Secrets stored at rest (an agent's MailChimp API key), sealed with keys from the environment.

``SECRET_KEYS`` lists Fernet keys (AES-128-CBC with HMAC-SHA256, from ``cryptography``): the
first seals, every one of them opens, so a key is rotated by putting a new one first, running
``dispatcher secrets rotate`` (which seals every stored secret again with it) and then dropping
the old one. A sealed value is stored as ``fernet:<token>``; a value without the prefix is a
secret stored before sealing existed, opened as it is and sealed at the next rotation.
"""

from __future__ import annotations

import base64
import hashlib
import logging

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger(__name__)

PREFIX = "fernet:"

#: Used when SECRET_KEYS is not set: the local stack and tests only (it is in the source, so it
#: protects nothing); the settings refuse to run a public deployment with it.
DEVELOPMENT_KEY = base64.urlsafe_b64encode(
    hashlib.sha256(b"command-email development secret key").digest()
).decode()


class SecretUnreadable(Exception):
    """A sealed secret none of the configured keys opens (a key was dropped too early)."""


class Sealer:
    """Seals and opens stored secrets with ``keys`` (the first seals, all open)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys or (DEVELOPMENT_KEY,)])

    def seal(self, secret: str) -> str:
        """The stored form of ``secret``."""
        return PREFIX + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        """The secret a stored value holds (a value stored before sealing, as it is)."""
        if not stored.startswith(PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored.removeprefix(PREFIX).encode()).decode()
        except InvalidToken:
            raise SecretUnreadable(
                "a stored secret opens with none of SECRET_KEYS (was its key removed before "
                "`dispatcher secrets rotate` ran?)"
            ) from None

    def reseal(self, stored: str) -> str:
        """``stored`` sealed with the first key (a value stored before sealing, sealed)."""
        return self.seal(self.open(stored))


def sealed_length(characters: int) -> int:
    """The stored length of a sealed secret of ``characters`` ASCII characters (Fernet: a
    version byte, timestamp, IV, AES blocks and HMAC, in url-safe base64)."""
    raw = 1 + 8 + 16 + 16 * (characters // 16 + 1) + 32
    return len(PREFIX) + 4 * -(-raw // 3)


def valid_key(key: str) -> bool:
    """Whether ``key`` is a Fernet key (32 bytes, url-safe base64)."""
    try:
        Fernet(key)
    except (ValueError, TypeError):
        return False
    return True
