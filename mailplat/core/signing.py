"""The account's HTTP signing key: what route forward() posts, store() notifications and
(later) webhooks are signed with.

Owns the key (random, stored in the store's SigningKey table, created on first use) and the
signature Mailgun's receivers verify: hex(HMAC-SHA256(key, timestamp + token)) with a fresh
50-character token per post.  The webhooks issue adds GET/POST /v5/accounts/http_signing_key on
top of `get_key`/`rotate_key`.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from ..store import db as storedb
from ..store.route_models import SigningKey

KEY_ID = "account"


def _new_key() -> str:
    return "key-" + secrets.token_hex(16)


def get_key_sync() -> str:
    """Inside a store write (or read followed by a write): the key, created if missing."""
    row = SigningKey.get_or_none(SigningKey.id == KEY_ID)
    if row is not None:
        return row.key
    key = _new_key()
    try:
        with SigningKey._meta.database.atomic():
            SigningKey.create(id=KEY_ID, key=key, created_at=time.time())
    except storedb.IntegrityError:
        return SigningKey.get(SigningKey.id == KEY_ID).key
    return key


async def get_key(ctx) -> str:
    row = await ctx.store.read(lambda: SigningKey.get_or_none(SigningKey.id == KEY_ID))
    if row is not None:
        return row.key
    return await ctx.store.write(get_key_sync)


async def rotate_key(ctx) -> str:
    key = _new_key()

    def write():
        SigningKey.delete().where(SigningKey.id == KEY_ID).execute()
        SigningKey.create(id=KEY_ID, key=key, created_at=time.time())
        return key
    return await ctx.store.write(write)


def sign(key: str, timestamp: str, token: str) -> str:
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def new_signature(key: str, now: float | None = None) -> dict:
    """{"timestamp", "token", "signature"} for one post."""
    timestamp = str(int(now if now is not None else time.time()))
    token = secrets.token_hex(25)  # 50 characters
    return {"timestamp": timestamp, "token": token, "signature": sign(key, timestamp, token)}


def verify(key: str, timestamp: str, token: str, signature: str) -> bool:
    return hmac.compare_digest(sign(key, str(timestamp), str(token)), str(signature))
