"""SMTP submission over real sockets with smtplib: 587 with STARTTLS and 465 with implicit TLS,
AUTH only after TLS (outside dev mode), 530 before AUTH, no relay without AUTH, senders limited
to the login's domain, X-Mailgun-* headers read and stripped, 250 only after the commit."""
from __future__ import annotations

import contextlib
import json
import os
import re
import smtplib
import ssl
import uuid

import pytest

from tests.conftest import PG_BASE
from tests.support import MailplatServer, init_data_dir, pg_database, serve
from tests.test_domains_api import store_query

PASSWORD = "Submit-pw-42"


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    """A production-like server: dev_mode off, so AUTH needs TLS even on loopback."""
    data_dir = tmp_path_factory.mktemp("smtpsub")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_database(PG_BASE)) if os.environ.get("MAILPLAT_TEST_PG_SERVER") and PG_BASE else None
        key = init_data_dir(data_dir, db_url=url)
        yield from _serve(data_dir, key)


def _serve(data_dir, key):
    conf = data_dir / "mailplat.toml"
    text = conf.read_text()
    assert "dev_mode = true" in text
    conf.write_text(text.replace("dev_mode = true", "dev_mode = false"))
    srv = serve(data_dir, key, services=["api", "smtpd"])
    try:
        yield _setup(srv)
    finally:
        srv.stop()


def _setup(srv: MailplatServer) -> MailplatServer:
    domain = f"sub{uuid.uuid4().hex[:8]}.example.test"
    r = srv.api("POST", "/v3/domains", data={"name": domain, "smtp_password": PASSWORD})
    assert r.status_code == 200, r.text
    r = srv.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": "carol", "password": "carol-pw-1"})
    assert r.status_code == 200, r.text
    other = f"other{uuid.uuid4().hex[:8]}.example.test"
    r = srv.api("POST", "/v3/domains", data={"name": other, "smtp_password": "Other-pw-1"})
    assert r.status_code == 200, r.text
    srv.domain, srv.other = domain, other
    return srv


def starttls_client(srv: MailplatServer) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30)
    c.ehlo("client.test")
    c.starttls(context=tls_context())
    c.ehlo("client.test")
    return c


def message_row(srv: MailplatServer, message_id: str) -> tuple[bytes, list, str, str]:
    rows = store_query(srv, "select b.data, m.tags, m.sender, m.user_variables from message m "
                            "join blob b on b.sha256 = m.blob where m.message_id = ?", message_id)
    assert rows, f"message {message_id} not committed"
    data, tags, sender, uv = rows[0]
    return bytes(data), json.loads(tags), sender, json.loads(uv)


def queued_id(reply: bytes) -> str:
    m = re.match(rb"2\.0\.0 Ok: queued as (\S+)$", reply)
    assert m, reply
    return m.group(1).decode()


def test_auth_offered_only_after_tls(sub):
    c = smtplib.SMTP("127.0.0.1", sub.ports["submission"], timeout=30)
    c.ehlo("client.test")
    assert c.has_extn("starttls") and not c.has_extn("auth")
    code, msg = c.docmd("AUTH PLAIN AHBvc3RtYXN0ZXIAeA==")
    assert (code, msg[:6]) == (538, b"5.7.11")
    c.starttls(context=tls_context())
    c.ehlo("client.test")
    assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    assert not c.has_extn("starttls")
    c.quit()


def test_mail_before_auth_is_530_and_no_relay(sub):
    for c in (smtplib.SMTP("127.0.0.1", sub.ports["submission"], timeout=30), starttls_client(sub)):
        c.ehlo("client.test")
        code, msg = c.docmd(f"MAIL FROM:<postmaster@{sub.domain}>")
        assert (code, msg[:5]) == (530, b"5.7.0")
        code, _ = c.docmd("RCPT TO:<victim@remote.test>")
        assert code == 503
        assert c.docmd("DATA")[0] == 503
        c.quit()
    rows = store_query(sub, "select count(*) from queue_item where recipient = ?", "victim@remote.test")
    assert rows == [(0,)]


def test_starttls_auth_plain_send_strips_x_mailgun_headers(sub):
    c = starttls_client(sub)
    assert c.login(f"postmaster@{sub.domain}", PASSWORD)[0] == 235  # smtplib picks PLAIN
    msg = (f"From: Sender <postmaster@{sub.domain}>\r\nTo: someone@remote.test\r\n"
           "Subject: tagged\r\nX-Mailgun-Tag: newsletter\r\nX-Mailgun-Tag: weekly\r\n"
           'X-Mailgun-Variables: {"user-id": "42"}\r\n\r\nBody text\r\n').encode()
    c.mail(f"postmaster@{sub.domain}")
    assert c.rcpt("someone@remote.test")[0] == 250
    code, reply = c.data(msg)
    assert code == 250
    data, tags, sender, uv = message_row(sub, queued_id(reply))
    assert sorted(tags) == ["newsletter", "weekly"]
    assert uv == {"user-id": "42"}
    assert sender == f"postmaster@{sub.domain}"
    assert b"X-Mailgun" not in data
    assert b"Subject: tagged\r\n" in data and data.endswith(b"Body text\r\n")
    rows = store_query(sub, "select q.recipient from queue_item q join message m on m.id = q.message_id "
                            "where m.message_id = ?", queued_id(reply))
    assert rows == [("someone@remote.test",)]
    c.quit()


