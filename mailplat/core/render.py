"""Per-recipient rendering, done by the relay just before signing: recipient variables
(%recipient%, %recipient.x%), and later tracking links, pixel and unsubscribe footers.

`for_recipient` returns the exact bytes to sign and send to one recipient.  A message that
needs no per-recipient change is returned byte for byte as stored.
"""
from __future__ import annotations

from ..store.models import Message


def for_recipient(message: Message, raw: bytes, recipient: str) -> bytes:
    if not message.recipient_variables:
        return raw
    raise NotImplementedError("recipient-variables rendering")  # filled in by the sending work
