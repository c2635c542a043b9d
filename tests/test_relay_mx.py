"""relay.mx against the loopback DNS server: preference order, implicit MX, the verdicts
(NXDOMAIN and null MX permanent; SERVFAIL, hosts without addresses and private addresses
temporary)."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from mailplat.config import DnsConfig
from mailplat.relay.mx import MxPermanent, MxResolver, MxTemporary
from mailplat.resolver import make_resolver


def resolver(dns, allow_private=True):
    return MxResolver(make_resolver(DnsConfig(nameserver="127.0.0.1", port=dns.port, timeout=2.0)),
                      allow_private=allow_private)


def name() -> str:
    return f"m{uuid.uuid4().hex[:8]}.example.test"


def run(coro):
    return asyncio.run(coro)


def test_preference_order_and_addresses(dns_server):
    d = name()
    dns_server.add(d, "MX", f"20 b.{d}.", f"10 a.{d}.", f"20 c.{d}.")
    for host, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")):
        dns_server.add(f"{host}.{d}", "A", ip)
    dns_server.add(f"a.{d}", "AAAA", "::1")
    seen_second = set()
    for _ in range(12):  # equal preferences are shuffled; the lower one always comes first
        hosts = run(resolver(dns_server)._resolve(d))[0]
        assert hosts[0].name == f"a.{d}" and hosts[0].addresses == ["127.0.0.2", "::1"]  # A, then AAAA
        assert {h.name for h in hosts[1:]} == {f"b.{d}", f"c.{d}"}
        seen_second.add(hosts[1].name)
    assert len(seen_second) == 2


def test_implicit_mx_and_verdicts(dns_server):
    plain = name()
    dns_server.add(plain, "A", "127.0.0.9")
    hosts = run(resolver(dns_server).resolve(plain))
    assert [(h.name, h.addresses) for h in hosts] == [(plain, ["127.0.0.9"])]

    with pytest.raises(MxPermanent, match="NXDOMAIN"):
        run(resolver(dns_server).resolve(name()))
    null = name()
    dns_server.add(null, "MX", "0 .")
    with pytest.raises(MxPermanent, match="null MX"):
        run(resolver(dns_server).resolve(null))
    broken = name()
    dns_server.set_rcode(broken, "SERVFAIL")
    with pytest.raises(MxTemporary, match="server failure"):
        run(resolver(dns_server).resolve(broken))
    dangling = name()
    dns_server.add(dangling, "MX", f"10 nowhere.{dangling}.")
    with pytest.raises(MxTemporary, match="no address records"):
        run(resolver(dns_server).resolve(dangling))


def test_private_addresses_refused_unless_allowed(dns_server):
    d = name()
    dns_server.add(d, "MX", f"10 mx.{d}.")
    dns_server.add(f"mx.{d}", "A", "127.0.0.1", "10.1.2.3")
    with pytest.raises(MxTemporary, match="private address"):
        run(resolver(dns_server, allow_private=False).resolve(d))
    assert sorted(run(resolver(dns_server, allow_private=True).resolve(d))[0].addresses) == ["10.1.2.3", "127.0.0.1"]


def test_silent_nameserver_is_a_temporary_failure():
    """A nameserver that never answers (a UDP socket on loopback that reads nothing) makes the
    lookup time out within the configured timeout, and the verdict is temporary."""
    import socket
    import time
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        res = MxResolver(make_resolver(DnsConfig(nameserver="127.0.0.1", port=silent.getsockname()[1], timeout=0.5)))
        started = time.monotonic()
        with pytest.raises(MxTemporary, match="timed out"):
            run(res.resolve(name()))
        assert time.monotonic() - started < 5
