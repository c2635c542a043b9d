"""Spam filtering with a real SpamAssassin spamd (started here on a free loopback port; Debian
package `spamassassin`): per-domain spam_action tag (X-Mailgun-Sflag/-Sscore/-Spf headers,
SPF from the loopback DNS) and block (not filed, a `rejected` event says why), a clean message
passing, and spamd unreachable (accepted, tagged Unchecked, nothing lost)."""
from __future__ import annotations

import email
import json
import os
import shutil
import smtplib
import socket
import subprocess
import uuid
from email import policy

import pytest

from tests.conftest import dns_sets
from tests.support import wait_for
from tests.test_domains_api import store_query
from tests.test_routes import own_server

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spamd_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b"PONG" in s.recv(100)
    except OSError:
        return False


@pytest.fixture(scope="module")
def spamd_port(tmp_path_factory):
    binary = shutil.which("spamd") or "/usr/sbin/spamd"
    if not os.path.exists(binary):
        pytest.fail("spamd is missing: apt-get install spamassassin")
    port = free_port()
    home = tmp_path_factory.mktemp("spamd")
    args = [binary, f"--listen=127.0.0.1:{port}", "-x", "--allowed-ips=127.0.0.1", "--max-children=2",
            "--syslog=stderr", f"--pidfile={home}/spamd.pid"]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    log = open(home / "spamd.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(home)})
    try:
        wait_for(lambda: proc.poll() is None and spamd_answers(port), timeout=90, interval=0.2, what="spamd")
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def make_server(tmp_path_factory, dns_server, port):
    return own_server(tmp_path_factory.mktemp("spam"), dns_sets(dns_server) + [
        "spam.spamd_host=127.0.0.1", f"spam.spamd_port={port}", "spam.timeout=30",
        "hooks.allow_private_targets=true",
        "api.domains_rate_limit_per_minute=100000"])


@pytest.fixture(scope="module")
def srv(tmp_path_factory, dns_server, spamd_port):
    with make_server(tmp_path_factory, dns_server, spamd_port) as s:
        yield s


def domain_with_box(srv, action: str) -> str:
    d = f"sp{uuid.uuid4().hex[:8]}.example.test"
    assert srv.api("POST", "/v3/domains", data={"name": d}).status_code == 200
    assert srv.api("PUT", f"/v3/domains/{d}", data={"spam_action": action}).status_code == 200
    assert srv.api("POST", f"/v3/{d}/mailboxes", data={"mailbox": "box", "password": "box-pass-1"}).status_code == 200
    return d


def send(srv, rcpt: str, body: str, sender: str) -> str:
    subject = f"s-{uuid.uuid4().hex[:8]}"
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as c:
        c.ehlo("mail.spf-ok.test")
        c.sendmail(sender, [rcpt], f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
                                   f"Message-ID: <{subject}@spf-ok.test>\r\n\r\n{body}\r\n".encode())
    return subject


def filed(srv, subject: str) -> list:
    rows = store_query(srv, "select b.data from mail_message mm join blob b on b.sha256 = mm.blob")
    out = []
    for (data,) in rows:
        msg = email.message_from_bytes(bytes(data), policy=policy.compat32)
        if msg["Subject"] == subject:
            out.append(msg)
    return out


def test_tag_marks_spam_and_clean_mail_with_spf(srv, dns_server):
    dns_server.set("spf-ok.test", "TXT", '"v=spf1 ip4:127.0.0.1 -all"')
    d = domain_with_box(srv, "tag")
    spam_subject = send(srv, f"box@{d}", GTUBE, "a@spf-ok.test")
    clean_subject = send(srv, f"box@{d}", "Lunch on Thursday? The usual place at noon.", "a@spf-ok.test")
    spam = wait_for(lambda: filed(srv, spam_subject), what="spam filed")[0]
    assert spam["X-Mailgun-Sflag"] == "Yes" and float(spam["X-Mailgun-Sscore"]) >= 5.0
    assert spam["X-Mailgun-Spf"] == "Pass"
    clean = wait_for(lambda: filed(srv, clean_subject), what="clean filed")[0]
    assert clean["X-Mailgun-Sflag"] == "No" and float(clean["X-Mailgun-Sscore"]) < 5.0


def test_block_drops_spam_with_an_event_and_passes_clean_mail(srv):
    d = domain_with_box(srv, "block")
    spam_subject = send(srv, f"box@{d}", GTUBE, "b@far.test")
    clean_subject = send(srv, f"box@{d}", "Minutes of today's meeting are attached below.", "b@far.test")
    clean = wait_for(lambda: filed(srv, clean_subject), what="clean filed")[0]
    assert clean["X-Mailgun-Sflag"] == "No"
    events = wait_for(lambda: store_query(srv, "select data from event where event = 'rejected' and domain = ?", d),
                      what="rejected event")
    assert "spam" in events[0][0]
    assert filed(srv, spam_subject) == []


def test_disabled_domain_is_not_checked(srv):
    d = domain_with_box(srv, "disabled")
    subject = send(srv, f"box@{d}", GTUBE, "c@far.test")
    msg = wait_for(lambda: filed(srv, subject), what="filed")[0]
    assert msg["X-Mailgun-Sflag"] is None


def test_spamd_unreachable_accepts_and_tags_unchecked(tmp_path_factory, dns_server):
    with make_server(tmp_path_factory, dns_server, free_port()) as s:  # nothing listens there
        d = domain_with_box(s, "block")
        subject = send(s, f"box@{d}", GTUBE, "d@far.test")
        msg = wait_for(lambda: filed(s, subject), timeout=30, what="filed unchecked")[0]
        assert msg["X-Mailgun-Sflag"] == "Unchecked"


def test_routes_see_the_verdict(srv):
    from tests.test_routes import Receiver, form_fields
    rec = Receiver()
    try:
        tag = domain_with_box(srv, "tag")
        block = domain_with_box(srv, "block")
        for d in (tag, block):
            r = srv.api("POST", "/v3/routes", data={"expression": f'match_recipient("hook@{d}")',
                                                   "action": [f'forward("{rec.url("/" + d)}")', "stop()"]})
            assert r.status_code == 200
        send(srv, f"hook@{tag}", GTUBE, "e@far.test")
        post = wait_for(lambda: rec.to("/" + tag), what="tagged post")[0]
        fields, _ = form_fields(post)
        assert fields["X-Mailgun-Sflag"] == ["Yes"]
        assert ["X-Mailgun-Sflag", "Yes"] in json.loads(fields["message-headers"][0])
        send(srv, f"hook@{block}", GTUBE, "e@far.test")
        clean = send(srv, f"hook@{block}", "See you at the station at eight.", "e@far.test")
        post = wait_for(lambda: rec.to("/" + block), what="clean post")
        assert len(post) == 1 and form_fields(post[0])[0]["subject"] == [clean]  # the spam one never came
    finally:
        rec.close()
