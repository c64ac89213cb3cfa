"""Who a message is from: the one place that decides an agent's From, Reply-To, the domain of
the envelope sender and of the Message-ID, and the DKIM key that signs it (DMARC alignment).

- An agent whose address is on a domain of ``SENDER_DOMAINS`` sends as themself: ``From`` is
  their address, signed with that domain's key; the envelope sender and the Message-ID are on
  that domain too.
- Any other agent (a domain that does not let us sign for it, e.g. a brokerage publishing
  ``p=reject``) sends as the platform, as large senders do for unauthenticated domains:
  ``From`` is the agent's name at the platform's address (``MAIL_FROM``), ``Reply-To`` the
  agent (or the reply-to they asked for); domain and key are the platform's.
- System mail (notices, receipts) is from the platform.

Domains are compared whole and in lower case: a subdomain of a listed domain is another domain.
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.delivery import returnpath
from dispatcher.delivery.signing import DkimSigner, signer
from dispatcher.settings import Settings


@dataclass(frozen=True)
class Identity:
    """What a message says about its sender, and how it is signed."""

    from_address: str
    from_name: str | None
    reply_to: str | None
    #: The domain the envelope sender and the Message-ID are on (aligned with ``From``).
    domain: str
    #: Signs as ``domain``; None when no key is configured for it (the message goes unsigned).
    signer: DkimSigner | None


def _domain_of(address: str | None) -> str:
    return (address or "").rpartition("@")[2].strip().lower()


def envelope_domain(settings: Settings, agent_address: str | None) -> str:
    """The domain of the envelope sender (bounces) and of the Message-ID of mail from the
    agent at ``agent_address`` (None: the platform): theirs when it is a sending domain, else
    the platform's."""
    domain = _domain_of(agent_address)
    if domain and domain in settings.sender_domains:
        return domain
    return settings.message_id_domain.lower()


def envelope_sender(settings: Settings, identity: Identity, send_id: str) -> str:
    """The SMTP envelope sender (``MAIL FROM``) of one send: its signed return path (VERP,
    :mod:`dispatcher.delivery.returnpath`) at the identity's domain, aligned with ``From``."""
    return returnpath.address_for(settings, send_id, identity.domain)


def system_envelope_sender(settings: Settings, identity: Identity) -> str:
    """The envelope sender of our own mail to agents (no send to name): ``MAIL_FROM``'s local
    part at the identity's domain."""
    local = settings.mail_from_address.rpartition("@")[0]
    return f"{local}@{identity.domain}"


def for_agent(
    settings: Settings, agent_address: str, *, from_name: str | None, reply_to: str | None
) -> Identity:
    """The identity of mail an agent sends (SmartPlan steps, campaigns), with the display name
    and reply-to the send or campaign asked for."""
    domain = envelope_domain(settings, agent_address)
    if domain == _domain_of(agent_address):
        return Identity(agent_address, from_name, reply_to, domain, _signer(settings, domain))
    return Identity(
        settings.mail_from_address,
        from_name or _platform_name(settings),
        reply_to or agent_address,
        domain,
        _signer(settings, domain),
    )


def for_platform(settings: Settings) -> Identity:
    """The identity of system mail: ``MAIL_FROM``, signed when its domain has a key."""
    domain = envelope_domain(settings, None)
    return Identity(
        settings.mail_from_address,
        _platform_name(settings),
        None,
        domain,
        _signer(settings, domain),
    )


def _platform_name(settings: Settings) -> str | None:
    return settings.mail_from.partition("<")[0].strip().strip('"') or None


def _signer(settings: Settings, domain: str) -> DkimSigner | None:
    key = settings.dkim_key(domain)
    return None if key is None else signer(domain, *key)
