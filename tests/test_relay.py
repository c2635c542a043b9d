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

    def sink(self, tls_context=None, **kw) -> tuple[SmtpSink, str]:
        """A new remote MX on its own loopback address; returns it and its address."""
        self._next_ip += 1
        ip = f"127.0.0.{self._next_ip}"
        sink = SmtpSink(tls_context=tls_context, host=ip, port=self.port, **kw).start()
        self.sinks.append(sink)
        return sink, ip

    def domain(self, **connection) -> str:
        """A sending domain; connection settings (require_tls, skip_verification) set through
        PUT /v3/domains/<name>/connection."""
        name = f"s{uuid.uuid4().hex[:8]}.example.test"
        create_domain(self.server, self.dns, name)
        if connection:
            r = self.server.api("PUT", f"/v3/domains/{name}/connection", data=connection)
            assert r.status_code == 200, r.text
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
    r = env.server.api("POST", f"/v3/{sender}/messages",
                       data={"from": f"Sender <sender@{sender}>", "to": rcpt, "subject": "DKIM check",
                             "text": "Line one.\nLine two.\n"})
    assert r.status_code == 200, r.text
    mid = r.json()["id"].strip("<>")
    got = sink.wait_count(1)[0]
    assert got.rcpt_tos == [rcpt]
    # API mail goes out with a VERP return path on the sending domain (core.verp).
    assert got.mail_from.startswith("bounce+") and got.mail_from.endswith(f"@{sender}")
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


def test_tls_with_verified_certificate(env):
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    mx = f"mx.{rdom}"
    sink, ip = env.sink(tls_context=server_tls(env.ca, mx))
    point_mx(env.dns, rdom, ip, mx)
    rcpt = f"bob@{rdom}"
    send(env.server, env.domain(require_tls="true"), [rcpt])
    got = sink.wait_count(1)[0]
    assert got.tls is True
    ds = env.wait_event(rcpt, "delivered")["delivery-status"]
    assert ds["tls"] is True and ds["certificate-verified"] is True


def self_signed_context(tmp, hostname: str) -> ssl.SSLContext:
    from mailplat.tls import make_self_signed, server_context
    cert, key = tmp / f"{hostname}.crt", tmp / f"{hostname}.key"
    make_self_signed(cert, key, hostname)
    return server_context(cert, key)


def test_self_signed_target_is_refused_when_tls_is_required(env):
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    mx = f"mx.{rdom}"
    sink, ip = env.sink(tls_context=self_signed_context(env.tmp, mx))
    point_mx(env.dns, rdom, ip, mx)
    rcpt = f"carol@{rdom}"
    r = env.server.api("POST", f"/v3/{env.domain()}/messages",
                       data={"from": "x@example.test", "to": rcpt, "subject": "TLS", "text": "t",
                             "o:require-tls": "yes", "o:skip-verification": "no"})
    assert r.status_code == 200, r.text
    mid = r.json()["id"]
    ev = env.wait_event(rcpt, "failed")
    assert ev["severity"] == "temporary"  # a certificate can be fixed: retried until the lifetime ends
    ds = ev["delivery-status"]
    assert "certificate verification failed" in ds["message"] and ds["enhanced-code"] == "4.7.5"
    assert ds["retry-seconds"] >= 0
    # A second attempt happens (the row is retried) and still nothing reached the target.
    wait_for(lambda: len(env.events(rcpt, "failed")) >= 2, timeout=20, what="a retry")
    assert sink.count() == 0 and sink.data_commands == 0
    r = env.server.cli("queue", "drop", mid)
    assert "dropped 1" in r.stdout
    assert queue_rows(env.db_url, rcpt)[0]["state"] == "failed"


def test_self_signed_target_with_opportunistic_tls_falls_back_to_plaintext(env):
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    mx = f"mx.{rdom}"
    sink, ip = env.sink(tls_context=self_signed_context(env.tmp, mx))
    point_mx(env.dns, rdom, ip, mx)
    rcpt = f"dave@{rdom}"
    send(env.server, env.domain(), [rcpt])  # require_tls false, skip_verification false
    got = sink.wait_count(1)[0]
    assert got.tls is False
    ds = env.wait_event(rcpt, "delivered")["delivery-status"]
    assert ds["tls"] is False and ds["certificate-verified"] is False


