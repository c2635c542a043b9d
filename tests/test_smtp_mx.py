"""The MX listener over real sockets with smtplib: extensions, the RCPT decision (ours, unknown,
relay attempts in every disguise), 250 only after the commit, size and recipient limits,
STARTTLS, SMTPUTF8 and byte-exact bodies."""
from __future__ import annotations

import json
import re
import smtplib
import ssl
import uuid

import pytest

from tests.support import MailplatServer
from tests.test_domains_api import store_query


@pytest.fixture(scope="module")
def dom(server: MailplatServer) -> str:
    domain = f"mx{uuid.uuid4().hex[:8]}.example.test"
    assert server.api("POST", "/v3/domains", data={"name": domain}).status_code == 200
    for box in ("bob", "alice"):
        r = server.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": box, "password": "box-pass-1"})
        assert r.status_code == 200, r.text
    return domain


def client(server: MailplatServer) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30)
    c.ehlo("client.test")
    return c


def stored(server: MailplatServer, job_id: str) -> tuple[bytes, str, list]:
    """(exact bytes the client sent, mail_from, rcpt_tos) of the committed inbound job
    `in-<n>`; the stored message must be our Received: trace header naming the job, then
    those bytes unchanged."""
    n = int(job_id.removeprefix("in-"))
    rows = store_query(server, "select b.data, j.mail_from, j.rcpt_tos from inbound_job j "
                               "join blob b on b.sha256 = j.blob where j.id = ?", n)
    assert rows, f"job {job_id} not committed"
    data, mail_from, rcpts = rows[0]
    data = bytes(data)
    trace = re.match(rb"Received: from \[127\.0\.0\.1\] by \S+ \(mailplat\) with ESMTP id "
                     + job_id.encode() + rb";\r\n\t[^\r\n]+\r\n", data)
    assert trace, data[:200]
    return data[trace.end():], mail_from, json.loads(rcpts) if isinstance(rcpts, str) else rcpts


def queued_id(reply: bytes) -> str:
    assert reply.startswith(b"2.0.0 Ok: queued as "), reply
    return reply.rsplit(b" ", 1)[1].decode()


def test_ehlo_extensions(server):
    c = client(server)
    for ext in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "starttls"):
        assert c.has_extn(ext), ext
    assert c.esmtp_features["size"] == "26214400"
    assert not c.has_extn("auth")  # the MX is not a submission service
    c.quit()


def test_delivery_is_committed_before_250(server, dom):
    body = b"From: a@remote.test\r\nTo: bob@" + dom.encode() + b"\r\nSubject: hi\r\n\r\nHello Bob\r\n"
    c = client(server)
    c.mail("a@remote.test")
    assert c.rcpt(f"bob@{dom}")[0] == 250
    assert c.rcpt(f"Alice@{dom.upper()}")[0] == 250
    code, reply = c.data(body)
    assert code == 250
    data, mail_from, rcpts = stored(server, queued_id(reply))
    assert data == body
    assert mail_from == "a@remote.test"
    assert f"bob@{dom}" in rcpts and f"alice@{dom}" in rcpts
    c.quit()


def test_unknown_local_part_is_550_during_session(server, dom):
    c = client(server)
    c.mail("a@remote.test")
    code, msg = c.rcpt(f"nobody@{dom}")
    assert (code, msg[:5]) == (550, b"5.1.1")
    code, msg = c.rcpt(f"evil%remote.test@{dom}")  # percent hack: just an unknown local part
    assert (code, msg[:5]) == (550, b"5.1.1")
    c.quit()


@pytest.mark.parametrize("rcpt", [
    "victim@remote.test",
    "bob@{dom}.evil.test",          # look-alike: our name as a prefix
    "bob@x{dom}",                    # look-alike: our name as a suffix
    "bob@[127.0.0.1]",               # domain literal
    "@{dom}:victim@remote.test",     # source route through us
    "@{dom},@{dom}:victim@remote.test",
])
def test_relay_attempts_get_554(server, dom, rcpt):
    c = client(server)
    c.mail("a@remote.test")
    code, msg = c.docmd(f"RCPT TO:<{rcpt.format(dom=dom)}>")
    assert (code, msg[:5]) == (554, b"5.7.1"), msg
    c.quit()


def test_source_route_to_us_is_ignored(server, dom):
    c = client(server)
    c.mail("a@remote.test")
    code, _ = c.docmd(f"RCPT TO:<@relay.remote.test:bob@{dom}>")
    assert code == 250
    code, reply = c.data(b"Subject: routed\r\n\r\nx\r\n")
    assert code == 250
    assert stored(server, queued_id(reply))[2] == [f"bob@{dom}"]
    c.quit()


