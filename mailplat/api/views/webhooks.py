"""Webhooks API and the account's HTTP signing key.

GET/POST /v3/domains/<d>/webhooks, GET/PUT/DELETE /v3/domains/<d>/webhooks/<id>,
PUT .../<id>/test (one real post through the egress guard, answered with the receiver's
status), the v4 form (url + event_types, also on /v4/domains/<d>/webhooks; DELETE ?url=)
and GET/POST /v5/accounts/http_signing_key.  core.webhooks owns the rows and the posts.
"""
from __future__ import annotations

from urllib.parse import unquote

from aiohttp import web

from ...core import egress, events, signing
from ...core import webhooks as wh
from ...core.context import Context
from ...core.timefmt import rfc2822
from ...errors import InputError, NotFound
from ...store.models import Domain
from ...store.route_models import SigningKey
from ..forms import query, read_form
from ..middleware import json_response


def setup(app: web.Application, ctx: Context) -> None:
    store = ctx.store
    allow_private = egress.allow_private(ctx)

    def domain_of(request) -> str:
        return unquote(request.match_info["domain"]).strip().lower()

    async def need_domain(domain: str) -> None:
        if not await store.read(lambda: Domain.get_or_none(Domain.name == domain) is not None):
            raise NotFound("Domain not found")

    async def list_(request):
        domain = domain_of(request)
        await need_domain(domain)
        hooks = await store.read(wh.list_sync, domain)
        return json_response({"webhooks": {k: {"urls": u} for k, u in sorted(hooks.items())}})

    async def create(request):
        domain = domain_of(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        await need_domain(domain)
        urls = wh.check_urls([str(u) for u in form.getall("url")], allow_private)
        kind = form.str("id")
        if not kind and form.getall("event_types"):
            return await _v4_set(domain, form, urls, "Webhook has been created")
        if not kind:
            raise InputError("id parameter is missing")
        kind = wh.normalize_kind(kind)
        await store.write(wh.create_sync, domain, kind, urls, ctx.clock())
        return json_response({"message": "Webhook has been created", "webhook": {"urls": urls}})

    async def _v4_set(domain, form, urls, message):
        kinds = [wh.normalize_kind(str(k), allow_legacy=False) for k in form.getall("event_types")]

        def write():
            for kind in kinds:
                have = wh.list_sync(domain).get(kind)
                if have is None:
                    wh.create_sync(domain, kind, urls, ctx.clock())
                else:
                    merged = list(dict.fromkeys(have + urls))
                    if len(merged) > wh.MAX_URLS:
                        raise InputError(f"A webhook can have at most {wh.MAX_URLS} URLs")
                    wh.update_sync(domain, kind, merged)
        await store.write(write)
        return json_response({"message": message, "webhook": {"urls": urls, "event_types": kinds}})

    async def v4_update(request):
        domain = domain_of(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        await need_domain(domain)
        urls = wh.check_urls([str(u) for u in form.getall("url")], allow_private)
        return await _v4_set(domain, form, urls, "Webhook has been updated")

    async def v4_delete(request):
        domain = domain_of(request)
        await need_domain(domain)
        url = query(request).str("url")
        if not url:
            raise InputError("url parameter is missing")

        def write():
            n = 0
            for kind, urls in wh.list_sync(domain).items():
                if url in urls:
                    rest = [u for u in urls if u != url]
                    if rest:
                        wh.update_sync(domain, kind, rest)
                    else:
                        wh.delete_sync(domain, kind)
                    n += 1
            if not n:
                raise NotFound("Webhook not found")
        await store.write(write)
        return json_response({"message": "Webhook has been deleted"})

    async def get(request):
        domain = domain_of(request)
        await need_domain(domain)
        kind = wh.normalize_kind(request.match_info["id"])
        urls = await store.read(wh.get_sync, domain, kind)
        return json_response({"webhook": {"urls": urls}})

    async def update(request):
        domain = domain_of(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        await need_domain(domain)
        kind = wh.normalize_kind(request.match_info["id"])
        urls = wh.check_urls([str(u) for u in form.getall("url")], allow_private)
        await store.write(wh.update_sync, domain, kind, urls)
        return json_response({"message": "Webhook has been updated", "webhook": {"urls": urls}})

    async def delete(request):
        domain = domain_of(request)
        await need_domain(domain)
        kind = wh.normalize_kind(request.match_info["id"])
        urls = await store.write(wh.delete_sync, domain, kind)
        return json_response({"message": "Webhook has been deleted", "webhook": {"urls": urls}})

    async def test(request):
        domain = domain_of(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        await need_domain(domain)
        kind = wh.normalize_kind(request.match_info["id"])
        urls = wh.check_urls([str(u) for u in form.getall("url")], allow_private)
        key = await signing.get_key(ctx)
        data = events.build({"permanent_fail": "failed", "temporary_fail": "failed"}.get(kind, kind),
                            None, "alice@example.com", timestamp=ctx.clock(),
                            severity={"permanent_fail": "permanent", "temporary_fail": "temporary"}.get(kind))
        sig = signing.new_signature(key, ctx.clock())
        if kind in wh.LEGACY_KINDS:
            body, ctype = wh.legacy_body(kind, domain, data, sig), "application/x-www-form-urlencoded"
        else:
            body, ctype = wh.json_body(data, sig), "application/json"
        target, headers = wh.split_auth(urls[0])
        headers.update({"Content-Type": ctype, wh.BODY_SIGNATURE_HEADER: wh.body_signature(key, body)})
        try:
            async with egress.session(allow_private, ctx.config.hooks.timeout) as session:
                async with session.post(target, data=body, headers=headers, allow_redirects=False) as resp:
                    text = (await resp.read())[:1000].decode("utf-8", "replace")
                    return json_response({"code": resp.status, "message": text})
        except egress.EgressRefused as exc:
            raise InputError(exc.message) from None
        except Exception as exc:  # noqa: BLE001 - report the receiver's trouble to the caller
            return json_response({"code": 0, "message": f"{type(exc).__name__}"})

    async def key_get(request):
        key = await signing.get_key(ctx)
        row = await store.read(lambda: SigningKey.get_or_none(SigningKey.id == signing.KEY_ID))
        return json_response({"http_signing_key": key,
                              "created_at": rfc2822(row.created_at if row else ctx.clock())})

    async def key_rotate(request):
        key = await signing.rotate_key(ctx)
        wh.invalidate()
        return json_response({"message": "success", "http_signing_key": key})

    for v in ("v3", "v4"):
        base = f"/{v}/domains/{{domain}}/webhooks"
        app.router.add_get(base, list_)
        app.router.add_post(base, create)
        app.router.add_put(base, v4_update)
        app.router.add_delete(base, v4_delete)
        app.router.add_get(base + "/{id}", get)
        app.router.add_put(base + "/{id}", update)
        app.router.add_delete(base + "/{id}", delete)
        app.router.add_put(base + "/{id}/test", test)
    app.router.add_get("/v5/accounts/http_signing_key", key_get)
    app.router.add_post("/v5/accounts/http_signing_key", key_rotate)
