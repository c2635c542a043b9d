"""Messages kept by a route's store() action: reading them back (parsed JSON with attachment
URLs, or the raw MIME) and resending them through core.send.

Owns the lookup by domain and key (404 "Message not found" when unknown or expired), the JSON
shape (Mailgun's stored-message fields: recipients, sender, from, subject, body-plain,
stripped-text, stripped-signature, body-html, stripped-html, attachments [{url, name, size,
content-type}], message-headers, content-id-map) and resend.  Called by
api/views/stored_messages.py; rows are written by core.routejobs.
"""
from __future__ import annotations

import asyncio

from ..errors import InputError, NotFound
from ..store import blobs
from ..store.route_models import StoredMessage
from . import forward, send


async def load(ctx, domain: str, key: str) -> tuple[StoredMessage, bytes]:
    now = ctx.clock()

    def read():
        row = StoredMessage.get_or_none((StoredMessage.key == key) & (StoredMessage.domain == domain.lower()))
        if row is None or row.expires_at < now:
            raise NotFound("Message not found")
        return row, blobs.get_sync(row.blob)
    return await ctx.store.read(read)


async def as_json(ctx, domain: str, key: str, base_url: str) -> dict:
    row, raw = await load(ctx, domain, key)
    fields, files, cid_map, headers = await asyncio.to_thread(forward.parsed, raw, row.recipient, row.sender)
    out = {k: v for k, v in fields if k != "recipient"}
    out["recipients"] = row.recipient
    base = f"{base_url}/v3/domains/{domain.lower()}/messages/{key}/attachments"
    atts = []
    by_field = {}
    for i, (fname, filename, ctype, data) in enumerate(files):
        item = {"url": f"{base}/{i}", "name": filename, "size": len(data), "content-type": ctype}
        atts.append(item)
        by_field[fname] = item
    out["attachments"] = atts
    out["content-id-map"] = {cid: by_field[f] for cid, f in cid_map.items() if f in by_field}
    out["message-headers"] = [[n, v] for n, v in headers]
    return out


async def as_mime(ctx, domain: str, key: str) -> dict:
    row, raw = await load(ctx, domain, key)
    fields, _, _, _ = await asyncio.to_thread(forward.parsed, raw, row.recipient, row.sender)
    f = dict(fields)
    return {"recipients": row.recipient, "sender": row.sender, "from": f.get("from", ""),
            "subject": f.get("subject", ""), "body-mime": raw.decode("utf-8", "replace")}


async def attachment(ctx, domain: str, key: str, index: int) -> tuple[str, str, bytes]:
    row, raw = await load(ctx, domain, key)
    _, files, _, _ = await asyncio.to_thread(forward.parsed, raw, row.recipient, row.sender)
    if not 0 <= index < len(files):
        raise NotFound("Attachment not found")
    _, filename, ctype, data = files[index]
    return filename, ctype, data


async def resend(ctx, domain: str, key: str, to: list[str], principal=None) -> send.SendResult:
    if not [t for t in to if t and t.strip()]:
        raise InputError("'to' parameter is missing")
    row, raw = await load(ctx, domain, key)
    return await send.submit(ctx, send.SendRequest(domain=domain.lower(), source="route", mime=raw,
                                                   to=to), principal)