def test_implicit_tls_465_with_auth_login(sub):
    c = smtplib.SMTP_SSL("127.0.0.1", sub.ports["submissions"], timeout=30, context=tls_context())
    c.ehlo("client.test")
    assert not c.has_extn("starttls") and c.has_extn("auth")
    c.user, c.password = f"postmaster@{sub.domain}", PASSWORD
    code, _ = c.auth("LOGIN", c.auth_login, initial_response_ok=False)
    assert code == 235
    res = c.sendmail(f"postmaster@{sub.domain}", ["a@remote.test", "b@remote.test"],
                     f"From: postmaster@{sub.domain}\r\nSubject: 465\r\n\r\nhi\r\n".encode())
    assert res == {}
    c.quit()


def test_mailbox_login_can_submit(sub):
    c = starttls_client(sub)
    assert c.login(f"carol@{sub.domain}", "carol-pw-1")[0] == 235
    assert c.sendmail(f"carol@{sub.domain}", ["x@remote.test"],
                      f"From: carol@{sub.domain}\r\nSubject: m\r\n\r\nhi\r\n".encode()) == {}
    c.quit()


def test_wrong_password_is_535(sub):
    c = starttls_client(sub)
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        c.login(f"postmaster@{sub.domain}", "not-the-password")
    assert info.value.smtp_code == 535
    c.quit()


def test_sender_must_be_in_the_login_domain(sub):
    c = starttls_client(sub)
    c.login(f"postmaster@{sub.domain}", PASSWORD)
    code, msg = c.docmd(f"MAIL FROM:<postmaster@{sub.other}>")
    assert (code, msg[:5]) == (550, b"5.7.1")
    assert c.docmd("MAIL FROM:<>")[0] == 550
    # Envelope in our domain but a From: header in someone else's: refused at end of DATA.
    c.mail(f"postmaster@{sub.domain}")
    c.rcpt("x@remote.test")
    code, msg = c.data(f"From: ceo@{sub.other}\r\nSubject: spoof\r\n\r\nx\r\n".encode())
    assert (code, msg[:5]) == (550, b"5.7.1")
    assert store_query(sub, "select count(*) from message where domain = ?", sub.other) == [(0,)]
    c.quit()


def test_bad_x_mailgun_header_is_refused_with_nothing_stored(sub):
    c = starttls_client(sub)
    c.login(f"postmaster@{sub.domain}", PASSWORD)
    before = store_query(sub, "select count(*) from message")[0][0]
    c.mail(f"postmaster@{sub.domain}")
    c.rcpt("x@remote.test")
    code, msg = c.data(f"From: postmaster@{sub.domain}\r\nX-Mailgun-Variables: not json\r\n\r\nx\r\n".encode())
    assert 500 <= code < 600, (code, msg)
    assert store_query(sub, "select count(*) from message")[0][0] == before
    assert c.noop()[0] == 250
    c.quit()


def test_dev_mode_allows_plaintext_auth_on_loopback(server):
    """conftest's server runs in dev mode: loopback clients may AUTH without TLS."""
    domain = f"dev{uuid.uuid4().hex[:8]}.example.test"
    r = server.api("POST", "/v3/domains", data={"name": domain, "smtp_password": PASSWORD})
    assert r.status_code == 200, r.text
    c = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
    c.ehlo("client.test")
    assert c.has_extn("auth")
    assert c.login(f"postmaster@{domain}", PASSWORD)[0] == 235
    assert c.sendmail(f"postmaster@{domain}", ["x@remote.test"],
                      f"From: postmaster@{domain}\r\nSubject: dev\r\n\r\nhi\r\n".encode()) == {}
    c.quit()


def test_from_domains_reads_the_fields_the_header_parser_reads():
    from mailplat.smtpd.submission import from_domains
    assert from_domains(b"From: A <a@Ex.Test>, b@x.test\r\nfrom: c@y.test\r\n\r\nFrom: d@z.test\r\n") \
        == ["ex.test", "x.test", "y.test"]
    assert from_domains(b"From: \"A, B\" <a@ex.test>\r\n (c)\r\nTo: x@y.test\r\n\r\nb\r\n") == ["ex.test"]
    assert from_domains("From: a@b\u00fccher.example\r\n\r\nb\r\n".encode()) == ["xn--bcher-kva.example"]
    assert from_domains(b"From: a@\r\n ex.test\r\n\r\nb\r\n") == ["ex.test"]
    # Past a line that is not a field the parser reads no more headers: neither do we.
    assert from_domains(b"Subject: x\r\nnot a field\r\nFrom: a@ex.test\r\n\r\nb\r\n") == []
    assert from_domains(b"From a@ex.test\r\nFrom: b@x.test\r\n\r\nb\r\n") == ["x.test"]
    # Plain address lists (read without email.utils) give what getaddresses gives.
    assert from_domains(b"From: a@B.c,,Name Two <d@e.f>\r\n\r\n") == ["b.c", "", "e.f"]
    assert from_domains(b"From: A B <a@x.test>\r\nFrom: c@Y.test\r\n\r\n") == ["x.test", "y.test"]
    assert from_domains(b"From: \r\n\r\n") == []
