"""The MX listener's policy: who may receive mail here, and handing accepted mail to core.

Owns the port-25 decisions that are not wire syntax: domain literals and other domains are
refused at RCPT (554 5.7.1: never an open relay), each recipient is checked with
core.receive.check_recipient during the session (550 5.1.1 for an address of ours that does not
exist), and at end of DATA the message goes to core.receive.accept, which commits the message
and its inbound job; only then is 250 said.  Routing, lists and mailbox delivery run later from
that job (core), never while the client waits.
"""
from __future__ import annotations

import time

from .. import errors, logs
from . import syntax
from .protocol import Session, reply_for

log = logs.get("mailplat.smtpd.mx")

RELAY_DENIED = "554 5.7.1 Relay access denied"
UNKNOWN_USER = "550 5.1.1 Recipient address rejected: user unknown"
# Accepted recipients are remembered this long, so a burst of mail to one address costs one
# store read.  Only acceptances are cached: a new mailbox is reachable at once, and a removed
# one is refused again within the TTL (the inbound job copes with a recipient gone meanwhile).
ACCEPT_TTL = 2.0
_CACHE_MAX = 10_000


class _AcceptedCache:
    def __init__(self):
        self.until: dict[str, float] = {}

    def hit(self, address: str) -> bool:
        until = self.until.get(address)
        if until is None:
            return False
        if until < time.monotonic():
            del self.until[address]
            return False
        return True

    def add(self, address: str) -> None:
        if len(self.until) >= _CACHE_MAX:
            self.until.clear()
        self.until[address] = time.monotonic() + ACCEPT_TTL


_accepted = _AcceptedCache()


class MxSession(Session):
    kind = "mx"
    offers_auth = False

    async def on_rcpt(self, path: syntax.Path) -> str | None:
        if path.literal:
            return RELAY_DENIED
        key = path.address.lower()
        if _accepted.hit(key):
            return None
        from ..core import receive
        try:
            await receive.check_recipient(self.shared.ctx, path.address)
        except errors.NotFound:
            return UNKNOWN_USER
        except errors.ForbiddenError:
            return RELAY_DENIED
        except Exception as exc:  # noqa: BLE001 - the one translator
            return reply_for(exc)
        _accepted.add(key)
        return None

    async def on_data(self, raw: bytes) -> str:
        from ..core import receive
        message_id = await receive.accept(self.shared.ctx, self.mail.address,
                                          [r.address for r in self.rcpts], raw, self.ip)
        logs.event(log, "inbound message accepted", message_id=message_id,
                   rcpts=len(self.rcpts), size=len(raw))
        return f"250 2.0.0 Ok: queued as {message_id}"
