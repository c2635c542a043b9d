"""The do-not-send lists beyond bounces: unsubscribes, complaints and the allowlist.

Owns `apply_sync` (called by core.suppressions.suppressed_sync inside the send transaction:
an allowlisted address or domain is never bounce-suppressed; an address unsubscribed from all
of the domain's mail (`*`) or from one of the message's tags is dropped with
suppress-unsubscribe; one that complained with suppress-complaint), and the writers the
tracking endpoints (core.tracking) and feedback reports (core.feedback) use to add entries.
Also the suppressions API's reads and writes for all four lists (bounces too): entry
validation from JSON, forms and CSV, address-ordered paging, get, delete; the API view
(api/views/suppressions.py) is a thin adapter over them.
"""
from __future__ import annotations

import csv
import io
import re

from ..errors import InputError, NotFound
from ..store.models import Bounce, Domain
from ..store.tracking_models import Complaint, Unsubscribe, Whitelist
from .timefmt import parse_time, rfc2822


def _chunks(values: list, n: int = 500):
    for i in range(0, len(values), n):
        yield values[i:i + n]


def apply_sync(domain: str, recipients: list[str], tags: list[str], out: dict[str, str]) -> dict[str, str]:
    wanted = list({r.lower() for r in recipients})
    if not wanted:
        return out
    if out:
        bounced = list(out)
        allowed = set()
        domains = list({a.rsplit("@", 1)[-1] for a in bounced})
        for chunk in _chunks(bounced + domains):
            q = Whitelist.select(Whitelist.value).where((Whitelist.domain == domain) & Whitelist.value.in_(chunk))
            allowed.update(v.lower() for (v,) in q.tuples())
        for a in bounced:
            if a in allowed or a.rsplit("@", 1)[-1] in allowed:
                del out[a]
    tagset = {t.lower() for t in tags}
    for chunk in _chunks(wanted):
        for addr, utags in (Unsubscribe.select(Unsubscribe.address, Unsubscribe.tags)
                            .where((Unsubscribe.domain == domain) & Unsubscribe.address.in_(chunk)).tuples()):
            if addr in out:
                continue
            utags = [str(t).lower() for t in (utags if isinstance(utags, list) else [])]
            if "*" in utags or tagset.intersection(utags):
                out[addr] = "suppress-unsubscribe"
        for (addr,) in (Complaint.select(Complaint.address)
                        .where((Complaint.domain == domain) & Complaint.address.in_(chunk)).tuples()):
            out.setdefault(addr, "suppress-complaint")
    return out


def add_unsubscribe_sync(domain: str, address: str, tags: list[str], now: float) -> None:
    """Unsubscribe `address` from `tags` (["*"]: all mail of the domain), merging with what
    is there; an existing `*` stays."""
    address = address.lower()
    row = Unsubscribe.get_or_none((Unsubscribe.domain == domain) & (Unsubscribe.address == address))
    if row is None:
        Unsubscribe.insert(domain=domain, address=address, tags=list(dict.fromkeys(tags or ["*"])),
                           created_at=now).on_conflict_ignore().execute()
        return
    have = list(row.tags or [])
    if "*" in have:
        return
    merged = ["*"] if "*" in tags else list(dict.fromkeys(have + list(tags)))
    Unsubscribe.update(tags=merged, created_at=now).where(Unsubscribe.id == row.id).execute()


def add_complaint_sync(domain: str, address: str, now: float) -> None:
    address = address.lower()
    Complaint.insert(domain=domain, address=address, count=1, created_at=now).on_conflict(
        conflict_target=[Complaint.domain, Complaint.address],
        update={Complaint.count: Complaint.count + 1, Complaint.created_at: now}).execute()


# -- the suppressions API's reads and writes (inside store transactions) ---------------------------

KINDS = ("bounces", "unsubscribes", "complaints", "whitelists")
MAX_BATCH = 1000
_ADDR = re.compile(r"^[^@\s<>,;\"]{1,64}@[A-Za-z0-9.\-\[\]:]{1,253}$")
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-.]{0,251}[A-Za-z0-9])?$")
NOT_FOUND = {"bounces": "Address not found in bounces table",
             "unsubscribes": "Address not found in unsubscribers table",
             "complaints": "No spam complaints found for this address",
             "whitelists": "Address/Domain not found in allowlist"}


def _model(kind: str):
    return {"bounces": Bounce, "unsubscribes": Unsubscribe, "complaints": Complaint,
            "whitelists": Whitelist}[kind]


def _key(kind: str):
    m = _model(kind)
    return m.value if kind == "whitelists" else m.address


def check_domain_sync(domain: str) -> None:
    if Domain.get_or_none(Domain.name == domain) is None:
        raise NotFound("Domain not found")


def check_address(address, field: str = "address") -> str:
    text = str(address or "").strip()
    if not text:
        raise InputError(f"'{field}' parameter is missing")
    if not _ADDR.match(text):
        raise InputError(f"'{field}' parameter is not a valid address")
    return text.lower()


def _time(value, now: float) -> float:
    if value in (None, ""):
        return now
    return parse_time(str(value), "created_at")


def present(kind: str, row) -> dict:
    if kind == "bounces":
        return {"address": row.address, "code": str(row.code), "error": row.error,
                "created_at": rfc2822(row.created_at)}
    if kind == "unsubscribes":
        return {"id": str(row.id), "address": row.address, "tags": list(row.tags or ["*"]),
                "created_at": rfc2822(row.created_at)}
    if kind == "complaints":
        return {"address": row.address, "count": row.count, "created_at": rfc2822(row.created_at)}
    return {"type": row.type, "value": row.value, "reason": row.reason, "createdAt": rfc2822(row.created_at)}


