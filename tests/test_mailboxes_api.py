"""Mailboxes API (the seed's paths, fields and strings) and mail client autoconfiguration, over
HTTP against a real server; passwords proven by logging in over IMAP and SMTP submission."""
from __future__ import annotations

import imaplib
import smtplib
import ssl
import uuid
import xml.etree.ElementTree as ET

import pytest
import requests

PASSWORD = "s3cret-pass"


@pytest.fixture
def domain(server):
    name = f"m{uuid.uuid4().hex[:8]}.example.test"
    r = server.api("POST", "/v3/domains", data={"name": name})
    assert r.status_code == 200, r.text
    return name


def _imap_login(server, user, password) -> bool:
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    try:
        m.login(user, password)
        return True
    except imaplib.IMAP4.error:
        return False
    finally:
        m.shutdown()


def test_create_list_change_delete(server, domain):
    r = server.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": "bob.lee", "password": PASSWORD})
    assert r.status_code == 200 and r.json() == {"message": "Created 1 mailboxes"}
    r = server.api("POST", f"/v2/{domain}/mailboxes", data={"mailbox": f"Alice@{domain.upper()}", "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = server.api("GET", f"/v3/{domain}/mailboxes").json()
    assert body["total_count"] == 2
    assert [i["mailbox"] for i in body["items"]] == [f"bob.lee@{domain}", f"alice@{domain}"]
    for item in body["items"]:
        assert set(item) == {"size_bytes", "created_at", "mailbox"}
        assert item["size_bytes"] == 0 and item["created_at"].endswith(" GMT")
    assert PASSWORD not in server.api("GET", f"/v3/{domain}/mailboxes").text
    page = server.api("GET", f"/v3/{domain}/mailboxes", params={"limit": 1, "skip": 1}).json()
    assert page["total_count"] == 2 and [i["mailbox"] for i in page["items"]] == [f"alice@{domain}"]

    assert _imap_login(server, f"bob.lee@{domain}", PASSWORD)
    r = server.api("PUT", f"/v3/{domain}/mailboxes/bob.lee", data={"password": "brand-new-pw"})
    assert r.status_code == 200 and r.json() == {"message": "Password changed"}
    assert not _imap_login(server, f"bob.lee@{domain}", PASSWORD)
    assert _imap_login(server, f"bob.lee@{domain}", "brand-new-pw")

    # "Mailbox credentials will work as well" for SMTP submission.
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=ssl._create_unverified_context())
        s.login(f"bob.lee@{domain}", "brand-new-pw")

    r = server.api("DELETE", f"/v3/{domain}/mailboxes/bob.lee@{domain}")
    assert r.status_code == 200
    assert r.json() == {"message": "Mailbox has been deleted", "spec": f"bob.lee@{domain}"}
    assert not _imap_login(server, f"bob.lee@{domain}", "brand-new-pw")
    assert server.api("GET", f"/v2/{domain}/mailboxes").json()["total_count"] == 1


def test_errors(server, domain):
    base = f"/v3/{domain}/mailboxes"
    assert server.api("POST", base, data={"mailbox": "x", "password": PASSWORD}).status_code == 200
    cases = [
        ({"mailbox": "x", "password": PASSWORD}, "already exists"),
        ({"mailbox": "y"}, "'password' parameter is missing"),
        ({"password": PASSWORD}, "'mailbox' parameter is missing"),
        ({"mailbox": "y", "password": "abc"}, "Password length"),
        ({"mailbox": "y", "password": "a\nbcdefg"}, "control characters"),
        ({"mailbox": "y@elsewhere.test", "password": PASSWORD}, "must be an address in"),
        ({"mailbox": "bad local", "password": PASSWORD}, "not a valid address"),
    ]
    for data, text in cases:
        r = server.api("POST", base, data=data)
        assert r.status_code == 400, (data, r.text)
        assert text in r.json()["message"], (data, r.text)
    assert server.api("GET", "/v3/unknown-domain.test/mailboxes").status_code == 404
    assert server.api("POST", "/v3/unknown-domain.test/mailboxes", data={"mailbox": "x", "password": PASSWORD}).status_code == 404
    assert server.api("PUT", f"{base}/nobody", data={"password": PASSWORD}).status_code == 404
    assert server.api("DELETE", f"{base}/nobody").status_code == 404
    assert server.api("PUT", f"{base}/x", data={}).status_code == 400
    assert server.api("GET", base, params={"limit": "many"}).status_code == 400
    assert server.api("GET", base, key="key-nope-nope").status_code == 401


def test_domain_delete_removes_its_mailboxes(server, domain):
    assert server.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": "gone", "password": PASSWORD}).status_code == 200
    assert _imap_login(server, f"gone@{domain}", PASSWORD)
    assert server.api("DELETE", f"/v3/domains/{domain}").status_code == 200
    assert not _imap_login(server, f"gone@{domain}", PASSWORD)


def test_thunderbird_autoconfig(server):
    for path in ("/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml"):
        r = requests.get(server.url + path, params={"emailaddress": "u@corp.example.test"}, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/xml")
        root = ET.fromstring(r.content)
        servers = {(s.get("type"), s.findtext("socketType")): s for s in root.iter()
                   if s.tag in ("incomingServer", "outgoingServer")}
        assert servers[("imap", "SSL")].findtext("port") == str(server.ports["imaps"])
        assert servers[("imap", "STARTTLS")].findtext("port") == str(server.ports["imap"])
        assert servers[("pop3", "SSL")].findtext("port") == str(server.ports["pop3s"])
        assert servers[("smtp", "SSL")].findtext("port") == str(server.ports["submissions"])
        assert servers[("imap", "SSL")].findtext("hostname") == "mail.example.test"
        assert root.find("emailProvider/domain").text == "corp.example.test"
    hostile = requests.get(server.url + "/mail/config-v1.1.xml",
                           params={"emailaddress": 'x"><script>@a.b'}, timeout=10)
    assert hostile.status_code == 200 and b"<script>" not in hostile.content
    ET.fromstring(hostile.content)


def test_outlook_autodiscover(server):
    req = (b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/'
           b'autodiscover/outlook/requestschema/2006"><Request><EMailAddress>u@corp.example.test</EMailAddress>'
           b"<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
           b"</AcceptableResponseSchema></Request></Autodiscover>")
    r = requests.post(server.url + "/autodiscover/autodiscover.xml", data=req, timeout=10,
                      headers={"Content-Type": "text/xml"})
    assert r.status_code == 200
    ns = {"a": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
    root = ET.fromstring(r.content)
    protos = {p.findtext("a:Type", namespaces=ns): p for p in root.iterfind(".//a:Protocol", ns)}
    assert protos["IMAP"].findtext("a:Port", namespaces=ns) == str(server.ports["imaps"])
    assert protos["IMAP"].findtext("a:LoginName", namespaces=ns) == "u@corp.example.test"
    assert protos["POP3"].findtext("a:Port", namespaces=ns) == str(server.ports["pop3s"])
    evil = req.replace(b"u@corp.example.test", b"&lt;b&gt;@x.y")
    r = requests.post(server.url + "/autodiscover/autodiscover.xml", data=evil, timeout=10)
    assert r.status_code == 200 and b"<b>" not in r.content
    ET.fromstring(r.content)
    big = requests.post(server.url + "/autodiscover/autodiscover.xml", data=b"x" * 200_000, timeout=10)
    assert big.status_code == 413
