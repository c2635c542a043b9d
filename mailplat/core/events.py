"""Events: building Mailgun-shaped event records and storing them.

Owns the event JSON (`build`) and its rows (`record_sync`, called inside the same transaction
as the change it describes): the Event and its EventText, the lower-cased text the events API's
text filters search (core.eventquery.search_text).  Every service that makes something happen to mail records it
here; the events API (api/views/events.py) reads them.
"""
from __future__ import annotations

import secrets
import time

from ..store.db import insert_rows
from ..store.models import Event, EventText, Message
from .eventquery import search_text


# fn(domain, data) run inside record_sync's transaction after the row is written: webhooks
# queue their posts, stats count, tags note their use (core.webhooks registers them).
RECORD_HOOKS: list = []


def register_record_hook(fn) -> None:
    """`fn(domain, data)`; a hook may carry `fn.many(domain, datas)`, which record_many_sync
    calls once for a batch instead (stats: one upsert for a send's events, not one each)."""
    if fn not in RECORD_HOOKS:
        RECORD_HOOKS.append(fn)


def new_event_id() -> str:
    return secrets.token_urlsafe(16)[:22]


def build(kind: str, message: Message | None, recipient: str = "", *, timestamp: float | None = None,
          severity: str | None = None, reason: str | None = None, delivery_status: dict | None = None,
          extra: dict | None = None) -> dict:
    """The event as the events API and webhooks show it."""
    data: dict = {
        "id": new_event_id(),
        "event": kind,
        "timestamp": round(timestamp if timestamp is not None else time.time(), 6),
        "recipient": recipient,
        "log-level": {"failed": "error", "rejected": "warn"}.get(kind, "info"),
    }
    if recipient and "@" in recipient:
        data["recipient-domain"] = recipient.rsplit("@", 1)[1]
    if message is not None:
        options = message.options or {}
        data.update({
            "message": {
                "headers": message.headers,
                "attachments": message.attachments,
                "size": message.size,
            },
            "envelope": {
                "sender": message.sender,
                "targets": recipient,
                "transport": "smtp",
            },
            "tags": message.tags,
            "campaigns": [{"id": c, "name": c} for c in message.campaigns],
            "user-variables": message.user_variables,
            "flags": {
                "is-test-mode": bool(options.get("testmode")),
                "is-authenticated": True,
                "is-routed": message.source == "route",
                "is-big": message.size > 10 * 1024 * 1024,
                "is-system-test": False,
            },
            "method": "smtp" if message.source == "smtp" else "http",
        })
        if message.recipient_variables and recipient in message.recipient_variables:
            data["user-variables"] = {**message.user_variables,
                                      **{k: v for k, v in _as_dict(message.recipient_variables.get(recipient)).items()
                                         if not k.startswith("%")}}  # "%list": core.lists' render data
    if severity:
        data["severity"] = severity
    if reason:
        data["reason"] = reason
    if delivery_status is not None:
        data["delivery-status"] = delivery_status
    if extra:
        data.update(extra)
    return data


def _as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _row(domain: str, data: dict) -> dict:
    message_id = ""
    if isinstance(data.get("message"), dict):
        message_id = (data["message"].get("headers") or {}).get("message-id", "")
    return {"event_id": data["id"], "domain": domain, "event": data["event"],
            "timestamp": data["timestamp"], "recipient": data.get("recipient", "")[:320],
            "message_id": message_id[:255], "severity": data.get("severity", ""), "data": data}


def record_sync(domain: str, data: dict) -> None:
    """Store an event built by `build`; call inside the transaction of the change it describes."""
    row_id = Event.insert(**_row(domain, data)).execute()
    EventText.insert(event=row_id, **search_text(data)).execute()
    for hook in RECORD_HOOKS:
        hook(domain, data)


def record_many_sync(domain: str, datas: list[dict]) -> None:
    """record_sync for several events of one change: multi-row INSERTs, batched hooks."""
    if not datas:
        return
    for i in range(0, len(datas), 100):
        chunk = datas[i:i + 100]
        ids = insert_rows(Event, [_row(domain, d) for d in chunk], returning_ids=True)
        insert_rows(EventText, [{"event": row_id, **search_text(d)} for row_id, d in zip(ids, chunk)])
    for hook in RECORD_HOOKS:
        many = getattr(hook, "many", None)
        if many is not None:
            many(domain, datas)
        else:
            for data in datas:
                hook(domain, data)


from . import webhooks as _webhooks  # noqa: E402,F401 - registers the webhook/stats/tag hooks
