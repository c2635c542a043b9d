"""Stored messages API: GET /v3/domains/<d>/messages/<key> (parsed JSON, or raw MIME with
Accept: message/rfc2822), POST to the same URL to resend it, and its attachments.  Parses the
request and hands it to core.stored."""
from __future__ import annotations

from aiohttp import web

from ...core import stored
from ...core.context import Context
from ..forms import read_form
from ..middleware import json_response, sending


def setup(app: web.Application, ctx: Context) -> None:
    max_bytes = ctx.config.api.max_request_bytes

    @sending
    async def get(request: web.Request) -> web.Response:
        domain, key = request.match_info["domain"], request.match_info["key"]
        request["principal"].require_sending(domain.lower())
        if "message/rfc2822" in request.headers.get("Accept", ""):
            return json_response(await stored.as_mime(ctx, domain, key))
        public = ctx.config.api.public_url.rstrip("/")
        base = public or f"{request.scheme}://{request.host}"
        return json_response(await stored.as_json(ctx, domain, key, base))

    @sending
    async def resend(request: web.Request) -> web.Response:
        domain, key = request.match_info["domain"], request.match_info["key"]
        form = await read_form(request, max_bytes)
        result = await stored.resend(ctx, domain, key, [str(t) for t in form.getall("to")],
                                     request["principal"])
        return json_response({"id": f"<{result.message_id}>", "message": "Queued. Thank you."})

    @sending
    async def attachment(request: web.Request) -> web.Response:
        domain, key = request.match_info["domain"], request.match_info["key"]
        request["principal"].require_sending(domain.lower())
        try:
            index = int(request.match_info["n"])
        except ValueError:
            index = -1
        filename, ctype, data = await stored.attachment(ctx, domain, key, index)
        safe = "".join(c for c in filename if c.isprintable() and c not in '"\\\r\n') or "attachment"
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{safe}"',
                                     "X-Content-Type-Options": "nosniff", "X-Original-Content-Type": ctype})

    for version in ("v2", "v3"):
        base = f"/{version}/domains/{{domain}}/messages/{{key}}"
        app.router.add_get(base, get)
        app.router.add_post(base, resend)
        app.router.add_get(base + "/attachments/{n}", attachment)
