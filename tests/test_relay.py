"""Outbound relay over real sockets: the send path queues, the relay resolves MX through the
loopback DNS server, signs with DKIM and delivers to SMTP servers on loopback addresses
(tests/smtpsink.py), applying the TLS policy, retries and bounces."""
from __future__ import annotations

import ssl
import uuid

import pytest
import trustme

from tests.conftest import dns_sets
from tests.relaytest import (bounces, create_domain, db_url_of, dkim_verify_perl, events,
                             point_mx, queue_rows, send)
from tests.smtpsink import SmtpSink, free_port
from tests.support import start_server, wait_for

pytestmark = pytest.mark.timeout(120)


class Env:
    """One mailplat, one DNS server, one port that every loopback 'remote MX' listens on."""

    def __init__(self, server, dns, port, ca, tmp):
        self.server, self.dns, self.port, self.ca, self.tmp = server, dns, port, ca, tmp
        self.db_url = db_url_of(server.data_dir)
        self.sinks: list[SmtpSink] = []
        self._next_ip = 10

    def sink(self, tls_context=None) -> tuple[SmtpSink, str]:
        """A new remote MX on its own loopback address; returns it and its address."""
        self._next_ip += 1
        ip = f"127.0.0.{self._next_ip}"
        sink = SmtpSink(tls_context=tls_context, host=ip, port=self.port).start()
        self.sinks.append(sink)
        return sink, ip

    def domain(self, **form) -> str:
        name = f"s{uuid.uuid4().hex[:8]}.example.test"
        create_domain(self.server, self.dns, name, **form)
        return name

    def rcpt_domain(self, ip: str, mx_name: str | None = None) -> tuple[str, str]:
        name = f"r{uuid.uuid4().hex[:8]}.example.test"
        return name, point_mx(self.dns, name, ip, mx_name)

    def events(self, recipient, kind=None):
        return events(self.db_url, recipient, kind)

    def wait_event(self, recipient, kind, timeout=20, **match):
        def found():
            for e in self.events(recipient, kind):
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            return None
        return wait_for(found, timeout=timeout, interval=0.1, what=f"{kind} event for {recipient}")


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    tmp = tmp_path_factory.mktemp("relay")
    ca = trustme.CA()
    ca_path = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    port = free_port()
    sets = dns_sets(dns_server) + [
        "relay.allow_private_mx=true", f"relay.remote_port={port}", f"relay.ca_file={ca_path}",
        "relay.retry_schedule=0.5,1.0", "relay.connect_timeout=5", "relay.command_timeout=10",
    ]
    server = start_server(tmp / "data", sets=sets)
    e = Env(server, dns_server, port, ca, tmp)
    yield e
    server.stop()
    for sink in e.sinks:
        sink.stop()


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def test_delivers_with_dkim_that_another_implementation_verifies(env):
    sink, ip = env.sink()
    sender = env.domain()
    rdom, _ = env.rcpt_domain(ip)
    rcpt = f"alice@{rdom}"
    mid = send(env.server.data_dir, sender, [rcpt], subject="DKIM check", text="Line one.\nLine two.\n")
    got = sink.wait_count(1)[0]
    assert got.rcpt_tos == [rcpt]
    assert got.mail_from == f"sender@{sender}"
    assert got.data.startswith(b"DKIM-Signature:")
    assert b"c=relaxed/relaxed" in got.data and b"a=rsa-sha256" in got.data
    assert b" l=" not in got.data.split(b"\r\n\r\n")[0]
    verdict = dkim_verify_perl(got.data, env.dns.port)
    assert verdict.splitlines()[0] == "pass", verdict
    tampered = got.data.replace(b"Line two.", b"Line 2.")
    assert dkim_verify_perl(tampered, env.dns.port).splitlines()[0] == "fail"
    added = got.data.replace(b"\r\n\r\n", b"\r\nSubject: Something else\r\n\r\n", 1)
    assert dkim_verify_perl(added, env.dns.port).splitlines()[0] == "fail"  # Subject oversigned
    ev = env.wait_event(rcpt, "delivered")
    ds = ev["delivery-status"]
    assert ds["code"] == 250 and ds["mx-host"] == f"mx.{rdom}" and ds["attempt-no"] == 1
    assert ds["tls"] is False and ds["certificate-verified"] is False
    assert ev["message"]["headers"]["message-id"] == mid
    assert queue_rows(env.db_url, rcpt)[0]["state"] == "delivered"
