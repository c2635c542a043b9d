"""Sending with the official Mailgun Python SDK (`mailgun` on PyPI), unchanged, against a real
server: messages.create (urlencoded and multipart with files), messages.mime (message as a
file part), the MailgunMessageBuilder-style fields, error replies, and events read back."""
from __future__ import annotations

import email
import json
from email import policy

import pytest
from mailgun.client import Client

from tests.test_send_api import StoredView, api_only_server, make_domain


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from api_only_server(tmp_path_factory, "mailplat-sdk")


@pytest.fixture(scope="module")
def store(server):
    return StoredView(server)


@pytest.fixture(scope="module")
def domain(server):
    return make_domain(server, "sdk.example.test")


@pytest.fixture
def client(server):
    with Client(auth=("api", server.key), api_url=server.url) as c:
        yield c


def test_sdk_send_plain_form(client, store, domain):
    data = {"from": "Sender <s@sdk.example.test>", "to": ["a@x.test", "b@x.test"], "cc": "c@x.test",
            "bcc": "d@x.test", "subject": "Hi", "text": "plain", "o:tag": ["t1", "t2"], "o:testmode": "yes",
            "o:tracking": False, "v:order": "42", "h:X-Custom": "yes",
            "recipient-variables": '{"a@x.test": {"n": 1}}'}
    r = client.messages.create(data=data, domain=domain)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"] == "Queued. Thank you." and body["id"].endswith("@sdk.example.test>")
    m = store.message(body["id"])
    assert m["tags"] == ["t1", "t2"] and m["options"]["testmode"] is True and m["options"]["tracking"] is False
    assert m["user_variables"] == {"order": "42"}
    assert m["recipient_variables"] == {"a@x.test": {"n": 1}, "b@x.test": {}, "c@x.test": {}, "d@x.test": {}}
    assert [q["recipient"] for q in store.queue(m["id"])] == ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
    msg = email.message_from_bytes(store.blob(m["blob"]), policy=policy.default)
    assert msg["X-Custom"] == "yes" and msg["Bcc"] is None and msg["Cc"] == "c@x.test"
    assert {e["recipient"] for e in store.events(body["id"]) if e["event"] == "accepted"} == {
        "a@x.test", "b@x.test", "c@x.test", "d@x.test"}


def test_sdk_send_with_files(client, store, domain):
    files = [("attachment", ("report.txt", b"report body")),
             ("attachment", ("data.csv", b"a,b\n", "text/csv")),
             ("inline", ("logo.png", b"\x89PNGdata", "image/png"))]
    data = {"from": "s@sdk.example.test", "to": "a@x.test", "subject": "Files",
            "html": '<img src="cid:logo.png">', "text": "x", "o:testmode": "yes"}
    r = client.messages.create(data=data, files=files, domain=domain)
    assert r.status_code == 200, r.text
    m = store.message(r.json()["id"])
    msg = email.message_from_bytes(store.blob(m["blob"]), policy=policy.default)
    got = {a.get_filename(): (a.get_content_type(), a.get_payload(decode=True)) for a in msg.iter_attachments()}
    assert got == {"report.txt": ("text/plain", b"report body"), "data.csv": ("text/csv", b"a,b\n")}
    logo = [p for p in msg.walk() if p["Content-ID"] == "<logo.png>"]
    assert len(logo) == 1 and logo[0].get_payload(decode=True) == b"\x89PNGdata"


def test_sdk_builder_style_fields(client, store, domain):
    data = {"from": "s@sdk.example.test", "to": "a@x.test", "cc": "c@x.test", "subject": "Built",
            "text": "t", "html": "<b>h</b>", "v:k": '{"a":1}', "h:X-H": "v", "o:testmode": "yes",
            "recipient-variables": '{"a@x.test":{"n":1}}', "h:X-Idempotency-Key": "0" * 64}
    r = client.messages.create(data=data, files=[("attachment", ("att.txt", b"att", "text/plain"))], domain=domain)
    assert r.status_code == 200, r.text
    m = store.message(r.json()["id"])
    assert m["user_variables"] == {"k": {"a": 1}}
    msg = email.message_from_bytes(store.blob(m["blob"]), policy=policy.default)
    assert msg["X-H"] == "v"


def test_sdk_mime(client, store, domain):
    mime = (b"From: s@sdk.example.test\r\nTo: a@x.test\r\nSubject: sdk mime\r\n"
            b"X-Mailgun-Variables: {\"src\": \"mime\"}\r\n\r\nhello mime\r\n")
    r = client.mimemessage.create(data={"to": "a@x.test", "o:testmode": "yes"}, files={"message": mime},
                                  domain=domain)
    assert r.status_code == 200, r.text
    m = store.message(r.json()["id"])
    raw = store.blob(m["blob"])
    assert raw.endswith(b"From: s@sdk.example.test\r\nTo: a@x.test\r\nSubject: sdk mime\r\n\r\nhello mime\r\n")
    assert m["user_variables"] == {"src": "mime"} and m["options"]["testmode"] is True


