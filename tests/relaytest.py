"""Helpers for the relay tests (tests/test_relay*.py): queue mail through the real send path,
read the store, publish a domain's DKIM key in the loopback DNS, and verify DKIM with Debian's
Mail::DKIM (libmail-dkim-perl), an implementation independent of the dkimpy that signs."""
from __future__ import annotations

import email.utils
import os
import subprocess
import tempfile
from pathlib import Path

PERL_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
my ($ns, $port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => [$ns], port => $port,
    recurse => 1, tcp_timeout => 5, udp_timeout => 5));
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) { $line =~ s/\015?\012\z/\015\012/; $dkim->PRINT($line); }
$dkim->CLOSE;
print $dkim->result, "\n";
print join(",", map { $_->result . "(" . ($_->result_detail // "") . ")" } $dkim->signatures), "\n";
"""


def dkim_verify_perl(raw: bytes, dns_port: int) -> str:
    """'pass' / 'fail' / 'none' / ... as Mail::DKIM judges `raw`, keys looked up in our DNS."""
    with tempfile.NamedTemporaryFile("w", suffix=".pl", delete=False) as fh:
        fh.write(PERL_VERIFY)
    try:
        proc = subprocess.run(["perl", fh.name, "127.0.0.1", str(dns_port)], input=raw,
                              capture_output=True, timeout=60)
    finally:
        Path(fh.name).unlink()
    if proc.returncode != 0:
        raise AssertionError("Mail::DKIM verifier failed (is Debian's libmail-dkim-perl installed?): "
                             + proc.stderr.decode(errors="replace"))
    return proc.stdout.decode().strip()


def create_domain(server, dns, name: str, **form) -> dict:
    """A domain through the API, its DKIM public key published in the test DNS."""
    r = server.api("POST", "/v3/domains", data={"name": name, **form})
    assert r.status_code == 200, r.text
    body = r.json()
    for rec in body["sending_dns_records"]:
        if rec["record_type"] == "TXT" and "_domainkey" in rec["name"]:
            value = rec["value"]
            chunks = " ".join('"' + value[i:i + 200] + '"' for i in range(0, len(value), 200))
            dns.add(rec["name"], "TXT", chunks)
    return body


def point_mx(dns, domain: str, ip: str, mx_name: str | None = None) -> str:
    """MX for `domain` -> mx_name (default mx.<domain>) -> A ip."""
    mx_name = mx_name or f"mx.{domain}"
    dns.add(domain, "MX", f"10 {mx_name}.")
    dns.add(mx_name, "A", ip)
    return mx_name


def _with_store(db_url: str, fn, *args):
    from mailplat.store.db import Store
    store = Store(db_url)
    try:
        with store.sync():
            return fn(*args)
    finally:
        store.close()


def db_url_of(data_dir: Path) -> str:
    from mailplat import config as configmod
    return configmod.load(data_dir=Path(data_dir)).db_url


def send(server, domain: str, to: list[str], subject: str = "Hello", text: str = "Hi there.\n",
         **options) -> str:
    """Queue a message through the HTTP API (POST /v3/<domain>/messages); returns the message
    id.  options: testmode, require_tls, skip_verification (bools), deliver_at (epoch), dkim."""
    data = {"from": f"Sender <sender@{domain}>", "to": list(to), "subject": subject, "text": text}
    names = {"testmode": "o:testmode", "require_tls": "o:require-tls",
             "skip_verification": "o:skip-verification", "dkim": "o:dkim"}
    for key, value in options.items():
        if key == "deliver_at":
            data["o:deliverytime"] = email.utils.formatdate(value, usegmt=True)
        else:
            data[names[key]] = "yes" if value else "no"
    r = server.api("POST", f"/v3/{domain}/messages", data=data)
    assert r.status_code == 200, r.text
    return r.json()["id"].strip("<>")


def events(db_url: str, recipient: str | None = None, kind: str | None = None) -> list[dict]:
    from mailplat.store.models import Event

    def q():
        query = Event.select().order_by(Event.timestamp, Event.id)
        if recipient:
            query = query.where(Event.recipient == recipient)
        if kind:
            query = query.where(Event.event == kind)
        return [e.data for e in query]
    return _with_store(db_url, q)


def queue_rows(db_url: str, recipient: str | None = None) -> list[dict]:
    from mailplat.store.models import QueueItem

    def q():
        query = QueueItem.select().order_by(QueueItem.id)
        if recipient:
            query = query.where(QueueItem.recipient == recipient)
        return list(query.dicts())
    return _with_store(db_url, q)


def bounces(db_url: str, domain: str) -> list[dict]:
    from mailplat.store.models import Bounce
    return _with_store(db_url, lambda: list(Bounce.select().where(Bounce.domain == domain).dicts()))


def start_relay(data_dir: Path, log_path: Path) -> subprocess.Popen:
    """Another `mailplat serve relay` process on the same config (and so the same store)."""
    from tests.support import MAILPLAT, ROOT, wait_for
    log = open(log_path, "wb")
    proc = subprocess.Popen(MAILPLAT + ["serve", "--data-dir", str(data_dir), "relay"], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))

    def started():
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited {proc.returncode}: {log_path.read_text()}")
        return "relay started" in log_path.read_text()
    wait_for(started, timeout=60, what="the second relay to start")
    return proc
