"""DNS resolver construction: the one place that turns config.dns into a dnspython resolver.

Used by domain verification (core.domains) and MX lookup (relay.mx).  Tests point it at a DNS
server on loopback through `dns.nameserver` and `dns.port`.
"""
from __future__ import annotations

import dns.asyncresolver

from .config import DnsConfig


def make_resolver(cfg: DnsConfig) -> dns.asyncresolver.Resolver:
    if cfg.nameserver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [cfg.nameserver]
        resolver.port = cfg.port
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.timeout = cfg.timeout
    resolver.lifetime = cfg.timeout
    resolver.cache = None
    return resolver
