"""Mailing lists: lists and members (CRUD, bulk upsert, CSV), paging, the expansion of a list
address into its subscribed members on the send path, and unsubscribe links.

Owns list and member rules (address syntax, access_level readonly|members|everyone,
reply_preference list|sender, strict mode "Address already exists", at most 1,000 members per
members.json call), Mailgun's paging state in the query string (?page=next&address=<last>),
`expand` (registered with core.send: a list recipient becomes one queue row per subscribed
member with per-member variables and unsubscribe placeholders in Message.recipient_variables;
the body is stored once), and the unsubscribe token (HMAC of the member row with the signing
key) behind %mailing_list_unsubscribe_url% and %unsubscribe_email%.
Called by api/views/lists.py, core.send (expansion) and core.routejobs (inbound to a list).
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
import time
from urllib.parse import quote, urlencode

from ..errors import InputError, NotFound
from ..store.db import run_cached
from ..store.models import Domain
from ..store.route_models import ListMember, MailingList, SigningKey
from . import send, signing
from .compose import parse_addresses
from .options import yes_no
from .timefmt import rfc2822

ACCESS_LEVELS = ("readonly", "members", "everyone")
REPLY_PREFERENCES = ("list", "sender")
MAX_BULK = 1000
LIST_KEY = "%list"  # reserved recipient-variables key (never reachable as %recipient.x%)
UNSUB_LOCAL = re.compile(r"^unsubscribe-(\d{1,18})-([0-9a-f]{20})$")


class AlreadyExists(InputError):
    """Address already exists"""


# -- helpers -----------------------------------------------------------------------------------------
def api_base(ctx) -> str:
    """The API's absolute base URL for links made outside a request (unsubscribe links, stored
    message URLs): api.public_url, else this host's bound API port (this process, or the
    ports.json the supervisor writes), else the configured one."""
    if ctx.config.api.public_url:
        return ctx.config.api.public_url.rstrip("/")
    port = ctx.ports.get("api") or _ports_file_api_port(ctx.config.data_dir / "ports.json")
    return f"http://{ctx.config.server.bind}:{port or ctx.config.api.port}"


_ports_cache: dict = {}


def _ports_file_api_port(path) -> int | None:
    """The api port another process of this host wrote, re-read at most every 5 s (this runs on
    the event loop for every list send)."""
    now = time.monotonic()
    hit = _ports_cache.get(path)
    if hit is None or now - hit[0] > 5.0:
        try:
            port = json.loads(path.read_text()).get("api")
        except (OSError, ValueError, AttributeError):
            port = None
        hit = _ports_cache[path] = (now, port)
    return hit[1]


def normalize_address(value, field: str = "address") -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"'{field}' parameter is missing")
    addrs = parse_addresses([value.strip()], field)
    if len(addrs) != 1:
        raise InputError(f"'{field}' parameter is not a valid address")
    return addrs[0].address.lower()


def _choice(value, field, allowed, default):
    if value is None or value == "":
        return default
    if value not in allowed:
        raise InputError(f"'{field}' parameter should be one of: {', '.join(allowed)}")
    return value


def parse_vars(value) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except (TypeError, ValueError):
        raise InputError("'vars' parameter should be a JSON object") from None
    if not isinstance(out, dict):
        raise InputError("'vars' parameter should be a JSON object")
    if len(json.dumps(out)) > 10_000:
        raise InputError("'vars' parameter is too large (10 KB at most)")
    return out


def _bool(value, field, default):
    return default if value is None or value == "" else yes_no(value, field)


def list_json(ml: MailingList, count: int | None = None) -> dict:
    if count is None:
        count = ListMember.select().where(ListMember.mlist == ml.id).count()
    return {"address": ml.address, "name": ml.name, "description": ml.description,
            "access_level": ml.access_level, "reply_preference": ml.reply_preference,
            "members_count": count, "created_at": rfc2822(ml.created_at)}


def member_json(m: ListMember) -> dict:
    return {"address": m.address, "name": m.name, "vars": m.vars or {}, "subscribed": bool(m.subscribed)}


def _get_list(address: str) -> MailingList:
    try:
        addr = normalize_address(address)
    except InputError:
        raise NotFound("Mailing list not found") from None
    ml = MailingList.get_or_none(MailingList.address == addr)
    if ml is None:
        raise NotFound("Mailing list not found")
    return ml


def _paging(base: str, path: str, limit: int, first: str | None, last: str | None) -> dict:
    def url(**q):
        return f"{base}{path}?{urlencode({**q, 'limit': limit})}"
    return {"first": url(page="first"), "last": url(page="last"),
            "next": url(page="next", address=last or ""),
            "previous": url(page="prev", address=first or "")}


def _page(query, field, page: str, pivot: str, limit: int):
    if page == "next" and pivot:
        rows = list(query.where(field > pivot).order_by(field).limit(limit))
    elif page == "prev" and pivot:
        rows = list(query.where(field < pivot).order_by(field.desc()).limit(limit))[::-1]
    elif page == "last":
        rows = list(query.order_by(field.desc()).limit(limit))[::-1]
    else:
        rows = list(query.order_by(field).limit(limit))
    return rows


# -- lists -------------------------------------------------------------------------------------------
async def create_list(ctx, form: dict) -> dict:
    address = normalize_address(form.get("address"))
    name = (form.get("name") or "")[:255]
    description = form.get("description") or ""
    access = _choice(form.get("access_level"), "access_level", ACCESS_LEVELS, "readonly")
    reply = _choice(form.get("reply_preference"), "reply_preference", REPLY_PREFERENCES, "list")
    domain = address.rsplit("@", 1)[1]
    now = ctx.clock()

    def write():
        if Domain.get_or_none(Domain.name == domain) is None:
            raise InputError(f"Domain {domain} is not one of your domains")
        if MailingList.get_or_none(MailingList.address == address) is not None:
            raise InputError("Mailing list already exists")
        ml = MailingList.create(address=address, domain=domain, name=name, description=description,
                                access_level=access, reply_preference=reply, created_at=now)
        return {"list": list_json(ml, 0), "message": "Mailing list has been created"}
    return await ctx.store.write(write)


async def get_list(ctx, address: str) -> dict:
    return await ctx.store.read(lambda: {"list": list_json(_get_list(address))})


async def update_list(ctx, address: str, form: dict) -> dict:
    def write():
        ml = _get_list(address)
        if form.get("address"):
            new = normalize_address(form.get("address"))
            if new != ml.address:
                if MailingList.get_or_none(MailingList.address == new) is not None:
                    raise InputError("Mailing list already exists")
                if Domain.get_or_none(Domain.name == new.rsplit("@", 1)[1]) is None:
                    raise InputError(f"Domain {new.rsplit('@', 1)[1]} is not one of your domains")
                ml.address, ml.domain = new, new.rsplit("@", 1)[1]
        if form.get("name") is not None:
            ml.name = form["name"][:255]
        if form.get("description") is not None:
            ml.description = form["description"]
        ml.access_level = _choice(form.get("access_level"), "access_level", ACCESS_LEVELS, ml.access_level)
        ml.reply_preference = _choice(form.get("reply_preference"), "reply_preference",
                                      REPLY_PREFERENCES, ml.reply_preference)
        ml.save()
        return {"list": list_json(ml), "message": "Mailing list has been updated"}
    return await ctx.store.write(write)


async def delete_list(ctx, address: str) -> dict:
    def write():
        ml = _get_list(address)
        ListMember.delete().where(ListMember.mlist == ml.id).execute()
        ml.delete_instance()
        return {"address": ml.address, "message": "Mailing list has been removed"}
    return await ctx.store.write(write)


async def list_lists(ctx, limit: int, skip: int, address: str | None) -> dict:
    def read():
        q = MailingList.select()
        if address:
            q = q.where(MailingList.address == address.lower())
        total = q.count()
        rows = list(q.order_by(MailingList.address).offset(skip).limit(limit))
        return {"items": [list_json(r) for r in rows], "total_count": total}
    return await ctx.store.read(read)


async def list_pages(ctx, base: str, limit: int, page: str, pivot: str) -> dict:
    def read():
        rows = _page(MailingList.select(), MailingList.address, page, pivot, limit)
        items = [list_json(r) for r in rows]
        return {"items": items, "paging": _paging(base, "/v3/lists/pages", limit,
                                                  rows[0].address if rows else pivot,
                                                  rows[-1].address if rows else pivot)}
    return await ctx.store.read(read)


# -- members -----------------------------------------------------------------------------------------
def _member_row(raw) -> dict:
    """One member from a form, a JSON object or a plain 'Name <addr>' string."""
    if isinstance(raw, str):
        addrs = parse_addresses([raw], "address")
        if len(addrs) != 1:
            raise InputError(f"'{raw[:80]}' is not a valid address")
        return {"address": addrs[0].address.lower(), "name": addrs[0].display or None, "vars": None,
                "subscribed": None}
    if not isinstance(raw, dict):
        raise InputError("each member should be an address or an object with an 'address'")
    return {"address": normalize_address(raw.get("address")),
            "name": None if raw.get("name") is None else str(raw.get("name"))[:255],
            "vars": None if raw.get("vars") in (None, "") else parse_vars(raw.get("vars")),
            "subscribed": None if raw.get("subscribed") in (None, "") else _bool(raw.get("subscribed"), "subscribed", True)}


def _upsert_sync(ml: MailingList, rows: list[dict], upsert: bool, strict: bool, now: float) -> None:
    addresses = [r["address"] for r in rows]
    existing = {m.address: m for m in ListMember.select().where(
        (ListMember.mlist == ml.id) & (ListMember.address.in_(addresses)))}
    new = []
    for r in rows:
        m = existing.get(r["address"])
        if m is None:
            new.append({"mlist": ml.id, "address": r["address"], "name": r["name"] or "",
                        "vars": r["vars"] or {}, "subscribed": True if r["subscribed"] is None else r["subscribed"],
                        "created_at": now})
            existing[r["address"]] = True  # a repeated address in one call counts once
            continue
        if m is True:
            continue
        if strict:
            raise AlreadyExists("Address already exists")
        if upsert:
            if r["name"] is not None:
                m.name = r["name"]
            if r["vars"] is not None:
                m.vars = r["vars"]
            if r["subscribed"] is not None:
                m.subscribed = r["subscribed"]
            m.save()
    for i in range(0, len(new), 200):
        ListMember.insert_many(new[i:i + 200]).execute()


async def add_member(ctx, address: str, form: dict) -> dict:
    row = _member_row({k: form.get(k) for k in ("address", "name", "vars", "subscribed")})
    upsert = _bool(form.get("upsert"), "upsert", False)

    def write():
        ml = _get_list(address)
        _upsert_sync(ml, [row], upsert, not upsert, ctx.clock())
        m = ListMember.get((ListMember.mlist == ml.id) & (ListMember.address == row["address"]))
        return {"member": member_json(m), "message": "Mailing list member has been created"}
    return await ctx.store.write(write)


def parse_bulk(members, csv_data: bytes | None = None) -> list[dict]:
    if csv_data is not None:
        try:
            text = csv_data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError("The CSV file is not UTF-8") from None
        reader = csv.reader(io.StringIO(text))
        rows = [r for r in reader if r and any(c.strip() for c in r)]
        if rows and rows[0] and rows[0][0].strip().lower() == "address":
            header = [h.strip().lower() for h in rows[0]]
            items = [dict(zip(header, r)) for r in rows[1:]]
        else:
            items = [{"address": r[0], "name": r[1] if len(r) > 1 else None} for r in rows]
    else:
        if members is None or members == "":
            raise InputError("'members' parameter is missing")
        if isinstance(members, str):
            try:
                items = json.loads(members)
            except ValueError:
                raise InputError("'members' parameter should be a JSON array") from None
        else:
            items = members
        if not isinstance(items, list):
            raise InputError("'members' parameter should be a JSON array")
    if len(items) > MAX_BULK:
        raise InputError(f"Too many members: at most {MAX_BULK} per request")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_member_row(item))
        except InputError as exc:
            raise InputError(f"member {i + 1}: {exc.message}") from None
    return out


async def add_members_bulk(ctx, address: str, rows: list[dict], upsert: bool) -> dict:
    def write():
        ml = _get_list(address)
        _upsert_sync(ml, rows, upsert, False, ctx.clock())
        return {"list": list_json(ml), "message": "Mailing list has been updated",
                "task-id": hashlib.sha1(f"{ml.address}{ctx.clock()}".encode()).hexdigest()[:32]}
    return await ctx.store.write(write)


def _member(ml: MailingList, member: str) -> ListMember:
    try:
        addr = normalize_address(member, "member")
    except InputError:
        raise NotFound("Member not found") from None
    m = ListMember.get_or_none((ListMember.mlist == ml.id) & (ListMember.address == addr))
    if m is None:
        raise NotFound("Member not found")
    return m


async def get_member(ctx, address: str, member: str) -> dict:
    return await ctx.store.read(lambda: {"member": member_json(_member(_get_list(address), member))})


async def update_member(ctx, address: str, member: str, form: dict) -> dict:
    def write():
        m = _member(_get_list(address), member)
        if form.get("address"):
            new = normalize_address(form["address"])
            if new != m.address and ListMember.get_or_none((ListMember.mlist == m.mlist_id) & (ListMember.address == new)):
                raise AlreadyExists("Address already exists")
            m.address = new
        if form.get("name") is not None:
            m.name = form["name"][:255]
        if form.get("vars") not in (None, ""):
            m.vars = parse_vars(form["vars"])
        if form.get("subscribed") not in (None, ""):
            m.subscribed = _bool(form["subscribed"], "subscribed", True)
        m.save()
        return {"member": member_json(m), "message": "Mailing list member has been updated"}
    return await ctx.store.write(write)


async def delete_member(ctx, address: str, member: str) -> dict:
    def write():
        m = _member(_get_list(address), member)
        m.delete_instance()
        return {"member": {"address": m.address}, "message": "Mailing list member has been deleted"}
    return await ctx.store.write(write)


def _member_query(ml, subscribed):
    q = ListMember.select().where(ListMember.mlist == ml.id)
    if subscribed is not None:
        q = q.where(ListMember.subscribed == subscribed)
    return q


async def list_members(ctx, address: str, limit: int, skip: int, subscribed: bool | None) -> dict:
    def read():
        q = _member_query(_get_list(address), subscribed)
        rows = list(q.order_by(ListMember.address).offset(skip).limit(limit))
        return {"items": [member_json(m) for m in rows], "total_count": q.count()}
    return await ctx.store.read(read)


async def member_pages(ctx, base: str, address: str, limit: int, page: str, pivot: str,
                       subscribed: bool | None) -> dict:
    def read():
        ml = _get_list(address)
        rows = _page(_member_query(ml, subscribed), ListMember.address, page, pivot, limit)
        path = f"/v3/lists/{quote(ml.address, safe='@')}/members/pages"
        return {"items": [member_json(m) for m in rows],
                "paging": _paging(base, path, limit, rows[0].address if rows else pivot,
                                  rows[-1].address if rows else pivot)}
    return await ctx.store.read(read)


# -- unsubscribe -------------------------------------------------------------------------------------
def _token(key: str, member_id: int, address: str) -> str:
    return hmac.new(key.encode(), f"unsubscribe:{member_id}:{address}".encode(), hashlib.sha256).hexdigest()[:20]


def unsubscribe_sync(member_id: int, token: str) -> str | None:
    """Inside a write: mark the member unsubscribed when the token is right; their address."""
    row = SigningKey.get_or_none(SigningKey.id == signing.KEY_ID)
    m = ListMember.get_or_none(ListMember.id == member_id)
    if row is None or m is None or not hmac.compare_digest(_token(row.key, m.id, m.address), token):
        return None
    if m.subscribed:
        m.subscribed = False
        m.save()
    return m.address


async def unsubscribe(ctx, member_id: str, token: str) -> str:
    if not member_id.isdigit() or len(member_id) > 18:
        raise NotFound("Not found")
    address = await ctx.store.write(unsubscribe_sync, int(member_id), token)
    if address is None:
        raise NotFound("Not found")
    return address


def unsubscribe_address_taken_sync(address: str) -> bool:
    """An unsubscribe-<member id>-<token>@ address whose token is right (checked at RCPT, so
    member ids cannot be probed)."""
    local, _, _ = address.partition("@")
    m = UNSUB_LOCAL.match(local)
    if not m:
        return False
    row = SigningKey.get_or_none(SigningKey.id == signing.KEY_ID)
    member = ListMember.get_or_none(ListMember.id == int(m.group(1)))
    return (row is not None and member is not None
            and hmac.compare_digest(_token(row.key, member.id, member.address), m.group(2)))


def list_address_taken_sync(address: str, domain_row=None) -> bool:
    """RCPT: a list (or one of its unsubscribe addresses) takes mail for `address`."""
    if MailingList.get_or_none(MailingList.address == address.lower()) is not None:
        return True
    return unsubscribe_address_taken_sync(address)


# -- expansion on the send path ----------------------------------------------------------------------
def _expand_sync(recipients: list[str], base_url: str) -> tuple[list[str], dict] | None:
    lowered = [r.lower() for r in recipients]
    lists = {ml.address: ml for ml in MailingList.select().where(MailingList.address.in_(lowered))}
    if not lists:
        return None
    key = signing.get_key_sync()
    out: list[str] = []
    seen: set[str] = set()
    rv: dict = {}
    for r in recipients:
        ml = lists.get(r.lower())
        if ml is None:
            if r.lower() not in seen:
                seen.add(r.lower())
                out.append(r)
            continue
        q = (ListMember.select(ListMember.id, ListMember.address, ListMember.name, ListMember.vars)
             .where((ListMember.mlist == ml.id) & (ListMember.subscribed == True))  # noqa: E712
             .order_by(ListMember.id).tuples())
        for mid, addr, name, vars_text in q.iterator():
            if addr in seen:
                continue
            seen.add(addr)
            out.append(addr)
            tok = _token(key, mid, addr)
            url = f"{base_url}/unsubscribe/list/{mid}/{tok}"
            mail = f"unsubscribe-{mid}-{tok}@{ml.domain}"
            first, _, last = (name or "").partition(" ")
            vars_ = dict(vars_text) if isinstance(vars_text, dict) else {}
            vars_[LIST_KEY] = {
                "values": {"recipient": f"{name} <{addr}>" if name else addr, "recipient_fname": first,
                           "recipient_lname": last, "mailing_list_unsubscribe_url": url,
                           "unsubscribe_email": mail},
                "headers": [["List-Unsubscribe", f"<{url}>, <mailto:{mail}>"],
                            ["List-Unsubscribe-Post", "List-Unsubscribe=One-Click"],
                            ["List-Id", f"<{ml.address.replace('@', '.')}>"]],
            }
            rv[addr] = vars_
    return out, rv


async def expand(ctx, domain: str, recipients: list[str], source: str):
    """core.send's recipient expander: (recipients, recipient variables) when a list is among
    the recipients, else None.  The member rows are read in a write (the signing key may be
    created on first use) as light tuples; 10,000 members are ~10,000 small dicts."""
    lowered = [r.lower() for r in recipients]
    if not await ctx.store.read(lambda: MailingList.select(MailingList.id)
                                .where(MailingList.address.in_(lowered)).exists()):
        return None
    return await ctx.store.write(_expand_sync, list(recipients), api_base(ctx))


def _probe_sync(recipients: list[str]) -> bool:
    """Inside the send's transaction: is any recipient a list?  (Only then is `expand` awaited.)"""
    lowered = list({r.lower() for r in recipients})
    for i in range(0, len(lowered), 500):
        chunk = lowered[i:i + 500]
        if run_cached(("lists.probe", len(chunk)), lambda: MailingList.select(MailingList.id)
                      .where(MailingList.address.in_(chunk)), chunk).fetchone() is not None:
            return True
    return False


expand.probe_sync = _probe_sync
send.register_recipient_expander(expand)
