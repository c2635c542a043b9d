"""Campaigns (legacy API): POST/GET /v3/<domain>/campaigns, GET/PUT/DELETE
/v3/<domain>/campaigns/<id>, GET .../<id>/stats (groupby=daily_hour|domain, limit) and
GET .../<id>/events (event, recipient, limit), in the seed's shapes.  Messages join a campaign with o:campaign or
X-Mailgun-Campaign-Id (up to three, core.options); counts come from core.stats counters under
the campaign's scope, events from the events table."""
from __future__ import annotations

import re
import secrets
import time
from urllib.parse import unquote

from aiohttp import web

from ...core import stats
from ...core.context import Context
from ...core.timefmt import rfc2822
from ...errors import InputError, NotFound
from ...store import db as storedb
from ...store.models import Domain, Event
from ...store.tracking_models import Campaign, StatCounter
from ..forms import query, read_form
from ..middleware import json_response

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
COUNTS = {"submitted_count": "accepted", "delivered_count": "delivered", "opened_count": "opened",
          "clicked_count": "clicked", "unsubscribed_count": "unsubscribed",
          "complained_count": "complained", "bounced_count": "failed.permanent.bounce",
          "dropped_count": "failed.permanent.suppress"}


def _need_domain(domain: str) -> None:
    if Domain.get_or_none(Domain.name == domain) is None:
        raise NotFound("Domain not found")


def _counts(domain: str, cid: str, group_day: bool = False) -> dict:
    rows = (StatCounter.select(StatCounter.hour, StatCounter.key, StatCounter.count)
            .where((StatCounter.domain == domain) & (StatCounter.tag == stats.CAMPAIGN_PREFIX + cid)).tuples())
    out = {k: 0 for k in COUNTS}
    for _, key, n in rows:
        for name, prefix in COUNTS.items():
            if key.startswith(prefix):
                out[name] += int(n)
    return out


def _present(row) -> dict:
    return {"id": row.campaign_id, "name": row.name, "created_at": rfc2822(row.created_at),
            **_counts(row.domain, row.campaign_id)}


def _get(domain: str, cid: str):
    _need_domain(domain)
    row = Campaign.get_or_none((Campaign.domain == domain) & (Campaign.campaign_id == cid))
    if row is None:
        raise NotFound("Campaign not found")
    return row


def _create_sync(domain: str, cid: str, name: str, now: float) -> dict:
    _need_domain(domain)
    if Campaign.select().where(Campaign.domain == domain).count() >= 10_000:
        raise InputError("Too many campaigns")
    try:
        with Campaign._meta.database.atomic():
            row = Campaign.create(domain=domain, campaign_id=cid, name=name, created_at=now)
    except storedb.IntegrityError:
        raise InputError("Campaign already exists") from None
    return _present(row)


def _list_sync(domain: str, skip: int, limit: int) -> dict:
    _need_domain(domain)
    q = Campaign.select().where(Campaign.domain == domain)
    return {"total_count": q.count(),
            "items": [_present(r) for r in q.order_by(Campaign.created_at.desc()).offset(skip).limit(limit)]}


def _update_sync(domain: str, cid: str, name: str | None, new_id: str | None) -> dict:
    row = _get(domain, cid)
    if name is not None:
        row.name = name
    if new_id:
        row.campaign_id = new_id
    try:
        with Campaign._meta.database.atomic():
            row.save()
    except storedb.IntegrityError:
        raise InputError("Campaign already exists") from None
    return _present(row)


def _delete_sync(domain: str, cid: str) -> None:
    _get(domain, cid)
    Campaign.delete().where((Campaign.domain == domain) & (Campaign.campaign_id == cid)).execute()


# The seed's per-group counters ("total"): each event kind, and "bounced" for permanent failures
# that were attempted (not suppression drops).
STAT_KEYS = ("delivered", "opened", "clicked", "unsubscribed", "complained", "bounced")


def _stat_name(counter_key: str) -> str | None:
    """The "total" entry a core.stats counter key adds to."""
    if counter_key.startswith("failed.permanent."):
        return None if counter_key.startswith("failed.permanent.suppress") else "bounced"
    name = counter_key.partition(".")[0]
    return name if name in STAT_KEYS else None


def _in_campaign(data: dict, cid: str) -> bool:
    return any((c.get("id") if isinstance(c, dict) else c) == cid for c in data.get("campaigns") or [])


def _campaign_events(domain: str, cid: str, kinds: tuple, recipient: str = ""):
    """The campaign's events of `kinds`, newest first, walking the (domain, event, timestamp)
    or (domain, recipient, timestamp) index; the campaign itself is matched on the event data."""
    cond = (Event.domain == domain) & Event.event.in_(kinds)
    if recipient:
        cond &= Event.recipient == recipient
    q = Event.select(Event.data).where(cond).order_by(Event.timestamp.desc()).tuples()
    for (data,) in q.iterator():
        if _in_campaign(data, cid):
            yield data


class _Group:
    """One group of the stats: counters plus the sets behind "unique"."""

    def __init__(self):
        self.total = {k: 0 for k in STAT_KEYS}
        self.opened, self.clicked, self.links = set(), set(), set()

    def add_event(self, data: dict) -> None:
        for key in stats.counter_keys(data):
            name = _stat_name(key)
            if name:
                self.total[name] += 1
        self.note_unique(data)

    def note_unique(self, data: dict) -> None:
        if data.get("event") == "opened":
            self.opened.add(data.get("recipient", ""))
        elif data.get("event") == "clicked":
            self.clicked.add(data.get("recipient", ""))
            self.links.add(data.get("url", ""))

    def present(self) -> dict:
        return {"total": self.total,
                "unique": {"opened": {"recipient": len(self.opened)},
                           "clicked": {"recipient": len(self.clicked), "link": len(self.links)}}}


