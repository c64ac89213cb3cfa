"""What an SMTP reply means for a message, decided in one place by reply code and enhanced
status code (RFC 3463)."""

from __future__ import annotations

import re

from dispatcher.errors import DeliveryDeferred, DeliveryRejected

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")

#: Reasons recorded on the send and the timeline.
DEFERRED = "smtp_deferred"  # 4xx: try again later, credit kept
HARD_BOUNCE = "hard_bounce"  # the address does not exist: permanent, credit returned
POLICY = "policy_rejected"  # refused for content or reputation: permanent for this message
REJECTED = "smtp_rejected"  # any other permanent refusal


def enhanced_code(message: str) -> tuple[int, int, int] | None:
    """The enhanced status code at the start of a reply's text, e.g. (5, 1, 1)."""
    match = _ENHANCED.match(message)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def classify(code: int, message: str, stage: str) -> DeliveryDeferred | DeliveryRejected:
    """The delivery error for a refusal ``code``/``message`` met at ``stage``.

    4xx (421 included) is deferred; 550-553 and 5.1.x are hard bounces; 554 and 5.7.x are
    policy refusals; any other 5xx is a plain permanent refusal. An enhanced code of class 4
    defers even under a 5xx reply.
    """
    detail = f"{code} {message} (at {stage})"
    enhanced = enhanced_code(message)
    if 400 <= code < 500 or (enhanced is not None and enhanced[0] == 4):
        return DeliveryDeferred(DEFERRED, detail, code)
    if enhanced is not None and enhanced[1] == 7:
        return DeliveryRejected(POLICY, detail, code)
    if (enhanced is not None and enhanced[1] == 1) or 550 <= code <= 553:
        return DeliveryRejected(HARD_BOUNCE, detail, code)
    if code == 554:
        return DeliveryRejected(POLICY, detail, code)
    return DeliveryRejected(REJECTED, detail, code)
