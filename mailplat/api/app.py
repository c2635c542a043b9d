"""The api service: the aiohttp application and its listener.

Owns building the app (middlewares, routes from each views module) and serving it.  Views
modules live in api/views/ and each has `setup(app, ctx)`.
"""
from __future__ import annotations

import asyncio
import importlib

from aiohttp import web

from .. import logs
from ..core.auth import KeyChecker
from ..core.context import Context
from .middleware import RateLimiter, error_response, make_middlewares, public

log = logs.get("mailplat.api")

VIEW_MODULES = [
    "keys",
    "domains",
    "mailboxes",
    "autoconfig",
    "messages",
    "events",
    "routes",
    "lists",
    "stored_messages",
    "tracking", "suppressions", "webhooks", "stats", "tags", "campaigns", "log",
]

CTX = web.AppKey("ctx", Context)
INFLIGHT = web.AppKey("inflight", dict)


def _inflight_counter(counts: dict):
    """Counts requests being handled, so stop() can wait for them (bodies still uploading too)."""
    @web.middleware
    async def count(request: web.Request, handler):
        counts["n"] += 1
        try:
            return await handler(request)
        finally:
            counts["n"] -= 1
            if counts["n"] == 0:
                counts["idle"].set()
            else:
                counts["idle"].clear()
    return count


def create_app(ctx: Context) -> web.Application:
    keys = KeyChecker(ctx.store)
    limiter = RateLimiter(ctx.config.api.domains_rate_limit_per_minute)
    inflight = {"n": 0, "idle": asyncio.Event()}
    app = web.Application(middlewares=[_inflight_counter(inflight), *make_middlewares(keys, limiter)],
                          client_max_size=ctx.config.api.max_request_bytes)
    app[CTX] = ctx
    app[INFLIGHT] = inflight
    for name in VIEW_MODULES:
        importlib.import_module(f"{__package__}.views.{name}").setup(app, ctx)

    @public
    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, "Not found")

    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


class ApiService:
    name = "api"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.runner: web.AppRunner | None = None

    async def start(self) -> dict[str, int]:
        app = create_app(self.ctx)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=30.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.ctx.config.server.bind, self.ctx.config.api.port,
                           backlog=1024, reuse_address=True)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # the bound port when 0 was asked for
        log.info("api listening", extra={"fields": {"port": port}})
        return {"api": port}

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let requests in flight (even ones still uploading) finish, close."""
        if self.runner is None:
            return
        for site in list(self.runner.sites):
            await site.stop()
        inflight = self.runner.app[INFLIGHT]
        if inflight["n"]:
            inflight["idle"].clear()
            try:
                await asyncio.wait_for(inflight["idle"].wait(), grace)
            except asyncio.TimeoutError:
                log.warning("api stopping with %d requests still in flight", inflight["n"])
        await self.runner.cleanup()


def create(ctx: Context) -> ApiService:
    return ApiService(ctx)
