"""Routes over real sockets: the Routes API (official SDK shapes), inbound mail over SMTP to the
MX reaching a receiver on loopback through forward() (fields, files, content-id-map, headers,
a signature verified independently, the `mime` variant, 406 = no retry, 500 = retried, no
redirects followed), django-anymail's Mailgun inbound handler accepting our posts, forward()
to an address through the send path, store(notify=) with the stored-message API, and a route,
a list and a mailbox sharing one address."""
from __future__ import annotations

import contextlib
import email
import hashlib
import hmac
import json
import os
import smtplib
import uuid
from email import policy
from email.message import EmailMessage

import pytest

from tests.conftest import PG_BASE, dns_sets
from tests.support import MailplatServer, pg_database, start_server, wait_for
from tests.test_domains_api import store_query
from tests.webhookrecv import HookReceiver as Receiver


def form_fields(post: dict) -> tuple[dict[str, list[str]], dict[str, tuple[str, str, bytes]]]:
    """Parse a multipart/form-data body independently (the email package)."""
    msg = email.message_from_bytes(b"Content-Type: " + post["ctype"].encode() + b"\r\n\r\n" + post["body"],
                                   policy=policy.HTTP)
    fields: dict[str, list[str]] = {}
    files: dict[str, tuple[str, str, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True)
        if part.get_filename() is not None:
            files[name] = (part.get_filename(), part.get_content_type(), data)
        else:
            fields.setdefault(name, []).append(data.decode("utf-8"))
    return fields, files


@contextlib.contextmanager
def own_server(data_dir, sets):
    """A mailplat with these settings: on SQLite, or on PostgreSQL in the CI pass that sets
    MAILPLAT_TEST_PG_SERVER (as conftest's shared `server`)."""
    if os.environ.get("MAILPLAT_TEST_PG_SERVER") and PG_BASE:
        with pg_database(PG_BASE) as url:
            s = start_server(data_dir, db_url=url, sets=sets)
            try:
                yield s
            finally:
                s.stop()
    else:
        s = start_server(data_dir, sets=sets)
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, dns_server) -> MailplatServer:
    with own_server(tmp_path_factory.mktemp("routes"), dns_sets(dns_server) + [
            "hooks.allow_private_targets=true", "hooks.retry_schedule=0.2", "hooks.max_attempts=3",
            "spam.spamd_host=", "api.domains_rate_limit_per_minute=100000"]) as s:
        yield s


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def dom(srv) -> str:
    d = f"rt{uuid.uuid4().hex[:8]}.example.test"
    assert srv.api("POST", "/v3/domains", data={"name": d}).status_code == 200
    return d


def signing_key(srv) -> str:
    return wait_for(lambda: (store_query(srv, "select key from signing_key") or [[None]])[0][0], what="signing key")


def smtp_send(srv, rcpts, msg: bytes | EmailMessage, mail_from="sender@far.test"):
    raw = msg.as_bytes(policy=policy.SMTP) if isinstance(msg, EmailMessage) else msg
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as c:
        c.ehlo("far.test")
        c.sendmail(mail_from, rcpts, raw)


def add_route(srv, expression, *actions, priority=0, description="t") -> dict:
    r = srv.api("POST", "/v3/routes", data={"priority": priority, "description": description,
                                           "expression": expression, "action": list(actions)})
    assert r.status_code == 200, r.text
    return r.json()["route"]


