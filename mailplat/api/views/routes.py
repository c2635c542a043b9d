"""Routes API: POST/GET /v3/routes, GET/PUT/DELETE /v3/routes/<id>, GET /v3/routes/match
(also under /v2/).  Parses the request and hands it to core.routes."""
from __future__ import annotations

from aiohttp import web

from ...core import routes
from ...core.context import Context
from ..forms import query, read_form
from ..middleware import json_response


def setup(app: web.Application, ctx: Context) -> None:
    max_bytes = ctx.config.api.max_request_bytes

    def _actions(form) -> list[str]:
        return [a for a in (str(x) for x in form.getall("action")) if a.strip()]

    async def create(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        route = await routes.create_route(
            ctx, form.int("priority", 0, lo=-(2 ** 31), hi=2 ** 31 - 1), form.str("description", ""),
            form.str("expression", ""), _actions(form))
        return json_response({"message": "Route has been created", "route": route})

    async def list_all(request: web.Request) -> web.Response:
        form = query(request)
        return json_response(await routes.list_routes(ctx, form.int("skip", 0, lo=0),
                                                      form.int("limit", 100, lo=1, hi=1000)))

    async def get(request: web.Request) -> web.Response:
        return json_response({"route": await routes.get_route(ctx, request.match_info["id"])})

    async def update(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        route = await routes.update_route(
            ctx, request.match_info["id"],
            form.int("priority", None, lo=-(2 ** 31), hi=2 ** 31 - 1) if "priority" in form else None,
            form.str("description") if "description" in form else None,
            form.str("expression") if "expression" in form else None, _actions(form) or None)
        return json_response({**route, "message": "Route has been updated"})

    async def delete(request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        await routes.delete_route(ctx, rid)
        return json_response({"message": "Route has been deleted", "id": rid})

    async def match(request: web.Request) -> web.Response:
        return json_response({"route": await routes.match_address(ctx, query(request).str("address", ""))})

    for version in ("v2", "v3"):
        base = f"/{version}/routes"
        app.router.add_post(base, create)
        app.router.add_get(base, list_all)
        app.router.add_get(base + "/match", match)
        app.router.add_get(base + "/{id}", get)
        app.router.add_put(base + "/{id}", update)
        app.router.add_delete(base + "/{id}", delete)
