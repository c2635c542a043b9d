"""The egress guard: every URL mailplat calls (route forward(), store(notify=), webhooks) goes
through here.

Owns deciding whether a target may be reached: the scheme is http or https, the host resolves,
and no address it resolves to is loopback, private, link-local (which covers the cloud metadata
address 169.254.169.254), multicast, reserved or unspecified, unless `hooks.allow_private_targets`
is set (tests, closed networks).  `GuardedResolver` plugs the check into aiohttp so the
connection goes to exactly the addresses checked (no second lookup to rebind), and callers post
with redirects off, so a 30x can never lead inside.  `check_url_static` is the cheap check at
save time (400 for literal private addresses and obviously internal names).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver

from ..errors import InputError

_INTERNAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "metadata.google.internal")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class EgressRefused(InputError):
    """Target address is not allowed"""


def allow_private(ctx) -> bool:
    hooks = getattr(ctx.config, "hooks", None)
    return bool(getattr(hooks, "allow_private_targets", False))


def address_allowed(ip: str, allow_private_targets: bool) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified or addr.is_multicast:
        return False
    if allow_private_targets:
        return True
    if addr in _METADATA:
        return False
    return not (addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_reserved
                or not addr.is_global)


def _host(url: str) -> tuple[str, str]:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise EgressRefused("URL is not valid") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise EgressRefused("URL must be http or https")
    if not host:
        raise EgressRefused("URL has no host")
    if any(c in url for c in "\r\n\x00 "):
        raise EgressRefused("URL is not valid")
    return parts.scheme.lower(), host.rstrip(".").lower()


def check_url_static(url: str, allow_private_targets: bool) -> None:
    """At save time: refuse what is internal without resolving (the guard checks again on
    connect, after resolving)."""
    _, host = _host(url)
    try:
        ipaddress.ip_address(host.strip("[]"))
        literal = True
    except ValueError:
        literal = False
    if literal:
        if not address_allowed(host.strip("[]"), allow_private_targets):
            raise EgressRefused("URL points at a private, loopback or link-local address")
        return
    if not allow_private_targets and (host in _INTERNAL_NAMES or host.endswith((".localhost", ".internal", ".local"))):
        raise EgressRefused("URL points at an internal host name")


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that drops every address the guard refuses; if none is left the
    connection fails with EgressRefused (so the socket only ever opens to a checked address)."""

    def __init__(self, allow_private_targets: bool):
        self.allow_private_targets = allow_private_targets

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM,
                                       flags=socket.AI_ADDRCONFIG)
        out = []
        for fam, _, proto, _, sockaddr in infos:
            ip = sockaddr[0]
            if not address_allowed(ip, self.allow_private_targets):
                continue
            out.append({"hostname": host, "host": ip, "port": sockaddr[1], "family": fam,
                        "proto": proto, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})
        if not out:
            raise EgressRefused(f"{host} resolves only to addresses mailplat may not call")
        return out

    async def close(self) -> None:
        return None


def session(allow_private_targets: bool, timeout: float):
    """An aiohttp ClientSession whose connections pass the guard (callers use allow_redirects=False)."""
    import aiohttp
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private_targets), use_dns_cache=False,
                                     limit=100)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                 auto_decompress=True)
