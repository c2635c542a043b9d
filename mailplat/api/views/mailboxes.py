"""Mailboxes API: GET/POST /v3/<domain>/mailboxes, PUT/DELETE /v3/<domain>/mailboxes/<mailbox>
(also under /v2/).  Parses the request and hands it to core.mailboxes."""
from __future__ import annotations

from aiohttp import web

from ...core import mailboxes
from ...core.context import Context
from ..forms import query, read_form
from ..middleware import json_response


def setup(app: web.Application, ctx: Context) -> None:
    max_bytes = ctx.config.api.max_request_bytes
    mailboxes.register_domain_hook()

    async def list_mailboxes(request: web.Request) -> web.Response:
        form = query(request)
        limit = form.int("limit", 100, lo=1, hi=1000)
        skip = form.int("skip", 0, lo=0)
        return json_response(await mailboxes.list_mailboxes(ctx, request.match_info["domain"], limit, skip))

    async def create_mailbox(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await mailboxes.create_mailbox(
            ctx, request.match_info["domain"], form.get("mailbox"), form.get("password")))

    async def change_password(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await mailboxes.change_password(
            ctx, request.match_info["domain"], request.match_info["mailbox"], form.get("password")))

    async def delete_mailbox(request: web.Request) -> web.Response:
        return json_response(await mailboxes.delete_mailbox(
            ctx, request.match_info["domain"], request.match_info["mailbox"]))

    for version in ("v2", "v3"):
        base = f"/{version}/{{domain}}/mailboxes"
        app.router.add_get(base, list_mailboxes)
        app.router.add_post(base, create_mailbox)
        app.router.add_put(base + "/{mailbox}", change_password)
        app.router.add_delete(base + "/{mailbox}", delete_mailbox)