def test_size_limit_announced_and_enforced(server, dom):
    c = client(server)
    code, msg = c.docmd("MAIL FROM:<a@remote.test> SIZE=26214401")
    assert (code, msg[:5]) == (552, b"5.3.4")
    assert c.docmd("MAIL FROM:<a@remote.test> SIZE=26214400")[0] == 250
    assert c.rcpt(f"bob@{dom}")[0] == 250
    assert c.docmd("DATA")[0] == 354
    line = b"x" * 998 + b"\r\n"
    chunk = line * 1000
    sent = 0
    while sent <= 26_214_400:
        c.sock.sendall(chunk)
        sent += len(chunk)
    c.sock.sendall(b".\r\n")
    code, msg = c.getreply()
    assert (code, msg[:5]) == (552, b"5.3.4")
    assert c.noop()[0] == 250  # the session goes on
    c.quit()


def test_recipient_limit_452_after_1000(server, dom):
    c = client(server)
    c.mail("a@remote.test")
    lines = b"".join(f"RCPT TO:<bob@{dom}>\r\n".encode() for _ in range(1050))
    c.sock.sendall(lines)  # PIPELINING: one write, replies read afterwards
    replies = [c.getreply() for _ in range(1050)]
    assert [r[0] for r in replies[:1000]] == [250] * 1000
    # Every recipient past the limit gets 452 4.5.3, and the session is not hung up on.
    assert {r for r in replies[1000:]} == {(452, b"4.5.3 Too many recipients")}
    code, reply = c.data(b"Subject: many\r\n\r\nx\r\n")
    assert code == 250
    assert len(stored(server, queued_id(reply))[2]) == 1000
    c.quit()


def test_starttls_then_deliver(server, dom):
    c = client(server)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    assert c.starttls(context=ctx)[0] == 220
    c.ehlo("client.test")
    assert not c.has_extn("starttls")
    before = store_query(server, "select count(*) from inbound_job")[0][0]
    assert c.sendmail("a@remote.test", [f"bob@{dom}"], b"Subject: tls\r\n\r\nsecret\r\n") == {}
    assert store_query(server, "select count(*) from inbound_job")[0][0] == before + 1
    c.quit()


def test_smtputf8_and_8bit_bodies_byte_exact(server, dom):
    body = ("From: Jörg <jörg@bücher.test>\r\nTo: bob@" + dom + "\r\nSubject: Grüße\r\n\r\n"
            "Ünïcödé body\r\n").encode() + b"raw latin-1 \xe9\xe8\r\n" + b"L" * 5000 + b"\r\n"
    c = client(server)
    c.command_encoding = "utf-8"
    code, _ = c.docmd("MAIL FROM:<jörg@bücher.test> SMTPUTF8 BODY=8BITMIME")
    assert code == 250
    assert c.rcpt(f"bob@{dom}")[0] == 250
    code, reply = c.data(body)
    assert code == 250
    data, mail_from, _ = stored(server, queued_id(reply))
    assert data == body
    assert mail_from == "jörg@xn--bcher-kva.test"
    c.quit()


def test_non_ascii_sender_without_smtputf8_refused(server):
    c = client(server)
    c.command_encoding = "utf-8"
    code, msg = c.docmd("MAIL FROM:<jörg@example.test>")
    assert code == 553 and msg.startswith(b"5.6.7")
    c.quit()


def test_null_sender_and_postmaster(server, dom):
    c = client(server)
    assert c.docmd("MAIL FROM:<>")[0] == 250
    assert c.rcpt(f"bob@{dom}")[0] == 250
    assert c.data(b"Subject: bounce\r\n\r\nx\r\n")[0] == 250
    c.quit()


def test_sequence_errors(server, dom):
    c = smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30)
    assert c.docmd("MAIL FROM:<a@remote.test>")[0] == 503  # no EHLO yet
    c.ehlo("client.test")
    assert c.docmd(f"RCPT TO:<bob@{dom}>")[0] == 503
    assert c.docmd("DATA")[0] == 503
    assert c.docmd("AUTH PLAIN AGJvYgBwdw==")[0] == 503
    assert c.docmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.docmd("MAIL FROM:<a@remote.test>")[0] == 503
    assert c.docmd("RSET")[0] == 250
    assert c.docmd("VRFY bob")[0] == 252
    c.quit()


def test_unicode_look_alike_domain_is_relay_denied(server, dom):
    look_alike = dom.replace("e", "\u0435", 1)  # Cyrillic "е" for the first Latin "e"
    assert look_alike != dom
    c = client(server)
    c.command_encoding = "utf-8"
    assert c.docmd("MAIL FROM:<a@remote.test> SMTPUTF8")[0] == 250
    code, msg = c.docmd(f"RCPT TO:<bob@{look_alike}>")
    assert (code, msg[:5]) == (554, b"5.7.1"), msg
    code, msg = c.docmd(f"RCPT TO:<bob@{dom}.>")  # trailing dot: not a valid path
    assert (code, msg[:5]) == (501, b"5.1.3"), msg
    c.quit()