def test_skip_verification_accepts_self_signed_over_tls(env):
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    mx = f"mx.{rdom}"
    sink, ip = env.sink(tls_context=self_signed_context(env.tmp, "someone-else.test"))
    point_mx(env.dns, rdom, ip, mx)
    rcpt = f"erin@{rdom}"
    send(env.server, env.domain(), [rcpt], require_tls=True, skip_verification=True)
    got = sink.wait_count(1)[0]
    assert got.tls is True
    ds = env.wait_event(rcpt, "delivered")["delivery-status"]
    assert ds["tls"] is True and ds["certificate-verified"] is False


def test_hostname_mismatch_is_refused_when_verifying(env):
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    sink, ip = env.sink(tls_context=server_tls(env.ca, "other-host.example.test"))
    point_mx(env.dns, rdom, ip)
    rcpt = f"frank@{rdom}"
    mid = send(env.server, env.domain(require_tls="true"), [rcpt])
    ev = env.wait_event(rcpt, "failed")
    assert ev["severity"] == "temporary"
    assert "certificate verification failed" in ev["delivery-status"]["message"]
    assert sink.data_commands == 0
    env.server.cli("queue", "drop", mid)


def test_required_tls_without_starttls_never_sends_plaintext(env):
    sink, ip = env.sink()  # no STARTTLS offered
    rdom, mx = env.rcpt_domain(ip)
    rcpt = f"gina@{rdom}"
    mid = send(env.server, env.domain(), [rcpt], require_tls=True)
    ev = env.wait_event(rcpt, "failed")
    assert ev["severity"] == "temporary"
    assert "does not offer STARTTLS" in ev["delivery-status"]["message"]
    wait_for(lambda: len(env.events(rcpt, "failed")) >= 2, timeout=20, what="a retry")
    assert sink.data_commands == 0 and sink.count() == 0
    env.server.cli("queue", "drop", mid)


def test_temporary_failure_then_delivered_on_retry(env):
    sink, ip = env.sink()
    sink.data_replies = ["451 4.3.0 Greylisted, try again"]
    rdom, mx = env.rcpt_domain(ip)
    rcpt = f"hank@{rdom}"
    send(env.server, env.domain(), [rcpt])
    failed = env.wait_event(rcpt, "failed")
    assert failed["severity"] == "temporary" and failed["reason"] == "generic"
    ds = failed["delivery-status"]
    assert ds["code"] == 451 and ds["enhanced-code"] == "4.3.0" and ds["attempt-no"] == 1
    assert "retry-seconds" in ds
    delivered = env.wait_event(rcpt, "delivered")
    assert delivered["delivery-status"]["attempt-no"] == 2
    assert len(sink.to(rcpt)) == 1 and sink.rejected == 1
    row = queue_rows(env.db_url, rcpt)[0]
    assert row["state"] == "delivered" and row["attempts"] == 2


def test_permanent_failure_bounces_and_suppresses_later_sends(env):
    sink, ip = env.sink()
    rdom, mx = env.rcpt_domain(ip)
    rcpt = f"ivan@{rdom}"
    sink.rcpt_replies[rcpt] = "550 5.1.1 No such user here"
    sender = env.domain()
    send(env.server, sender, [rcpt])
    ev = env.wait_event(rcpt, "failed")
    assert ev["severity"] == "permanent" and ev["reason"] == "bounce"
    assert ev["delivery-status"]["code"] == 550 and ev["delivery-status"]["enhanced-code"] == "5.1.1"
    rows = bounces(env.db_url, sender)
    assert [(b["address"], b["code"]) for b in rows] == [(rcpt, "550")]
    assert "No such user" in rows[0]["error"]
    assert queue_rows(env.db_url, rcpt)[0]["state"] == "failed"
    # A later send to the bounced address is not attempted.
    r = env.server.api("POST", f"/v3/{sender}/messages",
                       data={"from": f"a@{sender}", "to": rcpt, "subject": "again", "text": "t"})
    assert r.status_code == 200, r.text
    suppressed = env.wait_event(rcpt, "failed", reason="suppress-bounce")
    assert suppressed["severity"] == "permanent"
    assert len(queue_rows(env.db_url, rcpt)) == 1
    assert sink.count() == 0


def test_policy_rejection_is_permanent_without_bounce(env):
    sink, ip = env.sink()
    sink.data_replies = ["554 5.7.1 Message refused by policy"]
    rdom, _ = env.rcpt_domain(ip)
    rcpt = f"judy@{rdom}"
    sender = env.domain()
    send(env.server, sender, [rcpt])
    ev = env.wait_event(rcpt, "failed")
    assert ev["severity"] == "permanent" and ev["reason"] == "espblock"
    assert bounces(env.db_url, sender) == []


