"""Suppressions checked at send time: addresses that bounced before are not attempted again.

Owns the bounce check (`bounced_sync`, run inside a store read by core.send) and the `failed`
event a suppressed recipient gets (reason `suppress-bounce`, delivery-status code 605, as
Mailgun reports a drop).  The relay adds rows to store.models.Bounce on permanent failures; the
suppressions API (tracking issue) manages them.
"""
from __future__ import annotations

from ..store.models import Bounce, Message
from . import events

SUPPRESS_BOUNCE_CODE = 605


def bounced_sync(domain: str, recipients: list[str]) -> set[str]:
    """The lower-cased addresses among `recipients` that the domain's bounce list holds."""
    if not recipients:
        return set()
    wanted = list({r.lower() for r in recipients})
    found: set[str] = set()
    for i in range(0, len(wanted), 500):
        chunk = wanted[i:i + 500]
        query = Bounce.select(Bounce.address).where((Bounce.domain == domain) & (Bounce.address.in_(chunk)))
        found.update(a.lower() for (a,) in query.tuples())
    return found


def failed_event(message: Message, recipient: str, now: float) -> dict:
    return events.build(
        "failed", message, recipient, timestamp=now, severity="permanent", reason="suppress-bounce",
        delivery_status={"code": SUPPRESS_BOUNCE_CODE, "message": "Not delivering to previously bounced address",
                         "description": "Not delivering to previously bounced address",
                         "attempt-no": 1, "enhanced-code": "", "retry-seconds": 0,
                         "mx-host": "", "tls": False, "certificate-verified": False},
    )
