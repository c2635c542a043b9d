"""Webhooks: which events a domain wants posted, and the posts themselves.

Owns the webhook ids (accepted, delivered, opened, clicked, unsubscribed (also spelt
`unsubscribe`), complained, permanent_fail, temporary_fail, and the legacy form-post ids
bounce, deliver, drop, open, click, spam), the Webhook rows behind
/v3/domains/<d>/webhooks, and `on_event`: a core.events record hook that runs inside the
transaction recording an event and (1) counts it for stats (core.stats), (2) queues one outbox
row (store.route_models.OutboxItem) per matching URL.  So a post is owed exactly when the event
commits, and the hooks service's poster (hooks/outbox.py) delivers it through the egress guard
with the [tracking] webhook retry schedule; 406 stops; a delivered-event post goes once.

A JSON post is {"signature": {"timestamp", "token", "signature"}, "event-data": {...}} with
signature = hex(HMAC-SHA256(signing key, timestamp + token)) (core.signing); a legacy post is
form-encoded with the same three fields.  Every post also carries
`X-Mailplat-Signature: sha256=<hex HMAC-SHA256(signing key, whole body)>`, which Mailgun lacks.
A URL with user:password@ is called with HTTP Basic auth (the userinfo leaves the URL).
Also here: `replay_failed_sync` (the CLI's `mailplat webhooks replay`) and the events
retention purge (`run_retention`, started by the hooks service; [tracking]
events_retention_days, 0 = forever).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

from ..errors import InputError, NotFound
from ..store import db as storedb
from ..store.route_models import OutboxItem
from ..store.tracking_models import Webhook
from . import events, signing, stats

KINDS = ("accepted", "clicked", "complained", "delivered", "opened", "permanent_fail",
         "temporary_fail", "unsubscribed")
LEGACY_KINDS = ("bounce", "click", "deliver", "drop", "open", "spam")
ALIASES = {"unsubscribe": "unsubscribed"}
MAX_URLS = 3
BODY_SIGNATURE_HEADER = "X-Mailplat-Signature"
_SUPPRESS_REASONS = ("suppress-bounce", "suppress-unsubscribe", "suppress-complaint", "old", "maxfails")
CACHE_SECONDS = 2.0

_cache: dict[str, tuple[float, dict]] = {}
_cache_lock = threading.Lock()


def normalize_kind(kind: str, allow_legacy: bool = True) -> str:
    k = (kind or "").strip().lower()
    k = ALIASES.get(k, k)
    if k in KINDS or (allow_legacy and k in LEGACY_KINDS):
        return k
    raise InputError(f"Invalid webhook id '{kind}'. Valid ids: {', '.join(KINDS + LEGACY_KINDS)}")


def kinds_for(data: dict) -> list[str]:
    """The webhook ids an event triggers."""
    ev = data.get("event")
    sev = data.get("severity")
    reason = data.get("reason", "")
    if ev == "failed":
        if sev == "permanent":
            return ["permanent_fail", "drop" if reason in _SUPPRESS_REASONS else "bounce"]
        return ["temporary_fail"]
    return {"accepted": ["accepted"], "delivered": ["delivered", "deliver"], "opened": ["opened", "open"],
            "clicked": ["clicked", "click"], "unsubscribed": ["unsubscribed"],
            "complained": ["complained", "spam"]}.get(ev, [])


def invalidate(domain: str | None = None) -> None:
    _key_cache[0] = 0.0
    with _cache_lock:
        if domain is None:
            _cache.clear()
        else:
            _cache.pop(domain, None)


def _hooks_of(domain: str) -> dict:
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(domain)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
    found = {k: list(u) for k, u in Webhook.select(Webhook.kind, Webhook.urls)
             .where(Webhook.domain == domain).tuples()}
    with _cache_lock:
        _cache[domain] = (now, found)
    return found


# -- building posts -------------------------------------------------------------------------------
def split_auth(url: str) -> tuple[str, dict]:
    """(URL without userinfo, headers with Basic auth when the URL had user:password@)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, {}
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    cred = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return clean, {"Authorization": "Basic " + base64.b64encode(cred.encode()).decode()}


def body_signature(key: str, body: bytes) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def json_body(data: dict, sig: dict) -> bytes:
    return json.dumps({"signature": sig, "event-data": data}, separators=(",", ":")).encode()


