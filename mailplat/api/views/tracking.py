"""The tracking host: what web_scheme://web_prefix.<domain> serves (pointed at the api
service by the domain's tracking CNAME, so requests arrive with that Host header).

GET /o/<token>: the 1x1 PNG, records `opened`.  GET /c/<token>: records `clicked` and
redirects (302) to the original URL.  GET or POST /u/<token>: unsubscribes and records
`unsubscribed` (a known link scanner's GET only gets the page with a confirm button, so
prefetching never unsubscribes anyone; POST is RFC 8058 one-click).  All public; a token that
was not made by core.tracking is a 404, never a 500.
"""
from __future__ import annotations

import html

from aiohttp import web

from ...core import tracking
from ...core.context import Context
from ..middleware import public

NO_CACHE = {"Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache",
            "X-Content-Type-Options": "nosniff"}


def _not_found() -> web.Response:
    return web.Response(status=404, text="Not found", content_type="text/plain", headers=NO_CACHE)


def setup(app: web.Application, ctx: Context) -> None:
    store = ctx.store

    async def decode(request):
        if not tracking.ready():
            await store.read(tracking.secret_sync)
        return tracking.open_token(request.match_info["token"])

    def client(request) -> tuple[str, str]:
        return request.remote or "", request.headers.get("User-Agent", "")[:1000]

    @public
    async def pixel(request):
        tok = await decode(request)
        if tok is None or tok[0] != "o":
            return _not_found()
        ip, ua = client(request)
        await store.write(tracking.hit_sync, "o", tok[1], tok[2], None, ip, ua, ctx.clock())
        return web.Response(body=tracking.PIXEL_PNG, content_type="image/png", headers=NO_CACHE)

    @public
    async def click(request):
        tok = await decode(request)
        if tok is None or tok[0] != "c" or not isinstance(tok[3], str):
            return _not_found()
        url = tok[3]
        if not url.lower().startswith(("http://", "https://")) or any(c in url for c in "\r\n"):
            return _not_found()
        ip, ua = client(request)
        data = await store.write(tracking.hit_sync, "c", tok[1], tok[2], url, ip, ua, ctx.clock())
        if data is None:
            return _not_found()
        raise web.HTTPFound(url, headers=NO_CACHE)

    @public
    async def unsubscribe(request):
        tok = await decode(request)
        if tok is None or tok[0] != "u":
            return _not_found()
        ip, ua = client(request)
        if request.method == "GET" and tracking.bot_name(ua):
            page = (f"<!doctype html><html><body><form method=\"post\">"
                    f"<p>Unsubscribe {html.escape(tok[2])}?</p><button>Unsubscribe</button>"
                    f"</form></body></html>")
            return web.Response(text=page, content_type="text/html", headers=NO_CACHE)
        data = await store.write(tracking.hit_sync, "u", tok[1], tok[2], tok[3], ip, ua, ctx.clock())
        if data is None:
            return _not_found()
        page = ("<!doctype html><html><body><p>You have been unsubscribed: "
                f"{html.escape(tok[2])} will receive no more of these messages.</p></body></html>")
        return web.Response(text=page, content_type="text/html", headers=NO_CACHE)

    app.router.add_get("/o/{token}", pixel)
    app.router.add_get("/c/{token}", click)
    app.router.add_get("/u/{token}", unsubscribe)
    app.router.add_post("/u/{token}", unsubscribe)
