"""MX lookup for outbound mail (dnspython, through ctx.resolver): where to deliver a domain.

Owns `resolve(resolver, domain, allow_private)`: MX records by preference (equal preferences
shuffled), the domain's own A/AAAA when it has no MX (RFC 5321 5.1), each host's addresses.
Failures are classified for relay.outcome: NXDOMAIN and null MX (RFC 7505, "0 .") are
permanent; SERVFAIL, timeouts and hosts without usable addresses are temporary.  Hosts that
resolve to loopback/private/reserved addresses are refused unless relay.allow_private_mx.
Results are cached briefly (bounded by the records' TTL) so a burst to one domain asks once.
"""
from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

CACHE_SECONDS = 60.0


class MxError(Exception):
    permanent = False
    code = 451
    enhanced = "4.4.3"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class MxPermanent(MxError):
    permanent = True
    code = 550
    enhanced = "5.1.2"


class MxTemporary(MxError):
    pass


@dataclass
class MxHost:
    name: str
    preference: int
    addresses: list[str] = field(default_factory=list)


def usable_address(addr: str, allow_private: bool) -> bool:
    ip = ipaddress.ip_address(addr)
    if ip.is_unspecified or ip.is_multicast:
        return False
    if allow_private:
        return True
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved)


class MxResolver:
    def __init__(self, resolver: dns.asyncresolver.Resolver, allow_private: bool = False):
        self.resolver = resolver
        self.allow_private = allow_private
        self._cache: dict[str, tuple[float, list[MxHost]]] = {}

    async def resolve(self, domain: str) -> list[MxHost]:
        domain = domain.lower().rstrip(".")
        hit = self._cache.get(domain)
        if hit and hit[0] > time.monotonic():
            return [MxHost(h.name, h.preference, list(h.addresses)) for h in hit[1]]
        hosts, ttl = await self._resolve(domain)
        self._cache[domain] = (time.monotonic() + min(ttl, CACHE_SECONDS), hosts)
        return [MxHost(h.name, h.preference, list(h.addresses)) for h in hosts]

    async def _query(self, name: str, rdtype: str):
        try:
            return await self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NoNameservers as exc:
            raise MxTemporary(f"DNS lookup of {name}/{rdtype} failed (server failure)") from exc
        except dns.exception.Timeout as exc:
            raise MxTemporary(f"DNS lookup of {name}/{rdtype} timed out") from exc
        except dns.exception.DNSException as exc:
            raise MxTemporary(f"DNS lookup of {name}/{rdtype} failed: {exc}") from exc

    async def _resolve(self, domain: str) -> tuple[list[MxHost], float]:
        try:
            answer = await self._query(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise MxPermanent(f"Domain {domain} does not exist (NXDOMAIN)") from None
        ttl = CACHE_SECONDS
        if answer is None:
            hosts = [MxHost(domain, 0)]  # implicit MX: the domain's own address records
        else:
            ttl = answer.rrset.ttl
            records = [(r.preference, r.exchange) for r in answer]
            if any(ex == dns.name.root for _, ex in records):
                raise MxPermanent(f"Domain {domain} does not accept mail (null MX, RFC 7505)")
            by_pref: dict[int, list[str]] = {}
            for pref, ex in records:
                by_pref.setdefault(pref, []).append(ex.to_text(omit_final_dot=True).lower())
            hosts = []
            for pref in sorted(by_pref):
                names = by_pref[pref]
                random.shuffle(names)
                hosts += [MxHost(n, pref) for n in names]
        problems: list[str] = []
        results = await asyncio.gather(*(self._addresses(h) for h in hosts), return_exceptions=True)
        usable = []
        for host, result in zip(hosts, results):
            if isinstance(result, BaseException):
                problems.append(getattr(result, "message", str(result)))
                continue
            addrs, refused = result
            if refused:
                problems.append(f"MX host {host.name} resolves to private address(es) {', '.join(refused)}")
            if addrs:
                host.addresses = addrs
                usable.append(host)
            elif not refused:
                problems.append(f"MX host {host.name} has no address records")
        if usable:
            return usable, ttl
        if answer is None and problems and all("no address records" in p for p in problems):
            raise MxPermanent(f"Domain {domain} has no MX and no address records")
        raise MxTemporary("; ".join(problems) or f"No usable MX host for {domain}")

    async def _addresses(self, host: MxHost) -> tuple[list[str], list[str]]:
        found: list[str] = []
        errors: list[Exception] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(host.name, rdtype)
            except dns.resolver.NXDOMAIN:
                break
            except MxTemporary as exc:
                errors.append(exc)
                continue
            if answer is not None:
                found += [r.address for r in answer]
        if not found and errors:
            raise errors[0]
        usable = [a for a in found if usable_address(a, self.allow_private)]
        refused = [a for a in found if a not in usable]
        return usable, refused