def legacy_body(kind: str, domain: str, data: dict, sig: dict) -> bytes:
    """The legacy form post: event, recipient, domain, message-headers, custom variables,
    timestamp, token, signature (and per kind: code/error, reason, url, ip...)."""
    msg = data.get("message") or {}
    headers = msg.get("headers") or {}
    status = data.get("delivery-status") or {}
    client = data.get("client-info") or {}
    fields: list[tuple[str, str]] = []
    name = {"bounce": "bounced", "deliver": "delivered", "drop": "dropped", "open": "opened",
            "click": "clicked", "spam": "complained"}[kind]
    fields.append(("event", name))
    fields.append(("recipient", data.get("recipient", "")))
    fields.append(("domain", domain))
    fields.append(("message-headers", json.dumps([[k.title(), v] for k, v in headers.items()])))
    fields.append(("Message-Id", f"<{headers.get('message-id', '')}>"))
    for k, v in (data.get("user-variables") or {}).items():
        fields.append((str(k), v if isinstance(v, str) else json.dumps(v)))
    for tag in data.get("tags") or []:
        fields.append(("tag", str(tag)))
    if kind == "bounce":
        fields += [("code", str(status.get("code", ""))), ("error", status.get("message", "")),
                   ("notification", status.get("description", ""))]
    elif kind == "drop":
        reason = data.get("reason", "")
        # The seed's two words: a soft bounce retried until the limit is "maxfails", anything
        # else (hard bounce, do-not-send list) "hardfail".
        legacy_reason = "maxfails" if reason in ("old", "maxfails") else "hardfail"
        fields += [("reason", legacy_reason), ("code", str(status.get("code", ""))),
                   ("description", status.get("description") or status.get("message", ""))]
    elif kind in ("open", "click"):
        geo = data.get("geolocation") or {}
        fields += [("ip", data.get("ip", "")), ("country", geo.get("country", "")),
                   ("city", geo.get("city", "")), ("region", geo.get("region", "")),
                   ("client-name", client.get("client-name", "")),
                   ("client-os", client.get("client-os", "")),
                   ("client-type", client.get("client-type", "")),
                   ("device-type", client.get("device-type", "")),
                   ("user-agent", client.get("user-agent", ""))]
        if kind == "click":
            fields.append(("url", data.get("url", "")))
    fields += [("timestamp", sig["timestamp"]), ("token", sig["token"]), ("signature", sig["signature"])]
    return urlencode(fields).encode()


def enqueue_sync(domain: str, kind: str, url: str, data: dict, key: str, now: float) -> int:
    sig = signing.new_signature(key, now)
    if kind in LEGACY_KINDS:
        body, ctype = legacy_body(kind, domain, data, sig), "application/x-www-form-urlencoded"
    else:
        body, ctype = json_body(data, sig), "application/json"
    target, headers = split_auth(url)
    headers[BODY_SIGNATURE_HEADER] = body_signature(key, body)
    # Mailgun posts a delivered event once and does not retry it.
    outbox_kind = "webhook-once" if data.get("event") == "delivered" else "webhook"
    return OutboxItem.insert(kind=outbox_kind, url=target, body=body, content_type=ctype,
                             headers=headers, domain=domain, state="queued", attempts=0,
                             next_attempt_at=now, created_at=now, updated_at=now).execute()


def on_event(domain: str, data: dict) -> None:
    """core.events record hook (inside the event's transaction)."""
    stats.count_sync(domain, data)
    _enqueue_for(domain, data)


def on_events(domain: str, datas: list[dict]) -> None:
    """The same for a batch of events (core.events.record_many_sync): stats in one upsert,
    the domain's webhook configuration looked up once."""
    stats.count_many_sync(domain, datas)
    if not _hooks_of(domain):
        return
    for data in datas:
        _enqueue_for(domain, data)


on_event.many = on_events


def _enqueue_for(domain: str, data: dict) -> None:
    hooks = _hooks_of(domain)
    if not hooks:
        return
    key = None
    # The event's own time (the committing transaction's clock) stamps the signature and the row.
    now = float(data.get("timestamp") or time.time())
    for kind in kinds_for(data):
        for url in hooks.get(kind, ()):
            key = key or _signing_key()
            enqueue_sync(domain, kind, url, data, key, now)


_key_cache: list = [0.0, ""]


