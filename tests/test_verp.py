"""VERP return paths over real sockets: the relay sends API mail with MAIL FROM
bounce+<token>@<sending domain> (one token per recipient), a DSN delivered to that address at
our MX becomes a `failed` event for exactly that message and recipient (even when the DSN names
neither) and, for a hard bounce, a bounce suppression; an auto-reply there is accepted and
ignored; a forged token is refused at RCPT with 550 5.1.1."""
from __future__ import annotations

import re
import smtplib
import uuid

import pytest

from tests.conftest import dns_sets
from tests.relaytest import create_domain, point_mx
from tests.smtpsink import SmtpSink, free_port
from tests.support import wait_for as _wait
from tests.webhookrecv import HookReceiver as Receiver
from tests.support import start_server, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    tmp = tmp_path_factory.mktemp("verp")
    port = free_port()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={port}",
                                   "relay.retry_schedule=0.5,1.0", "relay.connect_timeout=5",
                                   "relay.command_timeout=10", "hooks.allow_private_targets=true"]
    server = start_server(tmp / "data", sets=sets)
    sink = SmtpSink(host="127.0.0.61", port=port).start()
    yield server, dns_server, sink
    server.stop()
    sink.stop()


def dsn(status: str, action: str, final_rcpt: str, diag: str) -> bytes:
    """A DSN with no returned headers (no Message-Id) naming a recipient address of its own."""
    return f"""From: MAILER-DAEMON@remote.test
To: someone@remote.test
Subject: Delivery Status Notification
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BB"

--BB
Content-Type: text/plain

Delivery to one recipient did not succeed.

--BB
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.remote.test

Final-Recipient: rfc822; {final_rcpt}
Action: {action}
Status: {status}
Diagnostic-Code: smtp; {diag}

--BB--
""".replace("\n", "\r\n").encode()


def mx_transaction(server, rcpt: str, data: bytes) -> tuple[int, int]:
    """(RCPT reply code, DATA reply code or 0) for one message to our MX with a null sender."""
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("mx.remote.test")
        assert s.docmd("MAIL FROM:<>")[0] == 250
        code, _ = s.docmd(f"RCPT TO:<{rcpt}>")
        if code != 250:
            return code, 0
        return code, s.data(data)[0]


