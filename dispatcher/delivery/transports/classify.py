"""What an SMTP reply means for a message, decided in one place by reply code and enhanced
status code (RFC 3463)."""

from __future__ import annotations

import re

from dispatcher.errors import DeliveryDeferred, DeliveryRejected
from dispatcher.reasons import Reason

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")

#: Reasons recorded on the send and the timeline.
DEFERRED = Reason.SMTP_DEFERRED  # 4xx: try again later, credit kept
HARD_BOUNCE = Reason.HARD_BOUNCE  # the address does not exist: permanent, credit returned
POLICY = Reason.POLICY_REJECTED  # refused for content or reputation: permanent for this message
REJECTED = Reason.SMTP_REJECTED  # any other permanent refusal


def enhanced_code(message: str) -> tuple[int, int, int] | None:
    """The enhanced status code at the start of a reply's text, e.g. (5, 1, 1)."""
    match = _ENHANCED.match(message)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


#: X.1.Y details that are about the recipient's address (RFC 3463): bad mailbox (1), bad
#: system (2), bad syntax (3), moved (6), no such domain (10), other (0). 5.1.7 and 5.1.8 are
#: about the sender and never suppress a recipient.
ADDRESS_DETAILS = frozenset({0, 1, 2, 3, 6, 10})


def classify(code: int, message: str, stage: str) -> DeliveryDeferred | DeliveryRejected:
    """The delivery error for a refusal ``code``/``message`` met at ``stage`` ("mail", "rcpt"
    or "data").

    4xx (421 included), or an enhanced code of class 4 even under a 5xx, is deferred. 5.7.x is
    a policy refusal, as is a bare 554. A hard bounce (the address does not exist, so it is
    suppressed) must be about the recipient: an enhanced 5.1.x address code, or a bare 550-553
    in answer to RCPT. A refusal of MAIL FROM is about our sender, and a bare 550-553 after
    DATA is about the message: both are plain permanent refusals.
    """
    detail = f"{code} {message} (at {stage})"
    enhanced = enhanced_code(message)
    if 400 <= code < 500 or (enhanced is not None and enhanced[0] == 4):
        return DeliveryDeferred(DEFERRED, detail, code)
    if enhanced is not None and enhanced[1] == 7:
        return DeliveryRejected(POLICY, detail, code)
    if stage == "mail":
        return DeliveryRejected(REJECTED, detail, code)
    if enhanced is not None and enhanced[1] == 1:
        reason = HARD_BOUNCE if enhanced[2] in ADDRESS_DETAILS else REJECTED
        return DeliveryRejected(reason, detail, code)
    if code == 554:
        return DeliveryRejected(POLICY, detail, code)
    if enhanced is None and 550 <= code <= 553 and stage == "rcpt":
        return DeliveryRejected(HARD_BOUNCE, detail, code)
    return DeliveryRejected(REJECTED, detail, code)
