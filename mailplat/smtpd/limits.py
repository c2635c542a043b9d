"""Per-IP and per-account limits shared by every SMTP listener of one process.

Owns two in-memory ledgers: `ConnectionLimiter` (open sessions per client IP and overall) and
`AuthThrottle` (failed AUTH attempts per IP and per account, turned into an escalating delay
before the failure is answered, then a temporary refusal for the IP).  A valid login is never
refused because of failures against the same account from elsewhere: account failures only
slow failed answers down, they never lock the account.  The protocol code (smtpd.protocol)
asks these before acting; nothing here touches the store.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


class ConnectionLimiter:
    def __init__(self, per_ip: int, total: int):
        self.per_ip = per_ip
        self.total = total
        self.counts: dict[str, int] = {}
        self.open = 0

    def acquire(self, ip: str) -> bool:
        """Count a new session; False (and nothing counted) when a cap is reached."""
        if self.open >= self.total or self.counts.get(ip, 0) >= self.per_ip:
            return False
        self.counts[ip] = self.counts.get(ip, 0) + 1
        self.open += 1
        return True

    def release(self, ip: str) -> None:
        n = self.counts.get(ip, 0) - 1
        if n > 0:
            self.counts[ip] = n
        else:
            self.counts.pop(ip, None)
        self.open = max(0, self.open - 1)


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


class AuthThrottle:
    """Failed-AUTH bookkeeping.

    The first `free` failures cost nothing; after that each failure is answered after
    `base * 2**(n - free - 1)` seconds (capped at `cap`).  An IP with `refuse_after` failures
    inside `window` seconds gets 421 4.7.0 before its credentials are even checked.  Entries
    age out after `window` seconds without a failure.
    """

    free = 2
    base = 0.5
    cap = 2.0
    refuse_after = 8
    window = 900.0
    max_entries = 100_000

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.by_ip: dict[str, _Failures] = {}
        self.by_account: dict[str, _Failures] = {}

    def _get(self, table: dict[str, _Failures], key: str) -> _Failures:
        entry = table.get(key)
        now = self.clock()
        if entry is not None and now - entry.last > self.window:
            del table[key]
            entry = None
        return entry or _Failures()

    def refused(self, ip: str) -> bool:
        """True when this IP has failed too often recently: answer 421 and close."""
        return self._get(self.by_ip, ip).count >= self.refuse_after

    def _delay_for(self, count: int) -> float:
        if count <= self.free:
            return 0.0
        return min(self.cap, self.base * 2 ** (count - self.free - 1))

    def failed(self, ip: str, account: str) -> float:
        """Record a failure; returns how long to wait before answering it."""
        now = self.clock()
        if len(self.by_ip) > self.max_entries or len(self.by_account) > self.max_entries:
            self._prune(now)
        counts = []
        for table, key in ((self.by_ip, ip), (self.by_account, account[:320].lower())):
            entry = self._get(table, key)
            entry.count += 1
            entry.last = now
            table[key] = entry
            counts.append(entry.count)
        return self._delay_for(max(counts))

    def succeeded(self, account: str) -> None:
        self.by_account.pop(account[:320].lower(), None)

    def _prune(self, now: float) -> None:
        for table in (self.by_ip, self.by_account):
            for key in [k for k, v in table.items() if now - v.last > self.window]:
                del table[key]
            if len(table) > self.max_entries:
                table.clear()