def events(server, d, **params):
    r = server.api("GET", f"/v3/{d}/events", params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_verp_return_path_bounces_back_to_the_exact_recipient(env):
    server, dns, sink = env
    d = f"v{uuid.uuid4().hex[:8]}.example.test"
    create_domain(server, dns, d)
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    point_mx(dns, rdom, "127.0.0.61")
    hard, soft = f"gone@{rdom}", f"full@{rdom}"
    r = server.api("POST", f"/v3/{d}/messages", data={"from": f"News <news@{d}>", "to": [hard, soft],
                                                       "subject": "Hello", "text": "Hi.\n"})
    assert r.status_code == 200, r.text
    mid = r.json()["id"].strip("<>")
    got = {m.rcpt_tos[0]: m for m in sink.wait_count(2, timeout=30)}
    shape = re.compile(r"^bounce\+[0-9a-f]+-[0-9a-f]{20}@" + re.escape(d) + "$")
    for rcpt in (hard, soft):
        assert shape.match(got[rcpt].mail_from), got[rcpt].mail_from
        assert f"news@{d}".encode() in got[rcpt].data  # the From header is the customer's
    assert got[hard].mail_from != got[soft].mail_from  # one token per recipient

    # An auto-reply to the return path is accepted and ignored; then a hard bounce whose body
    # names another address and no Message-Id (an MTA upper-casing the local part), then a
    # delayed one for the other recipient.
    auto = (f"From: {hard}\r\nTo: {got[hard].mail_from}\r\nSubject: Out of office\r\n"
            f"Auto-Submitted: auto-replied\r\n\r\nI am away.\r\n").encode()
    assert mx_transaction(server, got[hard].mail_from, auto) == (250, 250)
    verp_hard = got[hard].mail_from
    upper = verp_hard.split("@")[0].upper() + "@" + d
    assert mx_transaction(server, upper, dsn("5.1.1", "failed", "alias-of-gone@internal.test",
                                            "550 5.1.1 user unknown")) == (250, 250)
    assert mx_transaction(server, got[soft].mail_from, dsn("4.2.2", "delayed", "whoever@internal.test",
                                                          "452 4.2.2 mailbox full")) == (250, 250)

    failed = wait_for(lambda: [e for e in events(server, d, event="failed", recipient=hard)
                               if e.get("flags", {}).get("is-delayed-bounce")], timeout=20,
                      what="failed event from the DSN")
    assert len(failed) == 1
    ev = failed[0]
    assert ev["severity"] == "permanent" and ev["reason"] == "bounce"
    assert ev["delivery-status"]["code"] == 550 and ev["delivery-status"]["enhanced-code"] == "5.1.1"
    assert "user unknown" in ev["delivery-status"]["description"]
    assert ev["message"]["headers"]["message-id"] == mid
    b = server.api("GET", f"/v3/{d}/bounces/{hard}")
    assert b.status_code == 200, b.text
    assert b.json()["address"] == hard and b.json()["code"] == "550"

    temp = wait_for(lambda: [e for e in events(server, d, event="failed", recipient=soft)
                             if e.get("flags", {}).get("is-delayed-bounce")], timeout=20, what="delayed DSN")
    assert len(temp) == 1 and temp[0]["severity"] == "temporary"
    assert temp[0]["delivery-status"]["enhanced-code"] == "4.2.2" and temp[0]["delivery-status"]["code"] == 452
    assert server.api("GET", f"/v3/{d}/bounces/{soft}").status_code == 404
    # Nothing at all about the addresses the DSN bodies named, and the auto-reply (handled
    # before the DSNs: jobs are handled in order) added no event.
    assert events(server, d, recipient="alias-of-gone@internal.test") == []
    assert len(events(server, d, event="failed", recipient=hard)) == 1

    # Forged, tampered, foreign-domain and malformed tokens are refused at RCPT.
    local = verp_hard.split("@")[0]
    qid, mac = local[len("bounce+"):].split("-")
    other = f"v{uuid.uuid4().hex[:8]}.example.test"
    create_domain(server, dns, other)
    forged = [f"bounce+{qid}-{'0' * 20}@{d}",
              f"bounce+{int(qid, 16) + 1:x}-{mac}@{d}",
              f"{local}@{other}",
              f"bounce+nonsense@{d}",
              f"bounce+{qid}-{mac[:-1]}@{d}"]
    for address in forged:
        assert mx_transaction(server, address, b"x")[0] == 550, address


def test_routes_never_act_on_bounce_addresses(env):
    """A route matching every address of the domain forwards ordinary mail but not the DSN sent
    to a return path: bounce addresses belong to the feedback path alone."""
    server, dns, sink = env
    d = f"v{uuid.uuid4().hex[:8]}.example.test"
    create_domain(server, dns, d)
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    point_mx(dns, rdom, "127.0.0.61")
    receiver = Receiver()
    try:
        r = server.api("POST", "/v3/routes", data={"expression": f'match_recipient(".*@{re.escape(d)}")',
                                                   "action": f'forward("{receiver.url("/r")}")'})
        assert r.status_code == 200, r.text
        gone = f"gone@{rdom}"
        assert server.api("POST", f"/v3/{d}/messages", data={"from": f"news@{d}", "to": gone,
                                                             "text": "Hi.\n"}).status_code == 200
        copy = _wait(lambda: next((m for m in list(sink.messages) if m.rcpt_tos == [gone]), None),
                     timeout=30, what="the copy at the sink")
        assert mx_transaction(server, copy.mail_from, dsn("5.1.1", "failed", gone, "no such user")) == (250, 250)
        _wait(lambda: events(server, d, event="failed", recipient=gone), timeout=30, what="the bounce event")
        hello = f"Subject: hi\r\nFrom: a@{rdom}\r\nTo: hello@{d}\r\n\r\nhello\r\n".encode()
        assert mx_transaction(server, f"hello@{d}", hello) == (250, 250)
        posts = _wait(lambda: receiver.to("/r"), timeout=30, what="the routed post")
        assert len(posts) == 1 and f"hello@{d}".encode() in posts[0]["body"]
    finally:
        receiver.close()