def _signing_key() -> str:
    """The signing key, read at most every CACHE_SECONDS (a rotation applies within that)."""
    now = time.monotonic()
    if now - _key_cache[0] >= CACHE_SECONDS or not _key_cache[1]:
        _key_cache[1] = signing.get_key_sync()
        _key_cache[0] = now
    return _key_cache[1]


events.register_record_hook(on_event)


# -- the API's reads and writes (run inside store transactions) ---------------------------------
def check_urls(urls: list[str], allow_private: bool) -> list[str]:
    from . import egress
    clean = [u.strip() for u in urls if u and u.strip()]
    if not clean:
        raise InputError("url parameter is missing")
    if len(clean) > MAX_URLS:
        raise InputError(f"A webhook can have at most {MAX_URLS} URLs")
    for u in clean:
        if len(u) > 2000:
            raise InputError("url is too long")
        egress.check_url_static(u, allow_private)
    return clean


def list_sync(domain: str) -> dict:
    return {k: list(u) for k, u in Webhook.select(Webhook.kind, Webhook.urls)
            .where(Webhook.domain == domain).tuples()}


def get_sync(domain: str, kind: str) -> list[str]:
    row = Webhook.get_or_none((Webhook.domain == domain) & (Webhook.kind == kind))
    if row is None:
        raise NotFound("Webhook not found")
    return list(row.urls)


def create_sync(domain: str, kind: str, urls: list[str], now: float) -> None:
    try:
        with Webhook._meta.database.atomic():
            Webhook.create(domain=domain, kind=kind, urls=urls, created_at=now)
    except storedb.IntegrityError:
        raise InputError("Webhook already exists") from None
    invalidate(domain)


def update_sync(domain: str, kind: str, urls: list[str]) -> None:
    if not Webhook.update(urls=urls).where((Webhook.domain == domain) & (Webhook.kind == kind)).execute():
        raise NotFound("Webhook not found")
    invalidate(domain)


def delete_sync(domain: str, kind: str) -> list[str]:
    urls = get_sync(domain, kind)
    Webhook.delete().where((Webhook.domain == domain) & (Webhook.kind == kind)).execute()
    invalidate(domain)
    return urls


def replay_failed_sync(domain: str | None, since: float | None, now: float) -> int:
    """Queue failed webhook posts again (the CLI's `webhooks replay`)."""
    q = OutboxItem.update(state="queued", attempts=0, next_attempt_at=now, last_error="",
                          lease_owner=None, lease_until=None, updated_at=now)
    cond = (OutboxItem.state == "failed") & (OutboxItem.kind.in_(["webhook", "webhook-once"]))
    if domain:
        cond &= OutboxItem.domain == domain
    if since is not None:
        cond &= OutboxItem.created_at >= since
    return q.where(cond).execute()


# -- retention ----------------------------------------------------------------------------------------
PURGE_CHUNK = 5000
PURGE_EVERY = 3600.0


def purge_events_sync(cutoff: float, chunk: int = PURGE_CHUNK) -> int:
    """Delete up to `chunk` events per domain older than `cutoff` (walking the (domain,
    timestamp) index); returns how many went.  Stats counters are kept."""
    from ..store.models import Domain, Event
    gone = 0
    domains = [d for (d,) in Domain.select(Domain.name).tuples()]
    for name in domains:
        ids = [i for (i,) in Event.select(Event.id).where((Event.domain == name) & (Event.timestamp < cutoff))
               .order_by(Event.timestamp).limit(chunk).tuples()]
        if ids:
            gone += Event.delete().where(Event.id.in_(ids)).execute()
    return gone


async def run_retention(ctx, stopping) -> None:
    """Purge events past [tracking] events_retention_days (0 keeps them forever), hourly."""
    import asyncio
    days = getattr(getattr(ctx.config, "tracking", None), "events_retention_days", 0.0)
    if not days or days <= 0:
        return
    while not stopping.is_set():
        try:
            while await ctx.store.write(purge_events_sync, ctx.clock() - days * 86400.0) > 0:
                if stopping.is_set():
                    return
        except Exception:  # noqa: BLE001 - try again next hour
            import logging
            logging.getLogger("mailplat.webhooks").exception("event purge failed")
        try:
            await asyncio.wait_for(stopping.wait(), PURGE_EVERY)
        except asyncio.TimeoutError:
            pass