def test_sdk_errors(client, server, domain):
    r = client.messages.create(data={"to": "a@x.test", "subject": "x", "text": "x"}, domain=domain)
    assert r.status_code == 400 and r.json() == {"message": "from parameter is missing"}
    r = client.messages.create(data={"from": "a@nonexistent.invalid", "to": "b@x.test", "text": "x"},
                               domain="nonexistent.invalid")
    assert r.status_code == 404 and r.json() == {"message": "Domain not found"}
    with Client(auth=("api", "key-0-0"), api_url=server.url) as bad:
        r = bad.messages.create(data={"from": "s@sdk.example.test", "to": "a@x.test", "text": "x"}, domain=domain)
    assert r.status_code == 401


def test_sdk_reads_events_back(client, domain):
    r = client.messages.create(data={"from": "s@sdk.example.test", "to": "ev@x.test", "subject": "ev",
                                     "text": "x", "o:testmode": "yes", "o:tag": "sdk-ev"}, domain=domain)
    mid = r.json()["id"].strip("<>")
    r = client.events.get(domain=domain, filters={"message-id": mid, "event": "accepted"})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 1 and items[0]["recipient"] == "ev@x.test" and items[0]["tags"] == ["sdk-ev"]
    paging = r.json()["paging"]
    assert all(paging[k].startswith("http://") for k in ("first", "last", "next", "previous"))


# -- end to end: SDK batch send -> relay -> a loopback MX, DKIM verified by another implementation --
@pytest.fixture(scope="module")
def relay_env(tmp_path_factory, dns_server):
    from tests.conftest import dns_sets
    from tests.smtpsink import SmtpSink, free_port
    from tests.support import start_server
    port = free_port()
    srv = start_server(tmp_path_factory.mktemp("mailplat-sdk-relay"),
                       sets=dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={port}"])
    sink = SmtpSink(host="127.0.0.77", port=port).start()
    yield srv, dns_server, sink
    srv.stop()
    sink.stop()


def test_sdk_batch_send_is_delivered_per_recipient_and_dkim_verifies(relay_env):
    from tests.relaytest import create_domain, dkim_verify_perl, point_mx
    srv, dns, sink = relay_env
    sender = "batch-sdk.example.test"
    create_domain(srv, dns, sender)
    point_mx(dns, "readers.example.test", "127.0.0.77")
    rv = {"ann@readers.example.test": {"name": "Ann", "uid": "u1"},
          "bob@readers.example.test": {"name": "Bob", "uid": "u2"}}
    with Client(auth=("api", srv.key), api_url=srv.url) as c:
        r = c.messages.create(domain=sender, data={
            "from": f"News <news@{sender}>", "to": ["Ann A <ann@readers.example.test>", "bob@readers.example.test"],
            "subject": "Hello %recipient.name%", "text": "Dear %recipient.name%, id %recipient.uid%.",
            "html": "<p>Dear %recipient.name% %tag_unsubscribe_email%</p>",
            "h:List-Unsubscribe": "<https://news.example.test/u/%recipient.uid%>",
            "recipient-variables": json.dumps(rv), "o:tag": "newsletter"})
    assert r.status_code == 200, r.text
    got = {m.rcpt_tos[0]: m for m in sink.wait_count(2)}
    assert set(got) == set(rv)
    for rcpt, name, uid, to in (("ann@readers.example.test", "Ann", "u1", "Ann A <ann@readers.example.test>"),
                                ("bob@readers.example.test", "Bob", "u2", "bob@readers.example.test")):
        m = got[rcpt]
        assert m.mail_from.startswith("bounce+") and m.mail_from.endswith(f"@{sender}")  # VERP
        msg = email.message_from_bytes(m.data, policy=policy.default)
        assert msg["To"] == to and msg["Subject"] == f"Hello {name}"
        assert msg["List-Unsubscribe"] == f"<https://news.example.test/u/{uid}>"
        assert msg.get_body(("plain",)).get_content().strip() == f"Dear {name}, id {uid}."
        assert "%" not in msg.get_body(("html",)).get_content()
        assert msg["Message-Id"] == r.json()["id"]
        assert m.data.startswith(b"DKIM-Signature:")
        assert dkim_verify_perl(m.data, dns.port).splitlines()[0] == "pass"
