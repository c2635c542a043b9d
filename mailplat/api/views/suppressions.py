"""Suppressions API: /v3/<domain>/bounces, /unsubscribes, /complaints and /whitelists.

GET (paged: ?page=first|last|next|previous&address=<pivot>&limit=N, the state all in the
query string of absolute paging URLs, which mailgun.js appends and the Python SDK re-sends),
POST (one entry as form or JSON object, a JSON array under 1,000, or a CSV file part `file`
on POST .../import), GET/DELETE .../<address> (404 when absent), DELETE all.  The rows and the
rules live in core.tracking_lists; the send path honours them (core.suppressions).
"""
from __future__ import annotations

from urllib.parse import unquote, urlencode

from aiohttp import web

from ...core import tracking_lists as tl
from ...core.context import Context
from ...errors import InputError
from ..forms import query, read_form
from ..middleware import json_response

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
ADDED = {"bounces": "bounces", "unsubscribes": "unsubscribes", "complaints": "complaints",
         "whitelists": "allowlist"}
REMOVED_ONE = {"bounces": "Bounced address has been removed",
               "unsubscribes": "Unsubscribe event has been removed",
               "complaints": "Spam complaint has been removed",
               "whitelists": "Allowlist address/domain has been removed"}
REMOVED_ALL = {"bounces": "Bounced addresses for this domain have been removed",
               "unsubscribes": "Unsubscribe addresses for this domain have been removed",
               "complaints": "Complaint addresses for this domain have been removed",
               "whitelists": "Allowlist addresses/domains for this domain have been removed"}


def setup(app: web.Application, ctx: Context) -> None:
    store = ctx.store

    def base_url(request) -> str:
        return ctx.config.api.public_url.rstrip("/") or f"{request.scheme}://{request.host}"

    def parts(request):
        domain = unquote(request.match_info["domain"]).strip().lower()
        kind = request.match_info["kind"]
        if kind not in tl.KINDS:
            raise web.HTTPNotFound()
        return domain, kind

    async def list_(request):
        domain, kind = parts(request)
        form = query(request)
        limit = form.int("limit", DEFAULT_LIMIT, lo=1, hi=MAX_LIMIT)
        page = (form.str("page") or "first").lower()
        if page not in ("first", "last", "next", "previous", "prev"):
            raise InputError("'page' should be first, last, next or previous")
        pivot = form.str("address") or form.str("value") or ""
        term = form.str("term") or ""
        items = await store.read(tl.page_sync, kind, domain, page, pivot, limit, term)
        key = "value" if kind == "whitelists" else "address"
        url = f"{base_url(request)}/v3/{domain}/{kind}"

        def link(p, pv=None):
            q = {"page": p}
            if pv is not None:
                q["address"] = pv
            q["limit"] = limit
            if term:
                q["term"] = term
            return url + "?" + urlencode(q)
        first = items[0][key] if items else pivot
        last = items[-1][key] if items else pivot
        # Past the end (an empty next page), previous is the last page.
        previous = link("last") if not items and page == "next" else link("previous", first)
        paging = {"first": link("first"), "last": link("last"),
                  "next": link("next", last), "previous": previous}
        return json_response({"items": items, "paging": paging})

    async def add(request):
        domain, kind = parts(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        now = ctx.clock()
        body = form.json_body
        if isinstance(body, list):
            if len(body) >= tl.MAX_BATCH:
                raise InputError(f"Batch size should be less than {tl.MAX_BATCH}")
            entries = [tl.normalize_entry(kind, item, now) for item in body]
            n = await store.write(tl.add_sync, kind, domain, entries)
            noun = "complaint addresses" if kind == "complaints" else "addresses"
            return json_response({"message": f"{n} {noun} have been added to the {ADDED[kind]} table"})
        files = form.files_named("file")
        if files:
            entries = tl.parse_csv(kind, files[0].data, now)
            await store.write(tl.add_sync, kind, domain, entries)
            return json_response({"message": "file uploaded successfully"})
        item = {k: form.get(k) for k in ("address", "domain", "code", "error", "created_at", "reason")}
        if kind == "unsubscribes":
            tags = form.getall("tags") or form.getall("tag")
            item["tags"] = (tags[0] if len(tags) == 1 and isinstance(tags[0], (str, list)) else tags) or None
        entry = tl.normalize_entry(kind, item, now)
        await store.write(tl.add_sync, kind, domain, [entry])
        if kind == "whitelists":
            what = "Address" if entry["type"] == "address" else "Domain"
            return json_response({"message": f"{what} has been added to the allowlist",
                                  "type": entry["type"], "value": entry["value"]})
        return json_response({"message": f"Address has been added to the {ADDED[kind]} table",
                              "address": entry["address"]})

    async def import_csv(request):
        domain, kind = parts(request)
        form = await read_form(request, ctx.config.api.max_request_bytes)
        files = form.files_named("file") or form.files
        if not files:
            raise InputError("'file' parameter is missing")
        entries = tl.parse_csv(kind, files[0].data, ctx.clock())
        await store.write(tl.add_sync, kind, domain, entries)
        return json_response({"message": "file uploaded successfully"})

    async def get_one(request):
        domain, kind = parts(request)
        address = unquote(request.match_info["address"])
        return json_response(await store.read(tl.get_sync, kind, domain, address))

    async def delete_one(request):
        domain, kind = parts(request)
        address = unquote(request.match_info["address"])
        tag = query(request).str("tag") if kind == "unsubscribes" else None
        await store.write(tl.delete_sync, kind, domain, address, tag)
        key = "value" if kind == "whitelists" else "address"
        return json_response({"message": REMOVED_ONE[kind], key: address.strip().lower()})

    async def delete_all(request):
        domain, kind = parts(request)
        await store.write(tl.delete_all_sync, kind, domain)
        return json_response({"message": REMOVED_ALL[kind]})

    base = "/v3/{domain}/{kind:bounces|unsubscribes|complaints|whitelists}"
    app.router.add_get(base, list_)
    app.router.add_post(base, add)
    app.router.add_delete(base, delete_all)
    app.router.add_post(base + "/import", import_csv)
    app.router.add_get(base + "/{address}", get_one)
    app.router.add_delete(base + "/{address}", delete_one)
