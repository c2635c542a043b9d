"""Feedback by mail over SMTP to the MX: an RFC 3464 DSN about a message we sent becomes a
`failed` event with the DSN's status (hard bounces also a bounce suppression, soft ones a
temporary failure), an RFC 5965 ARF report becomes a `complained` event and a complaint
suppression, and later sends to those addresses are dropped with the right reason."""
from __future__ import annotations

import smtplib
import uuid

import pytest

from tests.support import wait_for
from tests.test_send_api import make_domain

pytestmark = pytest.mark.timeout(120)


def dsn(domain, mid, rcpt, action="failed", status="5.1.1", diag="smtp; 550 5.1.1 <{rcpt}>: user unknown"):
    diag = diag.format(rcpt=rcpt)
    return f"""From: MAILER-DAEMON@remote.test
To: postmaster@{domain}
Subject: Undelivered Mail Returned to Sender
Message-ID: <{uuid.uuid4().hex}@remote.test>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BB"

--BB
Content-Type: text/plain

This is the mail system at host remote.test. Your message could not be delivered.

--BB
Content-Type: message/delivery-status

Reporting-MTA: dns; remote.test
Arrival-Date: Thu, 26 Nov 2026 01:00:00 +0000

Final-Recipient: rfc822; {rcpt}
Original-Recipient: rfc822;{rcpt}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.remote.test
Diagnostic-Code: {diag}

--BB
Content-Type: text/rfc822-headers

From: news@{domain}
To: {rcpt}
Subject: Hello
Message-ID: <{mid}>

--BB--
""".replace("\n", "\r\n").encode()


def arf(domain, mid, rcpt):
    return f"""From: fbl@isp.test
To: fbl@{domain}
Subject: FW: Hello
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="AA"

--AA
Content-Type: text/plain

This is an email abuse report for an email message received from IP 192.0.2.1.

--AA
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeISP-FBL/1.0
Version: 1
Original-Mail-From: <news@{domain}>
Original-Rcpt-To: <{rcpt}>
Arrival-Date: Thu, 26 Nov 2026 01:00:00 +0000
Source-IP: 192.0.2.1

--AA
Content-Type: message/rfc822
Content-Disposition: inline

From: news@{domain}
To: {rcpt}
Subject: Hello
Message-ID: <{mid}>

Hello there.
--AA--
""".replace("\n", "\r\n").encode()


def smtp_deliver(server, rcpt, data):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("remote.test")
        s.sendmail("", [rcpt], data)


def send(server, d, to, **extra):
    r = server.api("POST", f"/v3/{d}/messages", data={"from": f"news@{d}", "to": to, "subject": "Hello",
                                                      "text": "x", "o:testmode": "yes", **extra})
    assert r.status_code == 200, r.text
    return r.json()["id"].strip("<>")


def events(server, d, **params):
    return server.api("GET", f"/v3/{d}/events", params=params).json()["items"]


def test_dsn_and_arf_over_smtp(server):
    d = make_domain(server, f"fb{uuid.uuid4().hex[:6]}.example.test")
    hard, soft, angry = "gone@far.test", "full@far.test", "angry@far.test"
    mid = send(server, d, [hard, soft, angry])
    smtp_deliver(server, f"postmaster@{d}", dsn(d, mid, hard))
    smtp_deliver(server, f"bounces@{d}", dsn(d, mid, soft, action="delayed", status="4.2.2",
                                               diag="smtp; 452 4.2.2 mailbox full"))
    smtp_deliver(server, f"fbl@{d}", arf(d, mid, angry))

    failed = wait_for(lambda: [e for e in events(server, d, event="failed", recipient=hard)], timeout=20,
                      what="failed event from the DSN")[0]
    assert failed["severity"] == "permanent" and failed["reason"] == "bounce"
    assert failed["delivery-status"]["code"] == 550 and failed["delivery-status"]["enhanced-code"] == "5.1.1"
    assert "user unknown" in failed["delivery-status"]["message"]
    assert failed["message"]["headers"]["message-id"] == mid
    b = server.api("GET", f"/v3/{d}/bounces/{hard}")
    assert b.status_code == 200 and b.json()["code"] == "550"

    temp = wait_for(lambda: events(server, d, event="failed", recipient=soft), timeout=20, what="delayed DSN")[0]
    assert temp["severity"] == "temporary" and temp["delivery-status"]["enhanced-code"] == "4.2.2"
    assert server.api("GET", f"/v3/{d}/bounces/{soft}").status_code == 404

    comp = wait_for(lambda: events(server, d, event="complained"), timeout=20, what="complained event")[0]
    assert comp["recipient"] == angry and comp["message"]["headers"]["message-id"] == mid
    assert server.api("GET", f"/v3/{d}/complaints/{angry}").json()["count"] == 1

    # Later sends drop both.
    mid2 = send(server, d, [hard, angry, soft])
    drops = wait_for(lambda: {e["recipient"]: e for e in events(server, d, event="failed", **{"message-id": mid2})},
                     timeout=10, what="drops")
    assert drops[hard]["reason"] == "suppress-bounce" and drops[angry]["reason"] == "suppress-complaint"
    assert soft not in drops


def test_reports_about_unknown_mail_change_nothing(server):
    d = make_domain(server, f"fb{uuid.uuid4().hex[:6]}.example.test")
    mid = send(server, d, "known@far.test")
    smtp_deliver(server, f"postmaster@{d}", dsn(d, "not-ours@elsewhere.test", "x@far.test"))
    smtp_deliver(server, f"postmaster@{d}", dsn(d, mid, "known@far.test"))
    # Inbound jobs are handled in order: once the second report shows, the first was handled.
    wait_for(lambda: events(server, d, event="failed", recipient="known@far.test"), timeout=20, what="marker")
    assert server.api("GET", f"/v3/{d}/bounces/x@far.test").status_code == 404
    assert events(server, d, recipient="x@far.test") == []
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("remote.test")
        code, _ = s.docmd("MAIL FROM:<>")
        assert code == 250
        code, _ = s.docmd(f"RCPT TO:<nobody-here@{d}>")
        assert code == 550
