"""Mailing lists API: /v3/lists, /v3/lists/pages, /v3/lists/<address>, members (one, pages,
members.json bulk upsert, members.csv upload) and the public unsubscribe link (one-click GET
and RFC 8058 POST).  Parses the request and hands it to core.lists."""
from __future__ import annotations

import html

from aiohttp import web

from ...core import lists
from ...core.context import Context
from ..forms import query, read_form
from ..middleware import json_response, public

FIELDS = ("address", "name", "description", "access_level", "reply_preference", "vars", "subscribed", "upsert")


def _dict(form) -> dict:
    return {k: form.str(k) for k in FIELDS if k in form}


def setup(app: web.Application, ctx: Context) -> None:
    max_bytes = ctx.config.api.max_request_bytes

    def base(request) -> str:
        return ctx.config.api.public_url.rstrip("/") or f"{request.scheme}://{request.host}"

    def _subscribed(form):
        return form.bool("subscribed", None)

    async def create(request):
        return json_response(await lists.create_list(ctx, _dict(await read_form(request, max_bytes))))

    async def list_all(request):
        form = query(request)
        return json_response(await lists.list_lists(ctx, form.int("limit", 100, lo=1, hi=1000),
                                                     form.int("skip", 0, lo=0), form.str("address")))

    async def pages(request):
        form = query(request)
        return json_response(await lists.list_pages(ctx, base(request), form.int("limit", 100, lo=1, hi=1000),
                                                    form.str("page", "first"), form.str("address", "")))

    async def get(request):
        return json_response(await lists.get_list(ctx, request.match_info["address"]))

    async def update(request):
        return json_response(await lists.update_list(ctx, request.match_info["address"],
                                                     _dict(await read_form(request, max_bytes))))

    async def delete(request):
        return json_response(await lists.delete_list(ctx, request.match_info["address"]))

    async def members(request):
        form = query(request)
        return json_response(await lists.list_members(ctx, request.match_info["address"],
                                                       form.int("limit", 100, lo=1, hi=1000),
                                                       form.int("skip", 0, lo=0), _subscribed(form)))

    async def member_pages(request):
        form = query(request)
        return json_response(await lists.member_pages(ctx, base(request), request.match_info["address"],
                                                       form.int("limit", 100, lo=1, hi=1000),
                                                       form.str("page", "first"), form.str("address", ""),
                                                       _subscribed(form)))

    async def add_member(request):
        return json_response(await lists.add_member(ctx, request.match_info["address"],
                                                     _dict(await read_form(request, max_bytes))))

    async def bulk(request):
        form = await read_form(request, max_bytes)
        files = form.files_named("members") or form.files_named("file")
        if files:
            rows = lists.parse_bulk(None, files[0].data)
        elif form.json_body is not None and isinstance(form.json_body, list):
            rows = lists.parse_bulk(form.json_body)
        else:
            rows = lists.parse_bulk(form.get("members"))
        return json_response(await lists.add_members_bulk(ctx, request.match_info["address"], rows,
                                                           form.bool("upsert", False)))

    async def get_member(request):
        return json_response(await lists.get_member(ctx, request.match_info["address"], request.match_info["member"]))

    async def update_member(request):
        return json_response(await lists.update_member(ctx, request.match_info["address"], request.match_info["member"],
                                                        _dict(await read_form(request, max_bytes))))

    async def delete_member(request):
        return json_response(await lists.delete_member(ctx, request.match_info["address"], request.match_info["member"]))

    @public
    async def unsubscribe(request):
        address = await lists.unsubscribe(ctx, request.match_info["member_id"], request.match_info["token"])
        if request.method == "POST":
            return json_response({"message": "Unsubscribed", "address": address})
        page = (f"<!doctype html><meta charset=utf-8><title>Unsubscribed</title>"
                f"<p>{html.escape(address)} has been unsubscribed from the mailing list.</p>")
        return web.Response(text=page, content_type="text/html",
                            headers={"X-Content-Type-Options": "nosniff",
                                     "Content-Security-Policy": "default-src 'none'"})

    app.router.add_get("/unsubscribe/list/{member_id}/{token}", unsubscribe)
    app.router.add_post("/unsubscribe/list/{member_id}/{token}", unsubscribe)
    for version in ("v2", "v3"):
        b = f"/{version}/lists"
        app.router.add_post(b, create)
        app.router.add_get(b, list_all)
        app.router.add_get(b + "/pages", pages)
        app.router.add_get(b + "/{address}", get)
        app.router.add_put(b + "/{address}", update)
        app.router.add_delete(b + "/{address}", delete)
        app.router.add_get(b + "/{address}/members", members)
        app.router.add_post(b + "/{address}/members", add_member)
        app.router.add_get(b + "/{address}/members/pages", member_pages)
        app.router.add_post(b + "/{address}/members.json", bulk)
        app.router.add_post(b + "/{address}/members.csv", bulk)
        app.router.add_get(b + "/{address}/members/{member}", get_member)
        app.router.add_put(b + "/{address}/members/{member}", update_member)
        app.router.add_delete(b + "/{address}/members/{member}", delete_member)
