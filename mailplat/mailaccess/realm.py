"""Who may read which mailbox, and the transport rules IMAP and POP3 share.

Owns: mailbox login for IMAP and POP3 (the mailbox's argon2 hash, verified in a thread with
core.auth.verify_password, never on the reactor; a dummy hash for unknown users), the escalating per-IP delay
after failed logins and the temporary refusal after many, the "may this connection send a
password" rule (TLS, or loopback in dev mode), and Twisted TLS options built from the
configured certificate.  imap.py and pop3.py call these.
"""
from __future__ import annotations

import asyncio
import ipaddress
import time

from OpenSSL import crypto
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import ISSLTransport

from .. import logs
from ..core import auth, mailboxes

log = logs.get("mailplat.mailaccess")

FAIL_WINDOW = 600.0
MAX_DELAY = 5.0
REFUSE_AFTER = 50


class LoginThrottle:
    """Failed logins per client IP in a sliding window."""

    def __init__(self):
        self.fails: dict[str, list[float]] = {}

    def _recent(self, ip: str) -> list[float]:
        now = time.monotonic()
        lst = [t for t in self.fails.get(ip, []) if now - t < FAIL_WINDOW]
        if lst:
            self.fails[ip] = lst
        else:
            self.fails.pop(ip, None)
        return lst

    def refused(self, ip: str) -> bool:
        return len(self._recent(ip)) >= REFUSE_AFTER

    def delay(self, ip: str) -> float:
        n = len(self._recent(ip))
        return 0.0 if n == 0 else min(MAX_DELAY, 0.25 * (2 ** min(n - 1, 6)))

    def failed(self, ip: str) -> None:
        if len(self.fails) > 100_000:
            self.fails.clear()
        self.fails.setdefault(ip, []).append(time.monotonic())

    def succeeded(self, ip: str) -> None:
        self.fails.pop(ip, None)


class ConnectionLimits:
    """Open IMAP/POP3 connections per client IP and overall (all four listeners share one)."""

    def __init__(self, per_ip: int = 50, total: int = 5000):
        self.per_ip, self.total = per_ip, total
        self.by_ip: dict[str, int] = {}
        self.count = 0

    def add(self, ip: str) -> bool:
        if self.count >= self.total or self.by_ip.get(ip, 0) >= self.per_ip:
            return False
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        self.count += 1
        return True

    def remove(self, ip: str) -> None:
        n = self.by_ip.get(ip, 0) - 1
        if n <= 0:
            self.by_ip.pop(ip, None)
        else:
            self.by_ip[ip] = n
        self.count = max(0, self.count - 1)


_SLOTS: asyncio.Semaphore | None = None
HASH_CONCURRENCY = 2


def _hash_slots() -> asyncio.Semaphore:
    global _SLOTS
    if _SLOTS is None:
        _SLOTS = asyncio.Semaphore(HASH_CONCURRENCY)
    return _SLOTS


class TemporarilyRefused(Exception):
    pass


async def login(ctx, throttle: LoginThrottle, ip: str, user: str, password: str, proto: str):
    """(address, mailbox id) for a right mailbox password (the mailbox's own hash: an SMTP
    credential of the same address does not open the mailbox), else None after the penalty delay.
    Raises TemporarilyRefused when this IP failed too often lately."""
    if throttle.refused(ip):
        log.warning("login refused: too many failures", extra={"fields": {"peer": ip, "proto": proto}})
        raise TemporarilyRefused()
    address = (user or "").strip().lower()
    found = None
    if "@" in address and len(address) <= 320:
        found = await ctx.store.read(mailboxes.login_row_sync, address)
    async with _hash_slots():  # argon2 takes ~64 MiB per verification: bound how many at once
        ok = await asyncio.to_thread(auth.verify_password, found[0] if found else None, password or "")
    mbid = found[1] if ok and found else None
    if mbid is None:
        delay = throttle.delay(ip)
        throttle.failed(ip)
        log.info("login failed", extra={"fields": {"peer": ip, "proto": proto}})
        await asyncio.sleep(delay + 0.1)
        return None
    throttle.succeeded(ip)
    return address, mbid


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def is_tls(transport) -> bool:
    return ISSLTransport(transport, None) is not None


def may_send_password(ctx, transport, tls_started: bool) -> bool:
    if tls_started or is_tls(transport):
        return True
    peer = transport.getPeer()
    return bool(ctx.config.server.dev_mode and is_loopback(getattr(peer, "host", "")))


def tls_options(ctx) -> tssl.CertificateOptions:
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, ctx.config.tls_cert.read_bytes())
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, ctx.config.tls_key.read_bytes())
    return tssl.CertificateOptions(privateKey=key, certificate=cert,
                                   raiseMinimumTo=tssl.TLSVersion.TLSv1_2)
