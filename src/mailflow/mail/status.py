"""Mail room: SMTP enhanced status codes (RFC 3463, RFC 5248) - finding them in a reply, and what they mean.

Outbound reads them in the replies of relays and MX hosts; inbound will read them in
delivery status notifications. Class: 2 success, 4 persistent transient failure, 5
permanent failure. Subject (second number) and detail say what failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")

SUBJECTS: dict[int, str] = {
    0: "other or undefined",
    1: "addressing",
    2: "mailbox",
    3: "mail system",
    4: "network and routing",
    5: "mail delivery protocol",
    6: "message content or media",
    7: "security or policy",
}

# Subject.detail -> meaning, the codes real servers use most (RFC 3463 section 3, RFC 7372).
DETAILS: dict[tuple[int, int], str] = {
    (1, 0): "other address status",
    (1, 1): "bad destination mailbox address",
    (1, 2): "bad destination system address",
    (1, 3): "bad destination mailbox address syntax",
    (1, 6): "destination mailbox has moved",
    (1, 10): "recipient address has null MX",
    (2, 0): "other or undefined mailbox status",
    (2, 1): "mailbox disabled, not accepting messages",
    (2, 2): "mailbox full",
    (2, 3): "message length exceeds administrative limit",
    (3, 0): "other or undefined mail system status",
    (3, 1): "mail system full",
    (3, 2): "system not accepting network messages",
    (3, 4): "message too big for system",
    (4, 0): "other or undefined network or routing status",
    (4, 1): "no answer from host",
    (4, 2): "bad connection",
    (4, 3): "directory server failure",
    (4, 4): "unable to route",
    (4, 7): "delivery time expired",
    (5, 0): "other or undefined protocol status",
    (5, 3): "too many recipients",
    (6, 0): "other or undefined media error",
    (7, 0): "other or undefined security status",
    (7, 1): "delivery not authorized, message refused",
    (7, 23): "SPF validation failed",
    (7, 25): "reverse DNS validation failed",
    (7, 26): "multiple authentication checks failed",
    (7, 27): "sender address has null MX",
}


@dataclass(frozen=True)
class EnhancedStatus:
    klass: int
    subject: int
    detail: int

    def __str__(self) -> str:
        return f"{self.klass}.{self.subject}.{self.detail}"

    @property
    def permanent(self) -> bool:
        return self.klass == 5

    @property
    def meaning(self) -> str:
        return DETAILS.get((self.subject, self.detail)) or SUBJECTS.get(self.subject, "unknown")


def find_enhanced(message: str) -> EnhancedStatus | None:
    """The first enhanced status code in an SMTP reply or diagnostic text, if any."""
    m = _ENHANCED.search(message or "")
    return EnhancedStatus(int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def enhanced_code(message: str) -> str | None:
    """The first enhanced status code as text ('5.1.1'), if any."""
    found = find_enhanced(message)
    return str(found) if found else None
