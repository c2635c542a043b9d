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
from ..store.tracking_models import Complaint, Unsubscribe, Whitelist
from . import events

SUPPRESS_BOUNCE_CODE = 605
_CHUNK = 300  # addresses per statement (three lists: 903 parameters, under SQLite's old 999)


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
    complaints (core.tracking_lists owns the last three's writers).

    On the send path, inside its transaction: the three lists are read in ONE statement (a
    UNION ALL over their (domain, address) indexes); the allowlist only when a bounce matched."""
    wanted = list({r.lower() for r in recipients})
    if not wanted:
        return {}
    bounced: list[str] = []
    unsub: dict[str, str] = {}
    complained: list[str] = []
    tagset = {str(t).lower() for t in tags}
    db = Bounce._meta.database
    p = db.param
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i:i + _CHUNK]
        marks = ", ".join([p] * len(chunk))
        sql = (f"SELECT 'b', address, NULL FROM {Bounce._meta.table_name} WHERE domain = {p} AND address IN ({marks})"
               f" UNION ALL SELECT 'u', address, tags FROM {Unsubscribe._meta.table_name}"
               f" WHERE domain = {p} AND address IN ({marks})"
               f" UNION ALL SELECT 'c', address, NULL FROM {Complaint._meta.table_name}"
               f" WHERE domain = {p} AND address IN ({marks})")
        for kind, addr, utags in db.execute_sql(sql, [domain, *chunk] * 3).fetchall():
            addr = str(addr).lower()
            if kind == "b":
                bounced.append(addr)
            elif kind == "c":
                complained.append(addr)
            else:
                utags = Unsubscribe.tags.python_value(utags)
                utags = [str(t).lower() for t in (utags if isinstance(utags, list) else [])]
                if "*" in utags or tagset.intersection(utags):
                    unsub[addr] = "suppress-unsubscribe"
    out = {a: "suppress-bounce" for a in bounced}
    if out:
        allowed = set()
        names = list(out) + list({a.rsplit("@", 1)[-1] for a in out})
        for i in range(0, len(names), _CHUNK):
            q = (Whitelist.select(Whitelist.value)
                 .where((Whitelist.domain == domain) & Whitelist.value.in_(names[i:i + _CHUNK])))
            allowed.update(str(v).lower() for (v,) in q.tuples())
        for a in list(out):
            if a in allowed or a.rsplit("@", 1)[-1] in allowed:
                del out[a]
    for a, reason in unsub.items():
        out.setdefault(a, reason)
    for a in complained:
        out.setdefault(a, "suppress-complaint")
    return out


def failed_event(message: Message, recipient: str, now: float, reason: str = "suppress-bounce") -> dict:
    code, text = DROP_REASONS.get(reason, DROP_REASONS["suppress-bounce"])
    return events.build(
        "failed", message, recipient, timestamp=now, severity="permanent", reason=reason,
        delivery_status={"code": code, "message": text, "description": text,
                         "attempt-no": 1, "enhanced-code": "", "retry-seconds": 0,
                         "mx-host": "", "tls": False, "certificate-verified": False},
    )
