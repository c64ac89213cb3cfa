"""Mail transports: how a built message leaves the dispatcher (SMTP, or in memory for tests)."""

from __future__ import annotations

from dispatcher.delivery.transports.base import Delivery, Transport

__all__ = ["Delivery", "Transport"]
