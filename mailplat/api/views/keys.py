"""API keys: POST/GET /v1/keys, DELETE /v1/keys/<id> (primary-key holders only)."""
from __future__ import annotations

from aiohttp import web

from ...core import auth
from ...core.context import Context
from ..forms import query, read_form
from ..middleware import json_response


def setup(app: web.Application, ctx: Context) -> None:
    store = ctx.store
    limit = ctx.config.api.max_request_bytes

    async def create(request: web.Request) -> web.Response:
        form = await read_form(request, limit)
        role = (form.str("role") or "admin").lower()
        domain = form.str("domain_name") or form.str("domain")
        if role == "sending" and domain:
            from ...core.domains import normalize_name
            domain = normalize_name(domain)
        description = form.str("description") or ""
        row, key = await store.write(auth.create_key_sync, role, domain, description)
        return json_response({"key": {**auth.key_json(row), "secret": key}, "message": "Key created"})

    async def list_keys(request: web.Request) -> web.Response:
        form = query(request)
        rows = await store.read(auth.list_keys_sync)
        domain = form.str("domain_name")
        items = [auth.key_json(r) for r in rows if not domain or r.domain == domain]
        return json_response({"items": items, "total_count": len(items)})

    async def revoke(request: web.Request) -> web.Response:
        await store.write(auth.revoke_key_sync, request.match_info["key_id"])
        return json_response({"message": "Key deleted"})

    app.router.add_post("/v1/keys", create)
    app.router.add_get("/v1/keys", list_keys)
    app.router.add_delete("/v1/keys/{key_id}", revoke)
