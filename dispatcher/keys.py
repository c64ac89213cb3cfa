"""Redis keys of the credit counters and campaign DATA marks. The relay halt, rate-limit and
MailChimp semaphore keys are built by their own modules; docs/architecture.md lists every key."""

from __future__ import annotations

PREFIX = "ced"


def grant(user_id: str, period: str, seq: int) -> str:
    """Hash of one grant: total, used, highest threshold notified."""
    # The hash tag keeps all of a user's quota keys in one cluster slot.
    return f"{PREFIX}:quota:{{{user_id}}}:{period}:{seq}"


def reservations(user_id: str, period: str, seq: int) -> str:
    """Hash of idempotency key -> G (granted) | D (denied) | R (refunded)."""
    return f"{PREFIX}:quota:{{{user_id}}}:{period}:{seq}:res"


def rebuild_epoch(user_id: str, period: str, seq: int) -> str:
    """A grant's rebuild epoch: a token set before a rebuild reads the SQL ledger, gone when
    Redis loses its data, so a rebuild whose read predates a later loss is refused."""
    return f"{PREFIX}:quota:{{{user_id}}}:{period}:{seq}:epoch"


def chunk_data(campaign_id: str, chunk: int) -> str:
    """Hash of a campaign chunk's recipients (send id) whose message reached DATA: ``?<attempt>``
    from just before the DATA command, the server's reply once it accepted the message; plus a
    field ``-`` written before any of them was claimed."""
    return f"{PREFIX}:campaign:{{{campaign_id}}}:{chunk}:data"


def epoch() -> str:
    """String set by the beat's sweep once it re-enqueued open work: its absence means Redis
    lost its data (and the broker's task messages with it)."""
    return f"{PREFIX}:epoch"