def normalize_entry(kind: str, item: dict, now: float) -> dict:
    """One entry to add, from a JSON object, a form or a CSV row."""
    if not isinstance(item, dict):
        raise InputError("Each entry must be an object")
    if kind == "whitelists":
        if item.get("address"):
            return {"type": "address", "value": check_address(item["address"]),
                    "reason": str(item.get("reason") or "")[:1000], "created_at": now}
        value = str(item.get("domain") or "").strip().lower()
        if not value:
            raise InputError("'address' or 'domain' parameter is missing")
        if not _DOMAIN.match(value) or "." not in value:
            raise InputError("'domain' parameter is not a valid domain")
        return {"type": "domain", "value": value, "reason": str(item.get("reason") or "")[:1000],
                "created_at": now}
    out = {"address": check_address(item.get("address")), "created_at": _time(item.get("created_at"), now)}
    if kind == "bounces":
        code = str(item.get("code") or "550").strip()
        if not code.isdigit() or len(code) > 3:
            raise InputError("'code' parameter should be an SMTP code like 550")
        out["code"] = code
        out["error"] = str(item.get("error") or "")[:2000]
    elif kind == "unsubscribes":
        tags = item.get("tags")
        if tags is None:
            tags = item.get("tag")
        if tags in (None, ""):
            tags = ["*"]
        if isinstance(tags, str):
            tags = [t.strip() for t in tags.split(",") if t.strip()] if tags.strip() != "*" else ["*"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InputError("'tags' should be a list of strings")
        out["tags"] = ["*"] if "*" in tags else tags[:100]
    return out


def parse_csv(kind: str, data: bytes, now: float) -> list[dict]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("The CSV file is not valid UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not ({"address", "domain"} & {f.strip().lower() for f in reader.fieldnames}):
        raise InputError("The CSV file needs a header row with an 'address' column")
    rows = []
    for n, row in enumerate(reader):
        if n >= 100_000:
            raise InputError("The CSV file has too many rows")
        clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not clean.get("address") and not clean.get("domain"):
            continue
        rows.append(normalize_entry(kind, clean, now))
    return rows


def add_sync(kind: str, domain: str, entries: list[dict]) -> int:
    check_domain_sync(domain)
    for e in entries:
        if kind == "bounces":
            Bounce.insert(domain=domain, **e).on_conflict(
                conflict_target=[Bounce.domain, Bounce.address],
                update={Bounce.code: e["code"], Bounce.error: e["error"], Bounce.created_at: e["created_at"]}).execute()
        elif kind == "unsubscribes":
            Unsubscribe.insert(domain=domain, **e).on_conflict(
                conflict_target=[Unsubscribe.domain, Unsubscribe.address],
                update={Unsubscribe.tags: e["tags"],
                        Unsubscribe.created_at: e["created_at"]}).execute()
        elif kind == "complaints":
            Complaint.insert(domain=domain, count=1, **e).on_conflict(
                conflict_target=[Complaint.domain, Complaint.address],
                update={Complaint.created_at: e["created_at"]}).execute()
        else:
            Whitelist.insert(domain=domain, **e).on_conflict(
                conflict_target=[Whitelist.domain, Whitelist.value],
                update={Whitelist.reason: e["reason"], Whitelist.type: e["type"]}).execute()
    return len(entries)


def get_sync(kind: str, domain: str, address: str) -> dict:
    check_domain_sync(domain)
    m = _model(kind)
    row = m.get_or_none((m.domain == domain) & (_key(kind) == address.strip().lower()))
    if row is None:
        raise NotFound(NOT_FOUND[kind])
    return present(kind, row)


def delete_sync(kind: str, domain: str, address: str, tag: str | None = None) -> None:
    check_domain_sync(domain)
    m = _model(kind)
    cond = (m.domain == domain) & (_key(kind) == address.strip().lower())
    row = m.get_or_none(cond)
    if row is None:
        raise NotFound(NOT_FOUND[kind])
    if kind == "unsubscribes" and tag:
        rest = [t for t in (row.tags or []) if t != tag]
        if rest:
            Unsubscribe.update(tags=rest).where(Unsubscribe.id == row.id).execute()
            return
    m.delete().where(cond).execute()


def delete_all_sync(kind: str, domain: str) -> int:
    check_domain_sync(domain)
    m = _model(kind)
    return m.delete().where(m.domain == domain).execute()


def page_sync(kind: str, domain: str, page: str, pivot: str, limit: int, term: str = "") -> list[dict]:
    """A page in address order: first, last, next (after pivot), previous (before pivot)."""
    check_domain_sync(domain)
    m = _model(kind)
    key = _key(kind)
    cond = m.domain == domain
    if term:
        cond &= key.startswith(term.lower())
    if page == "next" and pivot:
        cond &= key > pivot.lower()
    elif page in ("previous", "prev") and pivot:
        cond &= key < pivot.lower()
    backwards = page in ("previous", "prev", "last")
    q = m.select().where(cond).order_by(key.desc() if backwards else key.asc()).limit(limit)
    rows = list(q)
    if backwards:
        rows.reverse()
    return [present(kind, r) for r in rows]
