"""The outbox: durable HTTP POSTs (route forwards, store() notifications, webhooks later).

Owns `enqueue_sync` (called inside the store write that decides a post is owed, so the post is
never lost and never made before the decision commits), and the poster: it claims due rows with
a lease (FOR UPDATE SKIP LOCKED on PostgreSQL, so several nodes share the outbox), posts each
through the egress guard with redirects off, and records the outcome: 2xx delivered; 406
rejected (the receiver refuses it: no retry); anything else retried on `hooks.retry_schedule`
until `hooks.max_attempts`, then failed.  Rows are generic (url, body bytes, content type,
headers), so webhooks reuse it unchanged.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time

from .. import logs
from ..core import egress, worker
from ..store.route_models import OutboxItem

log = logs.get("mailplat.hooks")

CLAIM = 20
OWNER = f"{socket.gethostname()}:{os.getpid()}"
_wake: asyncio.Event | None = None


def enqueue_sync(kind: str, url: str, body: bytes, content_type: str, headers: dict | None = None,
                 domain: str = "", now: float | None = None) -> int:
    now = time.time() if now is None else now
    return OutboxItem.insert(kind=kind, url=url, body=body, content_type=content_type,
                             headers=headers or {}, domain=domain, state="queued", attempts=0,
                             next_attempt_at=now, created_at=now, updated_at=now).execute()


def wake() -> None:
    if _wake is not None:
        _wake.set()


def _claim(now: float, lease: float, is_postgres: bool) -> list[dict]:
    q = (OutboxItem.select(OutboxItem.id)
         .where((OutboxItem.state == "queued") & (OutboxItem.next_attempt_at <= now)
                & ((OutboxItem.lease_until.is_null()) | (OutboxItem.lease_until < now)))
         .order_by(OutboxItem.next_attempt_at).limit(CLAIM))
    if is_postgres:
        q = q.for_update("FOR UPDATE SKIP LOCKED")
    ids = [r.id for r in q]
    if not ids:
        return []
    OutboxItem.update(lease_owner=OWNER, lease_until=now + lease).where(OutboxItem.id.in_(ids)).execute()
    return [{"id": r.id, "url": r.url, "body": bytes(r.body), "content_type": r.content_type,
             "headers": dict(r.headers or {}), "attempts": r.attempts, "kind": r.kind}
            for r in OutboxItem.select().where(OutboxItem.id.in_(ids))]


def _record(item_id: int, status: int | None, error: str, now: float, schedule, max_attempts: int) -> str:
    row = OutboxItem.get_or_none(OutboxItem.id == item_id)
    if row is None:
        return "gone"
    row.attempts += 1
    row.last_status = status
    row.last_error = error[:1000]
    row.lease_owner = row.lease_until = None
    row.updated_at = now
    if status is not None and 200 <= status < 300:
        row.state = "delivered"
    elif status == 406:
        row.state = "rejected"
    elif row.attempts >= max_attempts:
        row.state = "failed"
    else:
        row.next_attempt_at = now + schedule[min(row.attempts - 1, len(schedule) - 1)]
    row.save()
    return row.state


async def _post(session, item: dict, allow_private: bool) -> tuple[int | None, str]:
    try:
        # aiohttp connects to an IP literal without asking the resolver: check those here.
        egress.check_url_static(item["url"], allow_private)
    except egress.EgressRefused as exc:
        return None, f"{exc.message}: mailplat may not call it"
    headers = {"Content-Type": item["content_type"], "User-Agent": "mailplat-hooks/1.0",
               **item["headers"]}
    try:
        async with session.post(item["url"], data=item["body"], headers=headers,
                                allow_redirects=False) as resp:
            await resp.read()
            return resp.status, "" if resp.status < 300 else f"HTTP {resp.status}"
    except egress.EgressRefused as exc:
        return None, exc.message
    except Exception as exc:  # noqa: BLE001 - any failure to post is retried
        return None, f"{type(exc).__name__}: {exc}"[:500]


def _schedule(config, kind: str) -> tuple:
    """Webhooks keep Mailgun's schedule ([tracking] webhook_*); a `webhook-once` row (the
    delivered event) is posted once.  Other kinds follow [hooks]."""
    tracking = getattr(config, "tracking", None)
    if kind.startswith("webhook") and tracking is not None:
        once = kind == "webhook-once"
        return tracking.webhook_retry_schedule, 1 if once else tracking.webhook_max_attempts
    return config.hooks.retry_schedule, config.hooks.max_attempts


async def deliver_due(ctx, session) -> int:
    """Post every due row once; returns how many were attempted."""
    hooks = ctx.config.hooks
    total = 0
    while True:
        items = await ctx.store.write_background(_claim, ctx.clock(), hooks.timeout * 2 + 30, ctx.store.is_postgres)
        if not items:
            return total
        results = await asyncio.gather(*(_post(session, it, hooks.allow_private_targets) for it in items))
        for it, (status, error) in zip(items, results):
            schedule, max_attempts = _schedule(ctx.config, it["kind"])
            state = await ctx.store.write_background(_record, it["id"], status, error, ctx.clock(),
                                          schedule, max_attempts)
            log.info("hook post", extra={"fields": {"outbox": it["id"], "status": status, "state": state,
                                                    "error": error}})
        total += len(items)
        if len(items) < CLAIM:
            return total


async def run(ctx, stopping: asyncio.Event, poll: float = 0.5) -> None:
    global _wake
    _wake = asyncio.Event()
    hooks = ctx.config.hooks
    async with egress.session(hooks.allow_private_targets, hooks.timeout) as session:
        await worker.poll_loop("outbox", stopping, _wake, lambda: deliver_due(ctx, session), poll)
    _wake = None
