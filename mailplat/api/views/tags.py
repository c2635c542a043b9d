"""Tags API: GET /v3/<domain>/tags (paged by tag name: ?page=next&tag=<last>&limit=N),
GET/PUT(description)/DELETE /v3/<domain>/tags/<tag>, GET /v3/<domain>/tags/<tag>/stats.
Tags are noted as messages use them (core.stats.count_sync); deleting one removes the tag and
its counters."""
from __future__ import annotations

from urllib.parse import unquote, urlencode

from aiohttp import web

from ...core import stats
from ...core.context import Context
from ...core.timefmt import rfc2822
from ...errors import InputError, NotFound
from ...store.models import Domain
from ...store.tracking_models import StatCounter, Tag
from ..forms import query, read_form
from ..middleware import json_response


def _present(row) -> dict:
    return {"tag": row.tag, "description": row.description,
            "first-seen": rfc2822(row.first_seen), "last-seen": rfc2822(row.last_seen)}


def _need_domain(domain: str) -> None:
    if Domain.get_or_none(Domain.name == domain) is None:
        raise NotFound("Domain not found")


def _page_sync(domain: str, page: str, pivot: str, limit: int, prefix: str) -> list[dict]:
    _need_domain(domain)
    cond = Tag.domain == domain
    if prefix:
        cond &= Tag.tag.startswith(prefix)
    if page == "next" and pivot:
        cond &= Tag.tag > pivot
    elif page in ("previous", "prev") and pivot:
        cond &= Tag.tag < pivot
    back = page in ("previous", "prev", "last")
    rows = list(Tag.select().where(cond).order_by(Tag.tag.desc() if back else Tag.tag.asc()).limit(limit))
    if back:
        rows.reverse()
    return [_present(r) for r in rows]


def _get_sync(domain: str, tag: str):
    _need_domain(domain)
    row = Tag.get_or_none((Tag.domain == domain) & (Tag.tag == tag))
    if row is None:
        raise NotFound("Tag not found")
    return row


def _update_sync(domain: str, tag: str, description: str) -> None:
    _get_sync(domain, tag)
    Tag.update(description=description).where((Tag.domain == domain) & (Tag.tag == tag)).execute()


def _delete_sync(domain: str, tag: str) -> None:
    _get_sync(domain, tag)
    Tag.delete().where((Tag.domain == domain) & (Tag.tag == tag)).execute()
    StatCounter.delete().where((StatCounter.domain == domain) & (StatCounter.tag == tag)).execute()


def setup(app: web.Application, ctx: Context) -> None:
    store = ctx.store

    def parts(request):
        domain = unquote(request.match_info["domain"]).strip().lower()
        tag = unquote(request.match_info["tag"]) if "tag" in request.match_info else None
        return domain, tag

    async def list_(request):
        domain, _ = parts(request)
        form = query(request)
        limit = form.int("limit", 100, lo=1, hi=1000)
        page = (form.str("page") or "first").lower()
        if page not in ("first", "last", "next", "previous", "prev"):
            raise InputError("'page' should be first, last, next or previous")
        pivot = form.str("tag") or ""
        prefix = form.str("prefix") or ""
        items = await store.read(_page_sync, domain, page, pivot, limit, prefix)
        base = (ctx.config.api.public_url.rstrip("/") or f"{request.scheme}://{request.host}") + f"/v3/{domain}/tags"

        def link(p, pv=None):
            q = {"page": p, **({"tag": pv} if pv is not None else {}), "limit": limit}
            return base + "?" + urlencode(q)
        first = items[0]["tag"] if items else pivot
        last = items[-1]["tag"] if items else pivot
        return json_response({"items": items, "paging": {
            "first": link("first"), "last": link("last"), "next": link("next", last),
            "previous": link("previous", first)}})

    async def get(request):
        domain, tag = parts(request)
        return json_response(_present(await store.read(_get_sync, domain, tag)))

    async def update(request):
        domain, tag = parts(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        description = form.str("description")
        if description is None:
            raise InputError("description parameter is missing")
        await store.write(_update_sync, domain, tag, description[:1000])
        return json_response({"message": "Tag updated"})

    async def delete(request):
        domain, tag = parts(request)
        await store.write(_delete_sync, domain, tag)
        stats.forget_tag(domain, tag)
        return json_response({"message": "Tag deleted"})

    async def tag_stats(request):
        domain, tag = parts(request)
        row = await store.read(_get_sync, domain, tag)
        form = query(request)
        start, end, resolution = stats.parse_range(form.fields, ctx.clock())
        body = await store.read(stats.totals_sync, domain, tag, [e.strip().lower() for e in form.getall("event")],
                                start, end, resolution)
        return json_response({"tag": tag, "description": row.description, **body})

    base = "/v3/{domain}/tags"
    app.router.add_get(base, list_)
    app.router.add_get(base + "/{tag}", get)
    app.router.add_put(base + "/{tag}", update)
    app.router.add_delete(base + "/{tag}", delete)
    app.router.add_get(base + "/{tag}/stats", tag_stats)
