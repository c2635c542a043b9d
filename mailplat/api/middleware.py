"""HTTP edge rules: authentication, scopes, rate limits and the error translator.

Every handler is private unless marked `@public`; admin-only unless marked `@sending` (then a
domain sending key may call it too, and the handler checks the domain).  Every error leaves as
JSON `{"message": ...}` with the spec's status; an unknown path is a 404 JSON; our own bugs are
a generic 500 with details only in the log.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections import deque

from aiohttp import web

from .. import logs
from ..core.auth import KeyChecker
from ..errors import AuthError, MailplatError, RateLimited

log = logs.get("mailplat.api")
JSON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def public(handler):
    handler._public = True
    return handler


def sending(handler):
    handler._sending = True
    return handler


def rate_limited(bucket: str):
    def mark(handler):
        handler._rate_bucket = bucket
        return handler
    return mark


def json_response(data, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json",
                        headers={**JSON_HEADERS, **(headers or {})})


def error_response(status: int, message: str, **extra) -> web.Response:
    return json_response({"message": message, **extra}, status=status)


class RateLimiter:
    """Sliding one-minute window per (bucket, account)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.hits: dict[tuple, deque] = {}

    def check(self, key: tuple) -> None:
        now = time.monotonic()
        window = self.hits.setdefault(key, deque())
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= self.per_minute:
            retry = max(1, int(60.0 - (now - window[0])) + 1)
            raise RateLimited("Too many requests", retry_seconds=retry)
        window.append(now)


def _basic_key(header: str) -> str:
    if not header or len(header) > 1024:
        raise AuthError("Invalid private key")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise AuthError("Invalid private key")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise AuthError("Invalid private key") from None
    user, sep, key = decoded.partition(":")
    if not sep or user != "api":
        raise AuthError("Invalid private key")
    return key


def make_middlewares(keys: KeyChecker, limiter: RateLimiter):
    @web.middleware
    async def errors(request: web.Request, handler):
        request_id = uuid.uuid4().hex[:12]
        with logs.context(request_id=request_id, method=request.method, path=request.path):
            try:
                return await handler(request)
            except RateLimited as exc:
                return json_response({"message": exc.message, "retry-seconds": exc.retry_seconds},
                                     status=429, headers={"Retry-After": str(exc.retry_seconds)})
            except MailplatError as exc:
                if exc.http_status >= 500:
                    log.error("request failed: %s", exc.message)
                return error_response(exc.http_status, exc.message, **exc.extra)
            except web.HTTPException as exc:
                if exc.content_type == "application/json" and exc.text:
                    return json_response(json.loads(exc.text), status=exc.status, headers=dict(exc.headers))
                message = {404: "Not found", 405: "Method not allowed",
                           413: "Request entity too large"}.get(exc.status, exc.reason)
                if exc.status < 400:
                    raise
                return error_response(exc.status, message)
            except Exception:  # noqa: BLE001 - our bug: log it, answer generically
                log.exception("unhandled error")
                return error_response(500, "Internal server error")

    @web.middleware
    async def auth(request: web.Request, handler):
        target = getattr(handler, "__wrapped__", handler)
        if getattr(target, "_public", False) or getattr(handler, "_public", False):
            return await handler(request)
        if request.match_info.http_exception is not None:
            raise request.match_info.http_exception
        principal = await keys.authenticate(_basic_key(request.headers.get("Authorization", "")))
        if not principal.is_admin and not getattr(target, "_sending", False):
            principal.require_admin()
        request["principal"] = principal
        logs.bind(key_id=principal.key_id)
        bucket = getattr(target, "_rate_bucket", None)
        if bucket:
            limiter.check((bucket, "account"))
        return await handler(request)

    return [errors, auth]