def _stats_sync(domain: str, cid: str, groupby: str, limit: int) -> object:
    """Without groupby: the campaign's totals (counters) and unique opens/clicks (events).
    groupby=daily_hour: the same per hour of the day (0-23, UTC); groupby=domain: per recipient
    domain (from the events).  `limit` groups, the busiest first for domain."""
    _get(domain, cid)
    if groupby not in ("", "daily_hour", "domain"):
        raise InputError("'groupby' should be one of: daily_hour, domain")
    if groupby == "domain":
        groups: dict = {}
        for data in _campaign_events(domain, cid, ("delivered", "failed") + STAT_KEYS[1:5]):
            rcpt = str(data.get("recipient", ""))
            groups.setdefault(rcpt.rpartition("@")[2], _Group()).add_event(data)
        ranked = sorted(groups.items(), key=lambda kv: (-sum(kv[1].total.values()), kv[0]))[:limit]
        return [{"domain": d, **g.present()} for d, g in ranked]
    rows = (StatCounter.select(StatCounter.hour, StatCounter.key, StatCounter.count)
            .where((StatCounter.domain == domain) & (StatCounter.tag == stats.CAMPAIGN_PREFIX + cid)).tuples())
    by_hour: dict[int, _Group] = {}

    def group(ts: float) -> _Group:
        return by_hour.setdefault(time.gmtime(ts).tm_hour if groupby else 0, _Group())
    for hour, key, n in rows:
        g, name = group(hour), _stat_name(key)  # an hour with sends alone still shows, all zero
        if name:
            g.total[name] += int(n)
    for data in _campaign_events(domain, cid, ("opened", "clicked")):
        group(data["timestamp"]).note_unique(data)
    if not groupby:
        return by_hour.get(0, _Group()).present()
    return [{"daily_hour": h, **g.present()} for h, g in sorted(by_hour.items())][:limit]


def _events_sync(domain: str, cid: str, event: str, recipient: str, limit: int) -> list[dict]:
    """The seed's campaign history items: timestamp, user_vars, domain, recipient, tags, event."""
    _get(domain, cid)
    kinds = (event,) if event else ("accepted", "delivered", "failed", "opened", "clicked",
                                    "unsubscribed", "complained", "stored")
    out = []
    for data in _campaign_events(domain, cid, kinds, recipient):
        out.append({"timestamp": rfc2822(data["timestamp"]), "user_vars": data.get("user-variables") or {},
                    "domain": domain, "recipient": data.get("recipient", ""), "tags": data.get("tags") or [],
                    "event": data["event"]})
        if len(out) >= limit:
            break
    return out


def setup(app: web.Application, ctx: Context) -> None:
    store = ctx.store

    def parts(request):
        return (unquote(request.match_info["domain"]).strip().lower(),
                unquote(request.match_info["id"]) if "id" in request.match_info else None)

    async def create(request):
        domain, _ = parts(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        name = form.str("name", required=True)
        cid = form.str("id") or secrets.token_hex(4)
        if not _ID.match(cid):
            raise InputError("'id' may hold letters, digits, '_', '.', '-' (at most 64)")
        row = await store.write(_create_sync, domain, cid, name[:255], ctx.clock())
        return json_response({"message": "Campaign created", "campaign": row})

    async def list_(request):
        domain, _ = parts(request)
        form = query(request)
        return json_response(await store.read(_list_sync, domain, form.int("skip", 0, lo=0),
                                              form.int("limit", 100, lo=1, hi=1000)))

    async def get(request):
        domain, cid = parts(request)
        return json_response(await store.read(lambda: _present(_get(domain, cid))))

    async def update(request):
        domain, cid = parts(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        new_id = form.str("id")
        if new_id and not _ID.match(new_id):
            raise InputError("'id' may hold letters, digits, '_', '.', '-' (at most 64)")
        row = await store.write(_update_sync, domain, cid, form.str("name"), new_id)
        return json_response({"message": "Campaign updated", "campaign": row})

    async def delete(request):
        domain, cid = parts(request)
        await store.write(_delete_sync, domain, cid)
        return json_response({"message": "Campaign deleted", "id": cid})

    async def cstats(request):
        domain, cid = parts(request)
        form = query(request)
        return json_response(await store.read(_stats_sync, domain, cid, form.str("groupby") or "",
                                              form.int("limit", 100, lo=1, hi=1000)))

    async def cevents(request):
        domain, cid = parts(request)
        form = query(request)
        items = await store.read(_events_sync, domain, cid, form.str("event") or "",
                                 (form.str("recipient") or "").strip(), form.int("limit", 100, lo=1, hi=300))
        return json_response(items)

    base = "/v3/{domain}/campaigns"
    app.router.add_post(base, create)
    app.router.add_get(base, list_)
    app.router.add_get(base + "/{id}", get)
    app.router.add_put(base + "/{id}", update)
    app.router.add_delete(base + "/{id}", delete)
    app.router.add_get(base + "/{id}/stats", cstats)
    app.router.add_get(base + "/{id}/events", cevents)
