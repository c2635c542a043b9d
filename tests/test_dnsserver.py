"""The loopback DNS server answers the way the tests that depend on it assume."""
import dns.asyncresolver
import dns.resolver
import pytest

from tests.dnsserver import DnsServer


def resolver(port: int) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.lifetime = 2
    return r


def test_answers_nodata_nxdomain_and_rcodes():
    with DnsServer() as d:
        d.add("example.test", "MX", "10 mx.example.test.")
        d.add("mx.example.test", "A", "127.0.0.1")
        d.set_rcode("broken.test", "SERVFAIL")
        r = resolver(d.port)
        assert [str(x.exchange) for x in r.resolve("example.test", "MX")] == ["mx.example.test."]
        assert r.resolve("mx.example.test", "A")[0].address == "127.0.0.1"
        with pytest.raises(dns.resolver.NoAnswer):
            r.resolve("example.test", "A")
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("nothing.test", "A")
        with pytest.raises(dns.resolver.NoNameservers):
            r.resolve("broken.test", "A")
        r.resolve("mx.example.test", "A", tcp=True)
        assert ("mx.example.test.", "A") in d.queries
