"""Campaigns (legacy API): POST/GET /v3/<domain>/campaigns, GET/PUT/DELETE
/v3/<domain>/campaigns/<id>, GET .../<id>/stats (groupby=domain|daily_hour|...) and
GET .../<id>/events (event, recipient, limit).  Messages join a campaign with o:campaign or
X-Mailgun-Campaign-Id (up to three, core.options); counts come from core.stats counters under
the campaign's scope, events from the events table."""
from __future__ import annotations

import re
import secrets
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


def _stats_sync(domain: str, cid: str, groupby: str) -> object:
    _get(domain, cid)
    if not groupby:
        return {"total": _counts(domain, cid)}
    if groupby not in ("daily_hour", "day", "hour"):
        raise InputError("'groupby' should be daily_hour")
    rows = (StatCounter.select(StatCounter.hour, StatCounter.key, StatCounter.count)
            .where((StatCounter.domain == domain) & (StatCounter.tag == stats.CAMPAIGN_PREFIX + cid)).tuples())
    buckets: dict[int, dict] = {}
    for hour, key, n in rows:
        b = buckets.setdefault(hour, {k: 0 for k in COUNTS})
        for name, prefix in COUNTS.items():
            if key.startswith(prefix):
                b[name] += int(n)
    return [{"daily_hour": rfc2822(h), **v} for h, v in sorted(buckets.items())]


def _events_sync(domain: str, cid: str, event: str, recipient: str, limit: int) -> list[dict]:
    _get(domain, cid)
    cond = Event.domain == domain
    if event:
        cond &= Event.event == event
    if recipient:
        cond &= Event.recipient == recipient
    out = []
    for (data,) in Event.select(Event.data).where(cond).order_by(Event.timestamp.desc()).limit(20_000).tuples():
        if any((c.get("id") if isinstance(c, dict) else c) == cid for c in data.get("campaigns") or []):
            out.append({"event": data["event"], "recipient": data.get("recipient", ""),
                        "timestamp": rfc2822(data["timestamp"]),
                        "message-id": ((data.get("message") or {}).get("headers") or {}).get("message-id", "")})
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
        return json_response(await store.read(_stats_sync, domain, cid, query(request).str("groupby") or ""))

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
