"""Who may do what: API keys, password hashes and logins.

Owns: creating, listing and revoking API keys (stored as SHA-256 of a high-entropy secret,
found by their public id and compared in constant time); argon2id password hashing (run in a
thread, never on the event loop); the SMTP/IMAP/POP3 login lookup (`check_login`) that serves
domain SMTP credentials and, once they exist, mailbox passwords; and the scope rule for keys.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..errors import AuthError, ForbiddenError, InputError, NotFound
from ..store import db as storedb
from ..store.models import ApiKey, Domain, SmtpCredential

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
KEY_CACHE_SECONDS = 2.0


# -- passwords ----------------------------------------------------------------------------
def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Constant-ish time: an unknown user is checked against a dummy hash."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


async def hash_password_async(password: str) -> str:
    return await asyncio.to_thread(hash_password, password)


# -- API keys -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str  # admin | sending
    domain: str | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self) -> None:
        if not self.is_admin:
            raise ForbiddenError("Forbidden: a domain sending key may only send messages")

    def require_sending(self, domain: str) -> None:
        if not self.is_admin and self.domain != domain:
            raise ForbiddenError("Forbidden: this key may not send for this domain")


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_secret() -> tuple[str, str]:
    """Returns (key_id, whole key). The key reads `key-<id>-<secret>`."""
    key_id = secrets.token_hex(6)
    return key_id, f"key-{key_id}-{secrets.token_hex(16)}"


def create_key_sync(role: str = "admin", domain: str | None = None, description: str = "",
                    is_primary: bool = False) -> tuple[ApiKey, str]:
    if role not in ("admin", "sending"):
        raise InputError("role must be admin or sending")
    if role == "sending":
        if not domain:
            raise InputError("domain is required for a sending key")
        if Domain.get_or_none(Domain.name == domain) is None:
            raise NotFound("Domain not found")
    elif domain:
        raise InputError("an admin key has no domain")
    key_id, key = new_key_secret()
    row = ApiKey.create(key_id=key_id, key_hash=_key_hash(key), role=role, domain=domain,
                        description=description[:255], is_primary=is_primary)
    return row, key


def list_keys_sync() -> list[ApiKey]:
    return list(ApiKey.select().where(ApiKey.revoked_at.is_null()).order_by(ApiKey.created_at))


def revoke_key_sync(key_id: str) -> None:
    n = (ApiKey.update(revoked_at=time.time())
         .where((ApiKey.key_id == key_id) & ApiKey.revoked_at.is_null()).execute())
    if not n:
        raise NotFound("Key not found")


def has_primary_key_sync() -> bool:
    return ApiKey.select().where(ApiKey.is_primary & ApiKey.revoked_at.is_null()).exists()


def key_json(row: ApiKey) -> dict:
    from .timefmt import rfc2822
    return {"id": row.key_id, "role": row.role, "domain_name": row.domain,
            "description": row.description, "created_at": rfc2822(row.created_at),
            "is_primary": row.is_primary}


class KeyChecker:
    """Authenticates `api:<key>` with a short in-memory cache, so a hot API does not hit the
    store for every request (revocation takes effect within KEY_CACHE_SECONDS)."""

    def __init__(self, store: storedb.Store):
        self.store = store
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    async def authenticate(self, key: str) -> Principal:
        parts = key.split("-")
        if len(parts) != 3 or parts[0] != "key" or not parts[1] or len(key) > 128:
            # Still spend a hash compare so malformed keys are not distinguishable by timing.
            hmac.compare_digest(_key_hash(key), _key_hash("key-x-x"))
            raise AuthError("Invalid private key")
        key_id = parts[1]
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None or now - cached[0] > KEY_CACHE_SECONDS:
            row = await self.store.read(
                lambda: ApiKey.get_or_none((ApiKey.key_id == key_id) & ApiKey.revoked_at.is_null()))
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_id] = (now, row)
        else:
            row = cached[1]
        expected = row.key_hash if row is not None else _key_hash("key-x-x")
        if not hmac.compare_digest(_key_hash(key), expected) or row is None:
            raise AuthError("Invalid private key")
        return Principal(key_id=row.key_id, role=row.role, domain=row.domain)


# -- logins (SMTP submission, IMAP, POP3) -------------------------------------------------
LOGIN_SOURCES: list = []  # extra lookups: fn(login) -> (hash, domain) | None, e.g. mailboxes


def register_login_source(fn) -> None:
    if fn not in LOGIN_SOURCES:
        LOGIN_SOURCES.append(fn)


def _login_row(login: str) -> tuple[str, str] | None:
    cred = (SmtpCredential.select(SmtpCredential.password_hash, Domain.name)
            .join(Domain).where(SmtpCredential.login == login).tuples().first())
    if cred:
        return cred
    for source in LOGIN_SOURCES:
        found = source(login)
        if found:
            return found
    return None


async def check_login(store: storedb.Store, login: str, password: str) -> str | None:
    """Returns the login's domain when the password is right, else None (no enumeration)."""
    from . import mailboxes  # noqa: F401 - registers the mailbox login source in every service
    login = login.strip().lower()
    found = await store.read(_login_row, login) if "@" in login and len(login) <= 320 else None
    ok = await asyncio.to_thread(verify_password, found[0] if found else None, password)
    return found[1] if ok and found else None
