"""Stats API: GET /v3/<domain>/stats/total, GET /v3/stats/total (every domain) and the legacy
GET /v3/<domain>/stats (skip, limit, event).  Query: event (repeated), start, end,
resolution (hour, day, month), duration (24h, 7d, 1m).  core.stats sums the counters."""
from __future__ import annotations

from urllib.parse import unquote

from aiohttp import web

from ...core import stats
from ...core.context import Context
from ...errors import NotFound
from ...store.models import Domain
from ..forms import query
from ..middleware import json_response


def setup(app: web.Application, ctx: Context) -> None:
    store = ctx.store

    async def need_domain(domain: str) -> None:
        if not await store.read(lambda: Domain.get_or_none(Domain.name == domain) is not None):
            raise NotFound("Domain not found")

    async def total(request):
        domain = request.match_info.get("domain")
        if domain is not None:
            domain = unquote(domain).strip().lower()
            await need_domain(domain)
        form = query(request)
        start, end, resolution = stats.parse_range(form.fields, ctx.clock())
        body = await store.read(stats.totals_sync, domain, "", [e.strip().lower() for e in form.getall("event")],
                                start, end, resolution)
        return json_response(body)

    async def legacy(request):
        domain = unquote(request.match_info["domain"]).strip().lower()
        await need_domain(domain)
        form = query(request)
        events = [{"sent": "accepted"}.get(e.strip().lower(), e.strip().lower()) for e in form.getall("event")]
        skip = form.int("skip", 0, lo=0)
        limit = form.int("limit", 100, lo=1, hi=1000)
        return json_response(await store.read(stats.daily_items_sync, domain, events, skip, limit))

    app.router.add_get("/v3/stats/total", total)
    app.router.add_get("/v3/{domain}/stats/total", total)
    app.router.add_get("/v3/{domain}/stats", legacy)