def test_dns_verdicts(env):
    sender = env.domain()
    nx = f"nx{uuid.uuid4().hex[:8]}.example.test"      # nothing published: NXDOMAIN
    null = f"null{uuid.uuid4().hex[:8]}.example.test"
    env.dns.add(null, "MX", "0 .")
    broken = f"sf{uuid.uuid4().hex[:8]}.example.test"
    env.dns.set_rcode(broken, "SERVFAIL")
    mid = send(env.server, sender, [f"a@{nx}", f"b@{null}", f"c@{broken}"])
    e_nx = env.wait_event(f"a@{nx}", "failed")
    assert e_nx["severity"] == "permanent" and "NXDOMAIN" in e_nx["delivery-status"]["message"]
    e_null = env.wait_event(f"b@{null}", "failed")
    assert e_null["severity"] == "permanent" and e_null["delivery-status"]["code"] == 556
    assert "null MX" in e_null["delivery-status"]["message"]
    e_sf = env.wait_event(f"c@{broken}", "failed")
    assert e_sf["severity"] == "temporary" and e_sf["delivery-status"]["code"] == 451
    addresses = {b["address"] for b in bounces(env.db_url, sender)}
    assert addresses == {f"a@{nx}", f"b@{null}"}
    # When the DNS recovers, the temporary one is delivered on a later attempt.
    sink, ip = env.sink()
    env.dns.rcodes.pop(__import__("dns.name").name.from_text(broken))
    point_mx(env.dns, broken, ip)
    sink.wait_count(1)
    assert env.wait_event(f"c@{broken}", "delivered")["delivery-status"]["attempt-no"] >= 2
    assert mid


def test_implicit_mx_from_address_record(env):
    sink, ip = env.sink()
    rdom = f"a{uuid.uuid4().hex[:8]}.example.test"
    env.dns.add(rdom, "A", ip)  # no MX: deliver to the domain's own address
    rcpt = f"kim@{rdom}"
    send(env.server, env.domain(), [rcpt])
    assert sink.wait_count(1)[0].rcpt_tos == [rcpt]
    assert env.wait_event(rcpt, "delivered")["delivery-status"]["mx-host"] == rdom


def test_test_mode_never_connects(env):
    sink, ip = env.sink()
    rdom, _ = env.rcpt_domain(ip)
    rcpt = f"lee@{rdom}"
    before = len(env.dns.queries)
    sender = env.domain()
    r = env.server.api("POST", f"/v3/{sender}/messages",
                       data={"from": f"a@{sender}", "to": rcpt, "subject": "t", "text": "t", "o:testmode": "yes"})
    assert r.status_code == 200, r.text
    ev = env.wait_event(rcpt, "delivered")
    assert ev["flags"]["is-test-mode"] is True
    assert sink.count() == 0 and sink.data_commands == 0
    assert not [q for q in env.dns.queries[before:] if rdom in q[0]]  # not even a DNS lookup


def test_one_connection_carries_many_messages(env):
    sink, ip = env.sink()
    rdom, _ = env.rcpt_domain(ip)
    rcpts = [f"user{i}@{rdom}" for i in range(30)]
    send(env.server, env.domain(), rcpts)
    got = sink.wait_count(30)
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(rcpts)
    connections = {m.connection for m in got}
    assert len(connections) <= 5  # relay.per_destination default
    assert all(m.data.startswith(b"DKIM-Signature:") for m in got)


def test_dkim_off_sends_unsigned(env):
    sink, ip = env.sink()
    rdom, _ = env.rcpt_domain(ip)
    rcpt = f"max@{rdom}"
    send(env.server, env.domain(), [rcpt], dkim=False)
    got = sink.wait_count(1)[0]
    assert b"DKIM-Signature" not in got.data


def test_queue_cli_hold_release_show_list(env):
    sink, ip = env.sink()
    rdom, _ = env.rcpt_domain(ip)
    rcpt = f"ned@{rdom}"
    sink.stall_data()
    # Scheduled far ahead so the relay leaves it alone while we hold it.
    import time
    mid = send(env.server, env.domain(), [rcpt], deliver_at=time.time() + 3600)
    out = env.server.cli("queue", "hold", mid).stdout
    assert "held 1" in out
    show = env.server.cli("queue", "show", mid).stdout
    assert "state: held" in show and rcpt in show
    listing = env.server.cli("queue", "list", "--state", "held").stdout
    line = next(ln for ln in listing.splitlines() if rcpt in ln)
    queue_id = line.split("\t")[0]
    assert "state: held" in env.server.cli("queue", "show", queue_id).stdout  # by queue id too
    assert "released 1" in env.server.cli("queue", "release", mid).stdout
    sink.unstall()
    assert "retried 1" in env.server.cli("queue", "retry", mid).stdout  # due now
    assert sink.wait_count(1)[0].rcpt_tos == [rcpt]
    bad = env.server.cli("queue", "show", "nosuch@id", check=False)
    assert bad.returncode == 1 and "no queued message" in bad.stderr


