"""Submission without AUTH from config smtp.trusted_networks, over real sockets with smtplib.

The server trusts 127.0.0.2/32 only: a client bound to 127.0.0.2 may submit without AUTH with
a sender in one of our domains (queued like authenticated mail, X-Mailgun-* headers read and
stripped), a foreign or null sender is refused with 5.7.1 (never an open relay), and a client
on 127.0.0.1 still gets 530 before AUTH."""
from __future__ import annotations

import contextlib
import os
import smtplib
import uuid

import pytest

from tests.conftest import PG_BASE
from tests.support import pg_database, start_server, wait_for
from tests.test_domains_api import store_query
from tests.test_send_api import StoredView
from tests.test_smtp_submission import message_row, queued_id

TRUSTED_IP = "127.0.0.2"


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    with smtpd_with_domain(tmp_path_factory.mktemp("smtptrusted"), "trust",
                           [f"smtp.trusted_networks={TRUSTED_IP}/32"]) as srv:
        yield srv


@contextlib.contextmanager
def smtpd_with_domain(data_dir, prefix: str, sets: list[str]):
    """`serve api smtpd` (on PostgreSQL when MAILPLAT_TEST_PG_SERVER is set) with one sending
    domain created, as `srv.domain`; stopped afterwards."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_database(PG_BASE)) if os.environ.get("MAILPLAT_TEST_PG_SERVER") and PG_BASE else None
        srv = start_server(data_dir, db_url=url, sets=sets, services=["api", "smtpd"])
        try:
            srv.domain = f"{prefix}{uuid.uuid4().hex[:8]}.example.test"
            r = srv.api("POST", "/v3/domains", data={"name": srv.domain})
            assert r.status_code == 200, r.text
            yield srv
        finally:
            srv.stop()


def client(srv, source: str = TRUSTED_IP) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30, source_address=(source, 0))
    c.ehlo("client.test")
    return c


def queued(srv, message_id: str) -> list[tuple]:
    return store_query(srv, "select q.recipient, q.state from queue_item q join message m "
                            "on m.id = q.message_id where m.message_id = ?", message_id)


def test_trusted_network_submits_without_auth(trusted):
    c = client(trusted)
    sender = f"app@{trusted.domain}"
    assert c.mail(sender)[0] == 250
    assert c.rcpt("someone@remote.test")[0] == 250
    code, reply = c.data((f"From: App <{sender}>\r\nTo: someone@remote.test\r\nSubject: no auth\r\n"
                          "X-Mailgun-Tag: trusted\r\n\r\nBody\r\n").encode())
    assert code == 250, reply
    message_id = queued_id(reply)
    data, tags, stored_sender, _uv = message_row(trusted, message_id)
    assert (tags, stored_sender) == (["trusted"], sender)
    assert b"X-Mailgun" not in data and data.endswith(b"Body\r\n")
    assert queued(trusted, message_id) == [("someone@remote.test", "queued")]
    c.quit()
    wait_for(lambda: "trusted-network submission without AUTH" in trusted.logs(), timeout=10,
             what="the trusted submission to be logged")


def test_trusted_network_foreign_sender_is_refused(trusted):
    c = client(trusted)
    for sender in ("spammer@remote.test", "", "x@[192.0.2.1]"):
        code, msg = c.docmd(f"MAIL FROM:<{sender}>")
        assert (code, msg[:5]) == (550, b"5.7.1"), (sender, code, msg)
        assert c.docmd("RCPT TO:<victim@remote.test>")[0] == 503
    # Our envelope sender but somebody else's From: refused at end of DATA, nothing stored.
    c.mail(f"app@{trusted.domain}")
    c.rcpt("victim@remote.test")
    code, msg = c.data(b"From: ceo@remote.test\r\nSubject: spoof\r\n\r\nx\r\n")
    assert (code, msg[:5]) == (550, b"5.7.1"), msg
    c.quit()
    assert store_query(trusted, "select count(*) from queue_item where recipient = ?",
                       "victim@remote.test") == [(0,)]
    assert "trusted-network sender refused" in trusted.logs()


def test_untrusted_address_still_needs_auth(trusted):
    c = client(trusted, source="127.0.0.1")
    code, msg = c.docmd(f"MAIL FROM:<app@{trusted.domain}>")
    assert (code, msg[:5]) == (530, b"5.7.0")
    assert c.docmd("RCPT TO:<victim2@remote.test>")[0] == 503
    c.quit()
    # The MX port gives trusted clients nothing: mail for other domains is still relay denied.
    c = smtplib.SMTP("127.0.0.1", trusted.ports["smtp"], timeout=30, source_address=(TRUSTED_IP, 0))
    c.ehlo("client.test")
    assert c.mail(f"app@{trusted.domain}")[0] == 250
    assert c.rcpt("victim2@remote.test")[0] == 554
    c.quit()


def test_domain_created_after_a_refused_mail_is_accepted_at_once(trusted):
    # Only "ours" answers are remembered by the listener: a refusal is never cached.
    domain = f"late{uuid.uuid4().hex[:8]}.example.test"
    c = client(trusted)
    code, msg = c.docmd(f"MAIL FROM:<app@{domain}>")
    assert (code, msg[:5]) == (550, b"5.7.1"), msg
    r = trusted.api("POST", "/v3/domains", data={"name": domain})
    assert r.status_code == 200, r.text
    assert c.docmd(f"MAIL FROM:<app@{domain}>")[0] == 250
    c.quit()


def test_domain_disabled_after_an_accepted_mail_is_refused_at_end_of_data(trusted):
    # A domain remembered as ours may get MAIL accepted for a few seconds after it is
    # disabled; the send transaction checks it again, so nothing is queued.
    domain = f"gone{uuid.uuid4().hex[:8]}.example.test"
    r = trusted.api("POST", "/v3/domains", data={"name": domain})
    assert r.status_code == 200, r.text
    c = client(trusted)
    assert c.mail(f"app@{domain}")[0] == 250
    c.rset()
    StoredView(trusted).execute("UPDATE domain SET is_disabled = ? WHERE name = ?", True, domain)
    assert c.mail(f"app@{domain}")[0] == 250  # remembered: no store read
    assert c.rcpt("victim3@remote.test")[0] == 250
    code, msg = c.data(f"From: app@{domain}\r\nSubject: late\r\n\r\nx\r\n".encode())
    assert (code, msg[:5]) == (550, b"5.7.1"), msg
    c.quit()
    assert store_query(trusted, "select count(*) from queue_item where recipient = ?",
                       "victim3@remote.test") == [(0,)]