def rich_message(to: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "Zoë Sender <sender@far.test>"
    m["To"] = to
    m["Subject"] = "Grüße with files"
    m["X-Custom"] = "one"
    m.set_content("Hello there\n\nThe answer is 42.\n\n-- \nZoë\nFar Corp\n")
    m.add_alternative('<p>Hello <b>there</b> <img src="cid:logo@far.test"></p>', subtype="html")
    m.get_payload()[1].add_related(b"\x89PNG-logo-bytes", maintype="image", subtype="png",
                                   cid="<logo@far.test>", filename="logo.png")
    m.add_attachment(b"col1,col2\n1,2\n", maintype="text", subtype="csv", filename="data.csv")
    return m


# -- the API -------------------------------------------------------------------------------------
def test_routes_api_crud_and_match(srv, receiver):
    created = add_route(srv, 'match_recipient("crud-(.*)@x.test")', f'forward("{receiver.url("/crud/")}\\1")',
                        "stop()", priority=7, description="crud")
    assert set(created) >= {"id", "priority", "description", "expression", "actions", "created_at"}
    assert created["actions"] == [f'forward("{receiver.url("/crud/")}\\1")', "stop()"]
    rid = created["id"]
    assert srv.api("GET", f"/v3/routes/{rid}").json()["route"]["priority"] == 7
    page = srv.api("GET", "/v3/routes", params={"skip": 0, "limit": 1}).json()
    assert page["total_count"] >= 1 and len(page["items"]) == 1
    r = srv.api("PUT", f"/v3/routes/{rid}", data={"priority": "8", "action": ['forward("a@x.test")', "stop()"]})
    assert r.status_code == 200 and r.json()["message"] == "Route has been updated"
    assert r.json()["priority"] == 8 and r.json()["actions"] == ['forward("a@x.test")', "stop()"]
    m = srv.api("GET", "/v3/routes/match", params={"address": "crud-bob@x.test"})
    assert m.status_code == 200 and m.json()["route"]["id"] == rid
    none = srv.api("GET", "/v3/routes/match", params={"address": "nobody@nowhere.test"})
    assert none.status_code == 404 and none.json()["message"] == "Route not found"
    d = srv.api("DELETE", f"/v3/routes/{rid}")
    assert d.json() == {"message": "Route has been deleted", "id": rid}
    g = srv.api("GET", f"/v3/routes/{rid}")
    assert g.status_code == 404 and g.json()["message"] == "Route not found"
    assert srv.api("DELETE", f"/v3/routes/{rid}").status_code == 404


def test_routes_api_rejects_bad_input(srv):
    r = srv.api("POST", "/v3/routes", data={"expression": 'match_recipient("(")', "action": "stop()"})
    assert r.status_code == 400 and "position 16" in r.json()["message"]
    r = srv.api("POST", "/v3/routes", data={"expression": "catch_all()", "action": ["stop()", 'forward("ftp://x")']})
    assert r.status_code == 400 and "action 2" in r.json()["message"]
    r = srv.api("POST", "/v3/routes", data={"expression": "catch_all()"})
    assert r.status_code == 400 and "action" in r.json()["message"]
    r = srv.api("POST", "/v3/routes", data={"expression": "catch_all()", "action": "stop()", "priority": "x"})
    assert r.status_code == 400


def test_routes_through_the_python_sdk(srv):
    from mailgun.client import Client
    client = Client(auth=("api", srv.key), api_url=srv.url)
    r = client.routes.create(data={"priority": 3, "description": "sdk", "expression": 'match_recipient("sdk@x.test")',
                                   "action": ['forward("sdk-to@x.test")', "stop()"]})
    assert r.status_code == 200, r.text
    rid = r.json()["route"]["id"]
    assert client.routes.get(domain=None, route_id=rid).json()["route"]["description"] == "sdk"
    assert client.routes_match.get(domain=None, filters={"address": "sdk@x.test"}).json()["route"]["id"] == rid
    assert client.routes.delete(domain=None, route_id=rid).status_code == 200


# -- forward() to a URL ------------------------------------------------------------------------------
def test_forward_posts_fields_files_and_a_valid_signature(srv, dom, receiver):
    add_route(srv, f'match_recipient("(?P<user>fw-.*)@{dom}")', f'forward("{receiver.url("/in/")}\\g<user>")', "stop()")
    rcpt = f"fw-bob@{dom}"
    smtp_send(srv, [rcpt], rich_message(rcpt))
    post = wait_for(lambda: receiver.to("/in/fw-bob"), what="forward post")[0]
    assert post["ctype"].startswith("multipart/form-data")
    fields, files = form_fields(post)
    one = {k: v[0] for k, v in fields.items()}
    assert one["recipient"] == rcpt and one["sender"] == "sender@far.test"
    assert one["from"] == "Zoë Sender <sender@far.test>" and one["subject"] == "Grüße with files"
    assert "The answer is 42." in one["body-plain"]
    assert one["stripped-text"].strip().endswith("The answer is 42.")
    assert "Zoë" in one["stripped-signature"] and "Far Corp" in one["stripped-signature"]
    assert "<b>there</b>" in one["body-html"] and "<b>there</b>" in one["stripped-html"]
    assert one["attachment-count"] == "2"
    assert files["attachment-1"] == ("logo.png", "image/png", b"\x89PNG-logo-bytes")
    assert files["attachment-2"] == ("data.csv", "text/csv", b"col1,col2\n1,2\n")
    assert json.loads(one["content-id-map"]) == {"<logo@far.test>": "attachment-1"}
    headers = json.loads(one["message-headers"])
    names = [h[0] for h in headers]
    assert names.index("From") < names.index("To") < names.index("Subject") < names.index("X-Custom")
    assert ["X-Custom", "one"] in headers and one["X-Custom"] == "one"
    assert any(n == "Received" for n in names)
    key = signing_key(srv)
    expected = hmac.new(key.encode(), (one["timestamp"] + one["token"]).encode(), hashlib.sha256).hexdigest()
    assert one["signature"] == expected and len(one["token"]) == 50


def test_forward_mime_variant(srv, dom, receiver):
    add_route(srv, f'match_recipient("mimeonly@{dom}")', f'forward("{receiver.url("/post_mime")}")', "stop()")
    rcpt = f"mimeonly@{dom}"
    body = (f"From: a@far.test\r\nTo: {rcpt}\r\nSubject: raw\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n").encode("latin-1")
    smtp_send(srv, [rcpt], body)
    post = wait_for(lambda: receiver.to("/post_mime"), what="mime post")[0]
    fields, files = form_fields(post)
    assert set(fields) == {"recipient", "sender", "from", "subject", "body-mime", "timestamp", "token", "signature"}
    mime = email.message_from_string(fields["body-mime"][0], policy=policy.default)
    assert mime.get_content_charset() == "utf-8" and mime.get_content().strip() == "café"  # transcoded to UTF-8
    assert fields["subject"] == ["raw"] and not files


def outbox_rows(srv, url):
    return store_query(srv, "select state, attempts, last_status from outbox_item where url = ?", url)


def test_406_stops_retries_500_is_retried_redirects_not_followed(srv, dom, receiver):
    receiver.status["/reject"] = [406]
    receiver.status["/flaky"] = [500, 500, 200]
    receiver.status["/redirect"] = [302]
    for name in ("reject", "flaky", "redirect"):
        add_route(srv, f'match_recipient("{name}@{dom}")', f'forward("{receiver.url("/" + name)}")', "stop()")
        smtp_send(srv, [f"{name}@{dom}"], f"From: a@far.test\r\nSubject: {name}\r\n\r\nx\r\n".encode())
    wait_for(lambda: outbox_rows(srv, receiver.url("/flaky")) == [("delivered", 3, 200)], what="flaky delivered")
    assert len(receiver.to("/flaky")) == 3
    assert wait_for(lambda: outbox_rows(srv, receiver.url("/reject"))) == [("rejected", 1, 406)]
    assert len(receiver.to("/reject")) == 1
    # A 302 is not followed (it points at the metadata address); it counts as a failure.
    wait_for(lambda: outbox_rows(srv, receiver.url("/redirect")) == [("failed", 3, 302)], what="redirect gave up")
    assert len(receiver.to("/redirect")) == 3


def test_anymail_inbound_handler_accepts_our_post(srv, dom, receiver):
    add_route(srv, f'match_recipient("anymail@{dom}")', f'forward("{receiver.url("/anymail")}")', "stop()")
    smtp_send(srv, [f"anymail@{dom}"], rich_message(f"anymail@{dom}"))
    post = wait_for(lambda: receiver.to("/anymail"), what="post")[0]
    key = signing_key(srv)

    from django.conf import settings
    if not settings.configured:
        settings.configure(DEBUG=False, SECRET_KEY="t", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
                           INSTALLED_APPS=["anymail"], ANYMAIL={})
        import django
        django.setup()
    settings.ANYMAIL = {"MAILGUN_WEBHOOK_SIGNING_KEY": key, "WEBHOOK_SECRET": "u:p"}
    from anymail.signals import inbound
    from anymail.webhooks.mailgun import MailgunInboundWebhookView
    from django.test import RequestFactory
    seen = []

    def handler(sender, event, esp_name, **kw):
        seen.append(event.message)
    inbound.connect(handler, weak=False)
    try:
        import base64
        auth = "Basic " + base64.b64encode(b"u:p").decode()
        req = RequestFactory().generic("POST", "/anymail/mailgun/inbound/", data=post["body"],
                                       content_type=post["ctype"], HTTP_AUTHORIZATION=auth)
        resp = MailgunInboundWebhookView.as_view()(req)
        assert resp.status_code == 200
        msg = seen[0]
        assert msg.from_email.addr_spec == "sender@far.test"
        assert msg.subject == "Grüße with files"
        assert "The answer is 42." in msg.text and "<b>there</b>" in msg.html
        assert [a.get_filename() for a in msg.attachments] == ["data.csv"]
        assert msg.attachments[0].get_content_bytes() == b"col1,col2\n1,2\n"
        assert msg.content_id_map["logo@far.test"].get_content_bytes() == b"\x89PNG-logo-bytes"
        # A tampered signature is refused (a SuspiciousOperation: Django answers 400).
        bad = post["body"].replace(b'name="signature"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n',
                                   b'name="signature"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n0')
        req = RequestFactory().generic("POST", "/anymail/mailgun/inbound/", data=bad,
                                       content_type=post["ctype"], HTTP_AUTHORIZATION=auth)
        from anymail.exceptions import AnymailWebhookValidationFailure
        with pytest.raises(AnymailWebhookValidationFailure):
            MailgunInboundWebhookView.as_view()(req)
    finally:
        inbound.disconnect(handler)


urlpatterns: list = []


# -- forward() to an address, store(), and sharing an address ----------------------------------------
def test_forward_to_address_goes_through_the_send_path(srv, dom):
    add_route(srv, f'match_recipient("relayme@{dom}")', 'forward("final@elsewhere.test")', "stop()")
    smtp_send(srv, [f"relayme@{dom}"], "From: a@far.test\r\nSubject: fwd-addr\r\n\r\nbody\r\n".encode())
    rows = wait_for(lambda: store_query(srv, "select m.source, m.domain, q.recipient from message m join queue_item q "
                                              "on q.message_id = m.id where m.subject = 'fwd-addr'"), what="queued")
    assert rows == [("route", dom, "final@elsewhere.test")]


def test_store_notify_get_and_resend(srv, dom, receiver):
    add_route(srv, f'match_recipient("keep@{dom}")', f'store(notify="{receiver.url("/stored")}")', "stop()")
    smtp_send(srv, [f"keep@{dom}"], rich_message(f"keep@{dom}"))
    post = wait_for(lambda: receiver.to("/stored"), what="notify")[0]
    fields, _ = form_fields(post)
    url = fields["message-url"][0]
    assert url.startswith(srv.url + f"/v3/domains/{dom}/messages/")
    path = url[len(srv.url):]
    got = srv.api("GET", path)
    assert got.status_code == 200, got.text
    data = got.json()
    assert data["subject"] == "Grüße with files" and data["recipients"] == f"keep@{dom}"
    assert [(a["name"], a["size"], a["content-type"]) for a in data["attachments"]] == [
        ("logo.png", len(b"\x89PNG-logo-bytes"), "image/png"), ("data.csv", 14, "text/csv")]
    att = srv.api("GET", data["attachments"][1]["url"][len(srv.url):])
    assert att.status_code == 200 and att.content == b"col1,col2\n1,2\n"
    raw = srv.api("GET", path, headers={"Accept": "message/rfc2822"}).json()
    assert "Grüße" in email.message_from_string(raw["body-mime"], policy=policy.default)["Subject"]
    resent = srv.api("POST", path, data={"to": "again@elsewhere.test"})
    assert resent.status_code == 200 and resent.json()["message"] == "Queued. Thank you."
    assert srv.api("GET", f"/v3/domains/{dom}/messages/nope").status_code == 404


def test_route_list_and_mailbox_share_an_address(srv, dom, receiver):
    addr = f"team@{dom}"
    assert srv.api("POST", f"/v3/{dom}/mailboxes", data={"mailbox": "team", "password": "box-pass-1"}).status_code == 200
    assert srv.api("POST", "/v3/lists", data={"address": addr, "access_level": "everyone"}).status_code == 200
    assert srv.api("POST", f"/v3/lists/{addr}/members", data={"address": "member1@elsewhere.test"}).status_code == 200
    add_route(srv, f'match_recipient("{addr}")', f'forward("{receiver.url("/team")}")')
    smtp_send(srv, [addr], b"From: a@far.test\r\nSubject: all-three\r\n\r\nhello\r\n")
    wait_for(lambda: receiver.to("/team"), what="route post")
    wait_for(lambda: store_query(srv, "select count(*) from mail_message mm join mail_folder f on f.id = mm.folder_id "
                                      "join mailbox b on b.id = f.mailbox_id where b.address = ?", addr)[0][0] == 1,
             what="mailbox copy")
    rows = wait_for(lambda: store_query(srv, "select m.source, q.recipient from message m join queue_item q "
                                              "on q.message_id = m.id where m.subject = 'all-three'"), what="list copy")
    assert rows == [("list", "member1@elsewhere.test")]


def test_unknown_address_still_refused_at_rcpt(srv, dom):
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as c:
        c.ehlo("far.test")
        c.mail("a@far.test")
        code, _ = c.rcpt(f"nobody-{uuid.uuid4().hex[:6]}@{dom}")
        # A catch_all() route in this module would accept it; none exists here, so 550.
        assert code == 550


def test_private_targets_are_refused_when_saved_by_default(server):
    """The shared server keeps hooks.allow_private_targets off: internal URLs are a 400."""
    for target in ("http://127.0.0.1:8080/in", "http://169.254.169.254/latest/meta-data/",
                   "http://[::1]/x", "http://localhost/x", "http://10.0.0.5/x"):
        r = server.api("POST", "/v3/routes", data={"expression": "catch_all()", "action": f'forward("{target}")'})
        assert r.status_code == 400, target
        assert "private" in r.json()["message"] or "internal" in r.json()["message"]
        r = server.api("POST", "/v3/routes", data={"expression": "catch_all()", "action": f'store(notify="{target}")'})
        assert r.status_code == 400, target


@pytest.mark.postgres
def test_routes_and_lists_on_postgresql(tmp_path, dns_server, receiver):
    """The route worker's claims (FOR UPDATE SKIP LOCKED), the outbox and list fan-out on a
    PostgreSQL store (the .ci/run second pass)."""
    if not PG_BASE:
        pytest.skip("MAILPLAT_TEST_PG is not set")
    with pg_database(PG_BASE) as url:
        s = start_server(tmp_path, db_url=url, sets=dns_sets(dns_server) + [
            "hooks.allow_private_targets=true", "spam.spamd_host="])
        try:
            d = f"pg{uuid.uuid4().hex[:8]}.example.test"
            assert s.api("POST", "/v3/domains", data={"name": d}).status_code == 200
            assert s.api("POST", "/v3/lists", data={"address": f"all@{d}", "access_level": "everyone"}).status_code == 200
            assert s.api("POST", f"/v3/lists/all@{d}/members", data={"address": "pgmember@elsewhere.test"}).status_code == 200
            add_route(s, f'match_recipient("all@{d}")', f'forward("{receiver.url("/pg")}")')
            smtp_send(s, [f"all@{d}"], rich_message(f"all@{d}"))
            fields, files = form_fields(wait_for(lambda: receiver.to("/pg"), what="post on PG")[0])
            assert fields["recipient"] == [f"all@{d}"] and files["attachment-2"][0] == "data.csv"
            rows = wait_for(lambda: store_query(s, "select m.source, q.recipient from message m join queue_item q "
                                                   "on q.message_id = m.id where m.domain = ?", d), what="fan-out on PG")
            assert rows == [("list", "pgmember@elsewhere.test")]
        finally:
            s.stop()