def test_sdk_batch_send_each_recipient_gets_its_own_signed_copy(env):
    from mailgun.client import Client
    sink, ip = env.sink()
    sender = env.domain()
    rdom, _ = env.rcpt_domain(ip)
    a, b = f"ann@{rdom}", f"ben@{rdom}"
    with Client(auth=("api", env.server.key), api_url=env.server.url) as client:
        r = client.messages.create(domain=sender, data={
            "from": f"Shop <shop@{sender}>", "to": [a, b], "subject": "Hello %recipient.first%",
            "text": "Dear %recipient.first%, your code is %recipient.code%.\n",
            "recipient-variables": f'{{"{a}": {{"first": "Ann", "code": "A1"}}, "{b}": {{"first": "Ben", "code": "B2"}}}}'})
    assert r.status_code == 200, r.text
    sink.wait_count(2)
    for rcpt, first, code in ((a, "Ann", "A1"), (b, "Ben", "B2")):
        got = sink.to(rcpt)
        assert len(got) == 1 and got[0].rcpt_tos == [rcpt]
        data = got[0].data
        assert f"Dear {first}, your code is {code}.".encode() in data
        assert f"Subject: Hello {first}".encode() in data
        other = b if rcpt == a else a
        assert other.encode() not in data  # each copy shows only its own recipient
        assert dkim_verify_perl(data, env.dns.port).splitlines()[0] == "pass"


def test_falls_back_to_the_next_mx_when_the_first_is_down(env):
    sink, ip = env.sink()
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    env.dns.add(rdom, "MX", f"10 down.{rdom}.", f"20 up.{rdom}.")
    env.dns.add(f"down.{rdom}", "A", "127.0.0.250")  # nothing listens there
    env.dns.add(f"up.{rdom}", "A", ip)
    rcpt = f"olga@{rdom}"
    send(env.server, env.domain(), [rcpt])
    assert sink.wait_count(1)[0].rcpt_tos == [rcpt]
    assert env.wait_event(rcpt, "delivered")["delivery-status"]["mx-host"] == f"up.{rdom}"


def test_unreachable_destination_is_temporary(env):
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    point_mx(env.dns, rdom, "127.0.0.251")  # nothing listens there
    rcpts = [f"p{i}@{rdom}" for i in range(3)]
    mid = send(env.server, env.domain(), rcpts)
    for rcpt in rcpts:
        ev = env.wait_event(rcpt, "failed")
        assert ev["severity"] == "temporary" and ev["delivery-status"]["code"] == 451
        assert "retry-seconds" in ev["delivery-status"]
    assert all(r["state"] == "queued" for r in queue_rows(env.db_url) if r["recipient"] in rcpts)
    env.server.cli("queue", "drop", mid)


def test_plaintext_injected_before_the_tls_handshake_is_discarded(env):
    """A man in the middle appends replies after '220 Ready to start TLS'; if the client kept
    them, they would answer its first commands inside TLS and desynchronise the session."""
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    mx = f"mx.{rdom}"
    injection = b"250-injected\r\n250 AUTH PLAIN\r\n250 2.1.0 Fake sender ok\r\n"
    sink, ip = env.sink(tls_context=server_tls(env.ca, mx), starttls_injection=injection)
    point_mx(env.dns, rdom, ip, mx)
    rcpt = f"quinn@{rdom}"
    send(env.server, env.domain(), [rcpt], require_tls=True, subject="Injected?")
    got = sink.wait_count(1)[0]
    assert got.tls is True and got.rcpt_tos == [rcpt] and b"Subject: Injected?" in got.data
    ds = env.wait_event(rcpt, "delivered")["delivery-status"]
    assert ds["tls"] is True and len(sink.to(rcpt)) == 1
    # When the injected bytes arrive after the client has begun the handshake they corrupt it
    # instead: that attempt fails at STARTTLS (and is retried), never by a desynchronised session.
    for failed in env.events(rcpt, "failed"):
        assert "STARTTLS" in failed["delivery-status"]["message"], failed["delivery-status"]

