"""VERP return paths: the envelope sender the relay uses so that bounces come back to us.

Owns the address `bounce+<token>@<sending domain>`: the token names one queue row (one
recipient of one message) and carries an HMAC over the row id and the domain, keyed by a key
derived from the installation's TrackingSecret (a different derivation from the link tokens of
core.tracking), truncated to 80 bits.  Tokens are lower-case hex, so an MTA that lower-cases
local parts does not break them.  The relay (relay.worker) asks `return_path_sync` for the
MAIL FROM of API and SMTP submitted mail and of list copies; core.receive asks `claim_sync` at RCPT (a valid
token is accepted, a forged one is 550 5.1.1 whoever else would take the address); core.feedback
asks `queue_id_for` to map a DSN arriving at such an address to its exact message and recipient.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import threading

from ..store.tracking_models import TrackingSecret

PREFIX = "bounce+"
SOURCES = ("api", "smtp", "list")  # route forwards keep the original sender
MAC_HEX = 20  # 80 bits
_TOKEN = re.compile(r"^([0-9a-f]{1,15})-([0-9a-f]{%d})$" % MAC_HEX)
_key: bytes | None = None
_lock = threading.Lock()


def key_sync() -> bytes | None:
    """The HMAC key (read inside a store transaction the first time; cached afterwards)."""
    global _key
    if _key is not None:
        return _key
    row = TrackingSecret.get_or_none(TrackingSecret.id == "tracking")
    if row is None:
        return None
    with _lock:
        _key = hashlib.sha256(b"mailplat-verp:" + row.secret.encode()).digest()
    return _key


def _mac(key: bytes, queue_id: int, domain: str) -> str:
    return hmac.new(key, f"{queue_id}:{domain.lower()}".encode(), hashlib.sha256).hexdigest()[:MAC_HEX]


def make_address(key: bytes, queue_id: int, domain: str) -> str:
    return f"{PREFIX}{queue_id:x}-{_mac(key, queue_id, domain)}@{domain.lower()}"


def return_path_sync(message, queue_id: int) -> str:
    """Inside a store read: the MAIL FROM for this copy.  The null sender stays null; mail that
    is forwarded by a route keeps its stored sender."""
    sender = message.sender or ""
    if not sender or message.source not in SOURCES:
        return sender
    key = key_sync()
    if key is None:
        return sender
    return make_address(key, queue_id, message.domain)


def is_verp(local: str) -> bool:
    return local.lower().startswith(PREFIX)


def queue_id_for(key: bytes | None, local: str, domain: str) -> int | None:
    """The queue row id a VERP local part names, or None if it is not one we made."""
    if key is None or not is_verp(local):
        return None
    m = _TOKEN.match(local[len(PREFIX):].lower())
    if m is None:
        return None
    queue_id = int(m.group(1), 16)
    if not hmac.compare_digest(_mac(key, queue_id, domain), m.group(2)):
        return None
    return queue_id


def claim_sync(local: str, domain: str) -> bool | None:
    """core.receive's RCPT check, inside a store read: None when the address is no VERP address
    (others decide), True for a valid token, False for a forged or malformed one."""
    if not is_verp(local):
        return None
    return queue_id_for(key_sync(), local, domain) is not None
