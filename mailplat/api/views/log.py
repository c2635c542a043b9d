"""The legacy log: GET /v3/<domain>/log?skip=&limit= as the seed shows it
({total_count, items[{hap, created_at, message, type, message_id}]}, newest first), read from
the events table."""
from __future__ import annotations

from urllib.parse import unquote

from aiohttp import web

from ...core.context import Context
from ...core.timefmt import rfc2822
from ...errors import NotFound
from ...store.models import Domain, Event
from ..forms import query
from ..middleware import json_response

TYPES = {"failed": "error", "rejected": "warn", "complained": "warn"}


def _line(data: dict) -> str:
    headers = (data.get("message") or {}).get("headers") or {}
    sender = (data.get("envelope") or {}).get("sender") or headers.get("from", "")
    to = data.get("recipient", "")
    subject = headers.get("subject", "")
    verb = {"accepted": "Accepted", "delivered": "Delivered", "failed": "Failed", "opened": "Opened",
            "clicked": "Clicked", "unsubscribed": "Unsubscribed", "complained": "Complained",
            "stored": "Stored", "rejected": "Rejected"}.get(data.get("event"), str(data.get("event")).title())
    line = f"{verb}: {sender} \u2192 {to} '{subject}'"
    status = data.get("delivery-status") or {}
    if data.get("event") == "failed" and status.get("message"):
        line += f" {status.get('code', '')} {status['message']}"
    return line


def _log_sync(domain: str, skip: int, limit: int) -> dict:
    if Domain.get_or_none(Domain.name == domain) is None:
        raise NotFound("Domain not found")
    total = Event.select().where(Event.domain == domain).count()
    rows = (Event.select(Event.data).where(Event.domain == domain)
            .order_by(Event.timestamp.desc(), Event.id.desc()).offset(skip).limit(limit).tuples())
    items = []
    for (data,) in rows:
        items.append({"hap": data.get("event"), "created_at": rfc2822(data.get("timestamp")),
                      "message": _line(data), "type": TYPES.get(data.get("event"), "info"),
                      "message_id": ((data.get("message") or {}).get("headers") or {}).get("message-id", "")})
    return {"total_count": total, "items": items}


def setup(app: web.Application, ctx: Context) -> None:
    async def log(request):
        domain = unquote(request.match_info["domain"]).strip().lower()
        form = query(request)
        return json_response(await ctx.store.read(_log_sync, domain, form.int("skip", 0, lo=0, hi=1_000_000),
                                                  form.int("limit", 100, lo=1, hi=300)))

    app.router.add_get("/v3/{domain}/log", log)
