"""Domains API on /v3/domains and /v4/domains (same semantics, same shapes): domains, DNS
verification, SMTP credentials, connection and tracking settings, DKIM authority and selector,
web prefix.

Only parses HTTP here (api.forms for every body and query) and hands the meaning to
core.domains; every handler is admin-only and counts against the "domains" rate limit.
"""
from __future__ import annotations

from aiohttp import web

from ...core import domains
from ...core.context import Context
from ..forms import Form, query, read_form
from ..middleware import json_response, rate_limited

CREATE_FIELDS = ("smtp_password", "spam_action", "wildcard", "force_dkim_authority",
                 "dkim_key_size", "dkim_selector", "web_scheme", "web_prefix", "pool_id")
UPDATE_FIELDS = ("spam_action", "web_scheme", "wildcard", "web_prefix", "pool_id")


def _opts(form: Form, names: tuple[str, ...]) -> dict:
    opts = {name: form.get(name) for name in names if name in form}
    if "ips" in form:
        opts["ips"] = form.getall("ips")
    return opts


def setup(app: web.Application, ctx: Context) -> None:
    max_bytes = ctx.config.api.max_request_bytes

    def paging(form: Form, default_limit: int = 100) -> tuple[int, int]:
        return (form.int("limit", default_limit, lo=1, hi=1000), form.int("skip", 0, lo=0))

    @rate_limited("domains")
    async def list_domains(request: web.Request) -> web.Response:
        form = query(request)
        limit, skip = paging(form)
        return json_response(await domains.list_domains(
            ctx, limit=limit, skip=skip, authority=form.str("authority"), state=form.str("state")))

    @rate_limited("domains")
    async def create_domain(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        name = form.str("name", required=True)
        return json_response(await domains.create_domain(ctx, name, _opts(form, CREATE_FIELDS)))

    @rate_limited("domains")
    async def get_domain(request: web.Request) -> web.Response:
        return json_response(await domains.get_domain(ctx, request.match_info["name"]))

    @rate_limited("domains")
    async def update_domain(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await domains.update_domain(ctx, request.match_info["name"],
                                                         _opts(form, UPDATE_FIELDS)))

    @rate_limited("domains")
    async def delete_domain(request: web.Request) -> web.Response:
        return json_response(await domains.delete_domain(ctx, request.match_info["name"]))

    @rate_limited("domains")
    async def verify_domain(request: web.Request) -> web.Response:
        await read_form(request, max_bytes)  # a body, if any, must still be well-formed
        return json_response(await domains.verify_domain(ctx, request.match_info["name"]))

    # -- credentials ------------------------------------------------------------------------
    @rate_limited("domains")
    async def list_credentials(request: web.Request) -> web.Response:
        limit, skip = paging(query(request))
        return json_response(await domains.list_credentials(ctx, request.match_info["name"],
                                                            limit=limit, skip=skip))

    @rate_limited("domains")
    async def create_credential(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await domains.create_credential(
            ctx, request.match_info["name"], form.get("login"), form.get("password")))

    @rate_limited("domains")
    async def change_password(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await domains.change_credential_password(
            ctx, request.match_info["name"], request.match_info["login"], form.get("password")))

    @rate_limited("domains")
    async def delete_credential(request: web.Request) -> web.Response:
        return json_response(await domains.delete_credential(
            ctx, request.match_info["name"], request.match_info["login"]))

    @rate_limited("domains")
    async def delete_all_credentials(request: web.Request) -> web.Response:
        return json_response(await domains.delete_all_credentials(ctx, request.match_info["name"]))

    # -- settings ---------------------------------------------------------------------------
    @rate_limited("domains")
    async def get_connection(request: web.Request) -> web.Response:
        return json_response(await domains.get_connection(ctx, request.match_info["name"]))

    @rate_limited("domains")
    async def update_connection(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await domains.update_connection(
            ctx, request.match_info["name"], _opts(form, ("require_tls", "skip_verification"))))

    @rate_limited("domains")
    async def get_tracking(request: web.Request) -> web.Response:
        return json_response(await domains.get_tracking(ctx, request.match_info["name"]))

    @rate_limited("domains")
    async def update_tracking(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await domains.update_tracking(
            ctx, request.match_info["name"], request.match_info["kind"],
            _opts(form, ("active", "html_footer", "text_footer"))))

    @rate_limited("domains")
    async def dkim_authority(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await domains.set_dkim_authority(ctx, request.match_info["name"],
                                                              form.get("self")))

    @rate_limited("domains")
    async def dkim_selector(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await domains.set_dkim_selector(ctx, request.match_info["name"],
                                                             form.get("dkim_selector")))

    @rate_limited("domains")
    async def web_prefix(request: web.Request) -> web.Response:
        form = await read_form(request, max_bytes)
        return json_response(await domains.set_web_prefix(ctx, request.match_info["name"],
                                                          form.get("web_prefix")))

    for version in ("v3", "v4"):
        base = f"/{version}/domains"
        one = base + "/{name}"
        r = app.router
        r.add_get(base, list_domains)
        r.add_post(base, create_domain)
        r.add_get(one, get_domain)
        r.add_put(one, update_domain)
        r.add_delete(one, delete_domain)
        r.add_put(one + "/verify", verify_domain)
        r.add_get(one + "/credentials", list_credentials)
        r.add_post(one + "/credentials", create_credential)
        r.add_delete(one + "/credentials", delete_all_credentials)
        r.add_put(one + "/credentials/{login}", change_password)
        r.add_delete(one + "/credentials/{login}", delete_credential)
        r.add_get(one + "/connection", get_connection)
        r.add_put(one + "/connection", update_connection)
        r.add_get(one + "/tracking", get_tracking)
        r.add_put(one + "/tracking/{kind}", update_tracking)
        r.add_put(one + "/dkim_authority", dkim_authority)
        r.add_put(one + "/dkim_selector", dkim_selector)
        r.add_put(one + "/web_prefix", web_prefix)
