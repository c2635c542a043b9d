"""Suppressions checked at send time: addresses that bounced before (or unsubscribed or
complained: core.tracking_lists) are not attempted again.

Owns the bounce check (`bounced_sync`; `suppressed_sync` adds the other lists, run inside
core.send's transaction) and the `failed` event a suppressed recipient gets (reason
suppress-bounce / suppress-unsubscribe / suppress-complaint with delivery-status code
605 / 606 / 607, as Mailgun reports a drop and Ghost reads it).  The relay adds rows to store.models.Bounce on permanent failures; the
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


# Drops (Ghost reads these codes): reason -> (delivery-status code, message).
DROP_REASONS = {
    "suppress-bounce": (SUPPRESS_BOUNCE_CODE, "Not delivering to previously bounced address"),
    "suppress-unsubscribe": (606, "Not delivering to unsubscribed address"),
    "suppress-complaint": (607, "Not delivering to a user who marked your messages as spam"),
}


def suppressed_sync(domain: str, recipients: list[str], tags: list[str] = ()) -> dict[str, str]:
    """{lower-cased address: drop reason} for the recipients a do-not-send list holds: bounces
    (unless allowlisted), unsubscribes (from all mail, or from one of the message's tags) and
    complaints (core.tracking_lists owns the last three)."""
    out = {a: "suppress-bounce" for a in bounced_sync(domain, recipients)}
    from . import tracking_lists
    return tracking_lists.apply_sync(domain, recipients, list(tags), out)


def failed_event(message: Message, recipient: str, now: float, reason: str = "suppress-bounce") -> dict:
    code, text = DROP_REASONS.get(reason, DROP_REASONS["suppress-bounce"])
    return events.build(
        "failed", message, recipient, timestamp=now, severity="permanent", reason=reason,
        delivery_status={"code": code, "message": text, "description": text,
                         "attempt-no": 1, "enhanced-code": "", "retry-seconds": 0,
                         "mx-host": "", "tls": False, "certificate-verified": False},
    )
