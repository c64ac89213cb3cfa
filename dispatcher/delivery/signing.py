"""DKIM signatures (RFC 6376, ``rsa-sha256``, ``relaxed/simple``) over the final bytes of a
message, as the SMTP server will receive them.

dkimpy parses the message, canonicalizes the body and the signed header fields, hashes them
and folds the ``DKIM-Signature`` field, exactly as its own ``DKIM.sign`` does; the one RSA
operation is OpenSSL's (``cryptography``), with the key parsed once per process. Why not
``dkim.sign`` as it is: it parses the PEM key on every call and signs with Python integers,
about 9 ms for an 8 KB message with a 2048-bit key on a shared 2-core machine (a campaign's
worker would be bound by it well below the relay's rate); this takes 0.4 to 1.2 ms there, most
of it the RSA operation.

Headers are canonicalized ``relaxed`` (relays refold them); bodies ``simple``: what we send is
quoted-printable with CRLF line ends, lines under 78 characters and no trailing whitespace, so
``relaxed`` would change nothing that survives transit, and it costs some 0.4 ms a message
(two regular expressions per line) where ``simple`` costs microseconds.
``tests/delivery/test_identity.py`` checks every signature with ``dkim.verify``.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from functools import lru_cache

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, utils
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from dkim.canonicalization import CanonicalizationPolicy

_NAME = b"DKIM-Signature"
_CANON = b"relaxed/simple"
_POLICY = CanonicalizationPolicy.from_c_value(_CANON)

#: The fields signed when present, and ``From`` once more than present (no second ``From``
#: can be added). RFC 8058 asks for ``List-Unsubscribe`` and ``List-Unsubscribe-Post``.
SIGNED = (
    b"from",
    b"reply-to",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)


class DkimSigner:
    """Signs messages as one domain with one selector and key."""

    def __init__(self, domain: str, selector: str, private_key_pem: str) -> None:
        self.domain = domain
        self.selector = selector
        self._key = _private_key(private_key_pem)
        self._fixed = [
            (b"v", b"1"),
            (b"a", b"rsa-sha256"),
            (b"c", _CANON),
            (b"d", domain.encode("ascii")),
            (b"s", selector.encode("ascii")),
        ]

    def signature(self, message: bytes, now: datetime) -> bytes:
        """The ``DKIM-Signature`` field (folded, CRLF-terminated) to put before ``message``."""
        headers, body = dkim.rfc822_parse(message)
        present = {name.lower() for name, _ in headers}
        include = [name for name in SIGNED if name in present]
        include.append(b"from")
        body_hash = base64.b64encode(hashlib.sha256(_POLICY.canonicalize_body(body)).digest())
        fields = [
            *self._fixed,
            (b"t", str(int(now.timestamp())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", body_hash),
            # A placeholder as long as a signature's first line: b= then folds onto a line of
            # its own, so folding again with the signature changes nothing before it.
            (b"b", b"0" * 60),
        ]
        value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_NAME))
        value = dkim.RE_BTAG.sub(b"\\1", value)
        hasher = hashlib.sha256()
        dkim.hash_headers(
            hasher,
            _POLICY,
            _POLICY.canonicalize_headers(headers),
            include,
            (_NAME, b" " + value),
            dict(fields),
        )
        signed = self._key.sign(
            hasher.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
        )
        fields[-1] = (b"b", base64.b64encode(signed))
        value = b"; ".join(b"=".join(f) for f in fields) + b"\r\n"
        folded: bytes = dkim.fold(value, namelen=len(_NAME))
        return _NAME + b": " + folded

    def sign(self, message: bytes, now: datetime) -> bytes:
        """``message`` with its signature first."""
        return self.signature(message, now) + message


@lru_cache(maxsize=64)
def _private_key(pem: str) -> RSAPrivateKey:
    """A PEM key parsed once per process (checked to be RSA by the settings at start)."""
    key = load_pem_private_key(pem.encode("ascii"), password=None)
    assert isinstance(key, RSAPrivateKey)
    return key


@lru_cache(maxsize=64)
def signer(domain: str, selector: str, private_key_pem: str) -> DkimSigner:
    """The signer of one domain, built once per process."""
    return DkimSigner(domain, selector, private_key_pem)
