"""HTTP sending against a real server: every field of POST /v3/<domain>/messages and
/messages.mime through `requests`, checked against what the store holds once 200 came back
(the body blob, the Message row, one queue row and one `accepted` event per recipient), and
every error path with Mailgun's wording and status."""
from __future__ import annotations

import email
import json
import sqlite3
import time
import tomllib
from email import policy

import pytest

from mailplat.core import render
from mailplat.store.models import Message

SEND = "/v3/{}/messages"
MIME = "/v3/{}/messages.mime"


class StoredView:
    """Reads the server's store directly (read-only SQLite, or PostgreSQL when the server runs
    on it) so tests assert on what was committed, not on what the API says."""

    def __init__(self, server):
        cfg = tomllib.loads((server.data_dir / "mailplat.toml").read_text())
        self.url = (cfg.get("database") or {}).get("url") or ""
        self.path = server.data_dir / "mailplat.db"

    def _connect(self):
        if self.url.startswith("postgres"):
            import psycopg2
            return psycopg2.connect(self.url), "%s"
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30), "?"

    def rows(self, sql: str, *args) -> list[dict]:
        conn, mark = self._connect()
        try:
            cur = conn.cursor()
            cur.execute(sql.replace("?", mark), args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
        finally:
            conn.close()

    def execute(self, sql: str, *args) -> None:
        """A write (tests only use it for rows no API manages yet, e.g. bounces)."""
        if self.url.startswith("postgres"):
            import psycopg2
            conn, mark = psycopg2.connect(self.url), "%s"
        else:
            conn, mark = sqlite3.connect(self.path, timeout=30), "?"
        try:
            conn.cursor().execute(sql.replace("?", mark), args)
            conn.commit()
        finally:
            conn.close()

    def message(self, message_id: str) -> dict:
        rows = self.rows("SELECT * FROM message WHERE message_id = ?", message_id.strip("<>"))
        assert len(rows) == 1, rows
        row = rows[0]
        for k in ("headers", "attachments", "tags", "campaigns", "user_variables", "recipient_variables", "options"):
            row[k] = json.loads(row[k])
        return row

    def blob(self, sha: str) -> bytes:
        return bytes(self.rows("SELECT data FROM blob WHERE sha256 = ?", sha)[0]["data"])

    def queue(self, message_row_id: int) -> list[dict]:
        return self.rows("SELECT * FROM queue_item WHERE message_id = ? ORDER BY id", message_row_id)

    def events(self, message_id: str) -> list[dict]:
        rows = self.rows("SELECT * FROM event WHERE message_id = ? ORDER BY id", message_id.strip("<>"))
        for r in rows:
            r["data"] = json.loads(r["data"])
        return rows

    def count(self, table: str) -> int:
        return self.rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]


def make_domain(server, name: str) -> str:
    r = server.api("POST", "/v3/domains", data={"name": name, "dkim_key_size": "1024"})
    assert r.status_code == 200, r.text
    return name


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The API alone: no relay drains the queue, so queue rows stay as submit() wrote them."""
    yield from api_only_server(tmp_path_factory, "mailplat-send")


def api_only_server(tmp_path_factory, name: str):
    """A mailplat running only the API (on PostgreSQL when MAILPLAT_TEST_PG_SERVER asks)."""
    import os
    from tests.support import pg_database, start_server
    data_dir = tmp_path_factory.mktemp(name)
    pg = os.environ.get("MAILPLAT_TEST_PG_SERVER") and os.environ.get("MAILPLAT_TEST_PG")
    if pg:
        with pg_database(pg) as url:
            srv = start_server(data_dir, db_url=url, services=["api"])
            yield srv
            srv.stop()
    else:
        srv = start_server(data_dir, services=["api"])
        yield srv
        srv.stop()


@pytest.fixture(scope="module")
def store(server) -> StoredView:
    return StoredView(server)


@pytest.fixture(scope="module")
def domain(server) -> str:
    return make_domain(server, "send.example.test")


def send(server, domain, key=None, **kw):
    return server.api("POST", SEND.format(domain), key=key, **kw)


def parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=policy.default)


def test_every_field_is_stored_and_queued(server, store, domain):
    before = time.time()
    data = {
        "from": "Sender Name <sender@send.example.test>",
        "to": ["a@x.test", '"Lee, Bob" <b@x.test>, c@y.test'],
        "cc": "Carol <cc@x.test>", "bcc": "hidden@z.test",
        "subject": "Hello ünïcode", "text": "plain body", "html": "<p>html body</p>",
        "amp-html": "<html amp4email><body>amp</body></html>",
        "o:tag": ["newsletter", "weekly"], "o:campaign": "spring",
        "o:testmode": "yes", "o:dkim": "no", "o:tracking": "False", "o:tracking-clicks": "htmlonly",
        "o:tracking-opens": "yes", "o:require-tls": "true", "o:skip-verification": "false",
        "h:X-Custom": "custom value", "h:Reply-To": "reply@x.test",
        "v:order": "42", "v:obj": '{"a": 1}',
    }
    r = send(server, domain, data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"] == "Queued. Thank you."
    assert body["id"].startswith("<") and body["id"].endswith("@send.example.test>")

    m = store.message(body["id"])
    assert m["domain"] == domain and m["source"] == "api" and m["sender"] == "sender@send.example.test"
    assert m["tags"] == ["newsletter", "weekly"] and m["campaigns"] == ["spring"]
    assert m["user_variables"] == {"order": "42", "obj": {"a": 1}}
    assert m["options"] == {"testmode": True, "dkim": False, "tracking": False, "tracking_clicks": "htmlonly",
                            "tracking_opens": True, "require_tls": True, "skip_verification": False,
                            "deliver_at": None}
    raw = store.blob(m["blob"])
    assert m["size"] == len(raw)
    import hashlib
    assert hashlib.sha256(raw).hexdigest() == m["blob"]
    msg = parsed(raw)
    assert msg["Message-Id"] == body["id"]
    assert msg["From"] == "Sender Name <sender@send.example.test>"
    assert msg["To"] == 'a@x.test, "Lee, Bob" <b@x.test>, c@y.test'
    assert msg["Cc"] == "Carol <cc@x.test>"
    assert msg["Bcc"] is None and b"hidden@z.test" not in raw
    assert msg["Subject"] == "Hello ünïcode"
    assert msg["X-Custom"] == "custom value" and msg["Reply-To"] == "reply@x.test"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() >= int(before) - 1
    assert msg.get_body(("plain",)).get_content().strip() == "plain body"
    assert msg.get_body(("html",)).get_content().strip() == "<p>html body</p>"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/x-amp-html", "text/html"]
    assert all(b"\r\n" in line + b"\r\n" for line in raw.split(b"\r\n"))  # CRLF throughout
    assert b"\n" not in raw.replace(b"\r\n", b"")

    rcpts = ["a@x.test", "b@x.test", "c@y.test", "cc@x.test", "hidden@z.test"]
    queue = store.queue(m["id"])
    assert [q["recipient"] for q in queue] == rcpts
    assert all(q["state"] == "queued" and q["attempts"] == 0 for q in queue)
    assert [q["rcpt_domain"] for q in queue] == ["x.test", "x.test", "y.test", "x.test", "z.test"]
    assert all(before - 1 <= q["next_attempt_at"] <= time.time() + 1 for q in queue)

    evs = store.events(body["id"])
    assert sorted(e["recipient"] for e in evs) == sorted(rcpts)
    for e in evs:
        d = e["data"]
        assert d["event"] == "accepted" and e["event"] == "accepted"
        assert d["message"]["headers"] == {"message-id": body["id"].strip("<>"),
                                           "from": "Sender Name <sender@send.example.test>",
                                           "to": 'a@x.test, "Lee, Bob" <b@x.test>, c@y.test',
                                           "subject": "Hello ünïcode"}
        assert d["tags"] == ["newsletter", "weekly"] and d["flags"]["is-test-mode"] is True
        assert d["user-variables"] == {"order": "42", "obj": {"a": 1}}


def test_attachments_and_inline_multipart(server, store, domain):
    files = [("attachment", ("report.txt", b"line1\nline2 exactly")),
             ("attachment", ("data.csv", b"a,b\n1,2\n", "text/csv")),
             ("attachment", ("blob.bin", bytes(range(256)))),
             ("inline", ("logo.png", b"\x89PNG\r\n\x1a\nfake", "image/png"))]
    data = {"from": "s@send.example.test", "to": "a@x.test", "subject": "Files",
            "html": '<img src="cid:logo.png">', "text": "x"}
    r = send(server, domain, data=data, files=files)
    assert r.status_code == 200, r.text
    m = store.message(r.json()["id"])
    msg = parsed(store.blob(m["blob"]))
    atts = {a.get_filename(): a for a in msg.iter_attachments()}
    assert atts["report.txt"].get_content_type() == "text/plain"
    assert atts["report.txt"].get_payload(decode=True) == b"line1\nline2 exactly"
    assert atts["data.csv"].get_content_type() == "text/csv"
    assert atts["blob.bin"].get_content_type() == "application/octet-stream"
    assert atts["blob.bin"].get_payload(decode=True) == bytes(range(256))
    related = [p for p in msg.walk() if p.get_content_type() == "multipart/related"]
    assert len(related) == 1
    logo = [p for p in related[0].iter_parts() if p.get_content_type() == "image/png"][0]
    assert logo["Content-ID"] == "<logo.png>" and logo.get_payload(decode=True) == b"\x89PNG\r\n\x1a\nfake"
    assert {a["filename"]: a["content-type"] for a in m["attachments"]} == {
        "report.txt": "text/plain", "data.csv": "text/csv", "blob.bin": "application/octet-stream"}
    assert len(store.queue(m["id"])) == 1


def test_json_body_and_v2_path(server, store, domain):
    r = server.api("POST", f"/v2/{domain}/messages",
                   json={"from": "s@send.example.test", "to": ["a@x.test", "b@x.test"], "subject": "J",
                         "text": "t", "o:tag": ["j1", "j2"], "v:n": 5})
    assert r.status_code == 200, r.text
    m = store.message(r.json()["id"])
    assert m["tags"] == ["j1", "j2"] and m["user_variables"] == {"n": "5"}
    assert [q["recipient"] for q in store.queue(m["id"])] == ["a@x.test", "b@x.test"]


def test_h_x_mailgun_variables_and_idempotency_header(server, store, domain):
    r = send(server, domain, files={"x": (None, "")}, data={
        "from": "s@send.example.test", "to": "a@x.test", "subject": "V", "text": "x",
        "v:obj": '{"a":1}', "h:X-Mailgun-Variables": '{"k":"v"}', "h:X-Idempotency-Key": "abc"})
    assert r.status_code == 200, r.text
    m = store.message(r.json()["id"])
    assert m["user_variables"] == {"obj": {"a": 1}, "k": "v"}
    raw = store.blob(m["blob"])
    assert b"X-Mailgun-Variables" not in raw and parsed(raw)["X-Idempotency-Key"] == "abc"


@pytest.mark.parametrize("when", ["rfc2822", "gmt", "epoch"])
def test_deliverytime_schedules_queue_rows(server, store, domain, when):
    target = int(time.time()) + 3600
    value = {"rfc2822": email.utils.formatdate(target, localtime=False),
             "gmt": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(target)),
             "epoch": str(target)}[when]
    r = send(server, domain, data={"from": "s@send.example.test", "to": "a@x.test", "subject": "Later",
                                   "text": "x", "o:deliverytime": value})
    assert r.status_code == 200, r.text
    m = store.message(r.json()["id"])
    assert m["options"]["deliver_at"] == target
    assert [q["next_attempt_at"] for q in store.queue(m["id"])] == [target]


def test_deliverytime_in_the_past_means_now(server, store, domain):
    before = time.time()
    r = send(server, domain, data={"from": "s@send.example.test", "to": "a@x.test", "subject": "Past",
                                   "text": "x", "o:deliverytime": "Fri, 25 Oct 2011 23:10:10 -0000"})
    assert r.status_code == 200, r.text
    q = store.queue(store.message(r.json()["id"])["id"])
    assert before - 1 <= q[0]["next_attempt_at"] <= time.time() + 1


# -- messages.mime ---------------------------------------------------------------------------------
MIME_BODY = (b"From: Mime Sender <m@send.example.test>\r\nTo: a@x.test\r\nSubject: mime test\r\n"
             b"X-Mailgun-Tag: from-header\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
             b"exact  body\r\n   with spaces \r\n")


def test_mime_as_file_part_is_stored_byte_for_byte(server, store, domain):
    r = server.api("POST", MIME.format(domain), data={"to": ["a@x.test", "b@x.test"], "o:tag": "api-tag"},
                   files={"message": ("message", MIME_BODY)})
    assert r.status_code == 200, r.text
    mid = r.json()["id"]
    m = store.message(mid)
    raw = store.blob(m["blob"])
    stripped = MIME_BODY.replace(b"X-Mailgun-Tag: from-header\r\n", b"")
    assert raw.endswith(stripped)
    added = raw[: len(raw) - len(stripped)]
    assert added.startswith(b"Message-Id: " + mid.encode() + b"\r\nDate: ") and added.count(b"\r\n") == 2
    assert m["tags"] == ["from-header", "api-tag"]
    assert m["sender"] == "m@send.example.test"
    assert m["headers"]["subject"] == "mime test" and m["headers"]["from"] == "Mime Sender <m@send.example.test>"
    assert [q["recipient"] for q in store.queue(m["id"])] == ["a@x.test", "b@x.test"]
    assert len(store.events(mid)) == 2


def test_mime_as_plain_field_keeps_its_message_id(server, store, domain):
    raw_in = "Message-Id: <own.id@client.test>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\nFrom: m@send.example.test\r\nSubject: s\r\n\r\nb\r\n"
    r = server.api("POST", MIME.format(domain), files={"to": (None, "a@x.test"), "message": (None, raw_in)})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "<own.id@client.test>"
    m = store.message("own.id@client.test")
    assert store.blob(m["blob"]) == raw_in.encode()


def test_mime_errors(server, domain):
    r = server.api("POST", MIME.format(domain), files={"message": ("message", MIME_BODY)})
    assert r.status_code == 400 and r.json()["message"] == "to parameter is missing"
    r = server.api("POST", MIME.format(domain), data={"to": "a@x.test"})
    assert r.status_code == 400 and r.json()["message"] == "message parameter is missing"
    r = server.api("POST", MIME.format("nope.example.test"), data={"to": "a@x.test"},
                   files={"message": ("m", MIME_BODY)})
    assert r.status_code == 404 and r.json()["message"] == "Domain not found"


# -- errors ---------------------------------------------------------------------------------------
BASE = {"from": "s@send.example.test", "to": "a@x.test", "subject": "x", "text": "x"}


@pytest.mark.parametrize("change, status, message", [
    ({"from": None}, 400, "from parameter is missing"),
    ({"to": None}, 400, "to parameter is missing"),
    ({"text": None}, 400, "Need at least one of 'text', 'html', 'amp-html' or 'template' parameters specified"),
    ({"to": "not-an-address"}, 400, "to parameter is not a valid address. please check documentation"),
    ({"to": "a@x.test, b@"}, 400, "to parameter is not a valid address. please check documentation"),
    ({"from": "bad@@x"}, 400, "from parameter is not a valid address. please check documentation"),
    ({"cc": "a@x.test;"}, 400, "cc parameter is not a valid address. please check documentation"),
    ({"bcc": "nobody"}, 400, "bcc parameter is not a valid address. please check documentation"),
    ({"recipient-variables": "{not json"}, 400, "'recipient-variables' parameter is not a valid JSON"),
    ({"recipient-variables": "[1,2]"}, 400, "'recipient-variables' parameter should be a JSON object"),
    ({"o:tag": ["a", "b", "c", "d"]}, 400, "Too many tags: a message may have at most 3 tags"),
    ({"o:tag": "t" * 129}, 400, "'o:tag' is too long: a tag may have at most 128 characters"),
    ({"o:testmode": "maybe"}, 400, "'o:testmode' parameter should be yes or no"),
    ({"o:tracking-clicks": "sometimes"}, 400, "'o:tracking-clicks' parameter should be yes or no"),
    ({"o:deliverytime": "someday"}, 400, "'o:deliverytime' parameter is not a valid date"),
    ({"v:big": "x" * 5000}, 400, "Custom variables exceed the 4 KB limit"),
    ({"h:Content-Type": "text/evil"}, 400, "'h:Content-Type' may not be set: use the 'content-type' parameter"),
])
def test_bad_input_is_400_and_nothing_stored(server, store, domain, change, status, message):
    before = store.count("queue_item"), store.count("message")
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    r = send(server, domain, data=data)
    assert (r.status_code, r.json()) == (status, {"message": message})
    assert (store.count("queue_item"), store.count("message")) == before


@pytest.mark.parametrize("field, value", [
    ("subject", "hi\r\nBcc: victim@x.test"), ("subject", "a\nb"), ("h:X-Evil", "v\r\nBcc: victim@x.test"),
    ("from", "s@send.example.test\r\nBcc: victim@x.test"), ("to", "a@x.test\nBcc: victim@x.test"),
    ("subject", "nul\x00byte"), ("h:X-Evil", "lf\ninjected"),
])
def test_header_injection_is_refused(server, store, domain, field, value):
    before = store.count("message")
    r = send(server, domain, data={**BASE, field: value})
    assert r.status_code == 400, r.text
    assert "line break" in r.json()["message"] or "not a valid address" in r.json()["message"]
    assert store.count("message") == before


def test_bad_header_name_is_refused(server, domain):
    r = send(server, domain, data={**BASE, "h:Bad Name": "v"})
    assert r.status_code == 400 and "not a valid header name" in r.json()["message"]


def test_recipient_limit(server, store, domain):
    many = [f"r{i}@x.test" for i in range(1000)]
    r = send(server, domain, data={**BASE, "to": ",".join(many)})
    assert r.status_code == 200, r.text
    assert len(store.queue(store.message(r.json()["id"])["id"])) == 1000
    r = send(server, domain, data={**BASE, "to": ",".join(many[:999]), "cc": "one@x.test, two@x.test"})
    assert r.status_code == 400
    assert r.json()["message"] == "Too many recipients: at most 1000 are allowed per message"


def test_over_25mb_is_413(server, store, domain):
    before = store.count("message")
    big = b"x" * (25 * 1024 * 1024 + 10)
    r = send(server, domain, data=BASE, files=[("attachment", ("big.bin", big))])
    assert r.status_code == 413, r.text
    assert r.json()["message"] in ("Request entity too large", "Message size exceeds the 25 MB limit")
    # Just under the request limit but over the message limit once composed (base64 grows it).
    r = send(server, domain, data=BASE, files=[("attachment", ("big.bin", b"y" * (20 * 1024 * 1024)))])
    assert r.status_code == 413 and r.json()["message"] == "Message size exceeds the 25 MB limit"
    assert store.count("message") == before


def test_unknown_domain_is_404(server):
    r = send(server, "nonexistent.invalid", data={"from": "a@nonexistent.invalid", "to": "b@x.test", "text": "x"})
    assert r.status_code == 404 and r.json() == {"message": "Domain not found"}


def test_sending_keys_are_scoped_to_their_domain(server, store, domain):
    other = make_domain(server, "other-send.example.test")
    r = server.api("POST", "/v1/keys", data={"role": "sending", "domain_name": domain})
    assert r.status_code == 200, r.text
    key = r.json()["key"]["secret"]
    r = send(server, domain, key=key, data=BASE)
    assert r.status_code == 200, r.text
    before = store.count("message")
    r = send(server, other, key=key, data={**BASE, "from": "s@other-send.example.test"})
    assert r.status_code == 403
    r = send(server, domain, key="key-abc-def", data=BASE)
    assert r.status_code == 401
    r = server.api("GET", f"/v3/{domain}/events", key=key)
    assert r.status_code == 403  # a sending key may only send
    assert store.count("message") == before


def test_bounced_recipient_is_suppressed(server, store, domain):
    store.execute("INSERT INTO bounce (domain, address, code, error, created_at) VALUES (?,?,?,?,?)",
                  domain, "bounced@x.test", "550", "No such user", time.time())
    r = send(server, domain, data={**BASE, "to": "ok@x.test, Bounced@x.test"})
    assert r.status_code == 200, r.text
    m = store.message(r.json()["id"])
    assert [q["recipient"] for q in store.queue(m["id"])] == ["ok@x.test"]
    evs = [e["data"] for e in store.events(r.json()["id"])]
    failed = [e for e in evs if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["recipient"] == "Bounced@x.test"
    assert failed[0]["severity"] == "permanent" and failed[0]["reason"] == "suppress-bounce"
    assert failed[0]["delivery-status"]["code"] == 605
    assert sorted(e["recipient"] for e in evs if e["event"] == "accepted") == ["Bounced@x.test", "ok@x.test"]


def test_batch_send_renders_each_recipient(server, store, domain):
    rv = {"a@x.test": {"name": "Alice", "id": "A1"}, "b@x.test": {"name": "Bob", "id": "B2"}}
    r = send(server, domain, data={
        "from": "s@send.example.test", "to": ["Alice <a@x.test>", "b@x.test"],
        "subject": "Hi %recipient.name%", "text": "Dear %recipient.name% (%recipient%)",
        "html": "<p>%recipient.name% %tag_unsubscribe_email% %unsubscribe_url%</p>",
        "h:List-Unsubscribe": "<https://ex.test/u/%recipient.id%>", "v:email-id": "e1",
        "recipient-variables": json.dumps(rv)})
    assert r.status_code == 200, r.text
    row = store.message(r.json()["id"])
    assert row["recipient_variables"] == rv
    raw = store.blob(row["blob"])
    assert b"%recipient.name%" in raw  # stored once, unrendered
    message = Message(recipient_variables=row["recipient_variables"])
    for rcpt, to, name, uid in (("a@x.test", "Alice <a@x.test>", "Alice", "A1"), ("b@x.test", "b@x.test", "Bob", "B2")):
        out = render.for_recipient(message, raw, rcpt)
        msg = parsed(out)
        assert msg["To"] == to and msg["Subject"] == f"Hi {name}"
        assert msg["List-Unsubscribe"] == f"<https://ex.test/u/{uid}>"
        assert msg.get_body(("plain",)).get_content().strip() == f"Dear {name} ({to})"
        html = msg.get_body(("html",)).get_content()
        assert name in html and "%" not in html
        assert msg["Message-Id"] == r.json()["id"]
    evs = {e["recipient"]: e["data"] for e in store.events(r.json()["id"])}
    assert evs["a@x.test"]["user-variables"] == {"email-id": "e1", "name": "Alice", "id": "A1"}


def test_send_test_cli_goes_through_the_api(server, store, domain):
    before = store.count("api_key")
    out = server.cli("send-test", "--from", f"Ops <ops@{domain}>", "--to", "t1@x.test", "--to", "t2@x.test",
                     "--subject", "cli test", "--testmode")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Queued. Thank you. id=<")
    mid = out.stdout.strip().split("id=", 1)[1]
    m = store.message(mid)
    assert m["source"] == "api" and m["subject"] == "cli test" and m["options"]["testmode"] is True
    assert [q["recipient"] for q in store.queue(m["id"])] == ["t1@x.test", "t2@x.test"]
    # The one-use sending key was revoked after use.
    keys = store.rows("SELECT * FROM api_key WHERE description = ?", "send-test (one use)")
    assert store.count("api_key") == before + 1 and all(k["revoked_at"] for k in keys)
    bad = server.cli("send-test", "--from", "ops@unknown.example.test", "--to", "t@x.test", check=False)
    assert bad.returncode == 1 and "Domain not found" in bad.stderr
    bad = server.cli("send-test", "--from", f"ops@{domain}", "--to", "not-an-address", check=False)
    assert bad.returncode == 1 and "400" in bad.stderr and "not a valid address" in bad.stderr


def test_mime_attachment_summary_in_events(server, store, domain):
    from email.message import EmailMessage
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = f"m@{domain}", "a@x.test", "with file"
    m.set_content("see attached")
    m.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="invoice.pdf")
    raw = m.as_bytes()
    r = server.api("POST", MIME.format(domain), data={"to": "a@x.test"}, files={"message": ("message", raw)})
    assert r.status_code == 200, r.text
    row = store.message(r.json()["id"])
    assert store.blob(row["blob"]).endswith(raw)
    assert row["attachments"] == [{"filename": "invoice.pdf", "content-type": "application/pdf", "size": 13}]
    ev = store.events(r.json()["id"])[0]["data"]
    assert ev["message"]["attachments"] == row["attachments"]


def test_concurrent_sends_are_each_committed_once(server, store, domain):
    """Many clients at once (the store's group commit path): every 200 is a committed message
    with its queue row and accepted event, and ids never repeat."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return send(server, domain, data={**BASE, "to": f"c{i}@x.test", "v:i": str(i)})

    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(one, range(80)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    ids = [r.json()["id"].strip("<>") for r in replies]
    assert len(set(ids)) == 80
    marks = ",".join("?" * len(ids))
    rows = store.rows(f"SELECT m.message_id, q.recipient FROM message m JOIN queue_item q ON q.message_id = m.id "
                      f"WHERE m.message_id IN ({marks})", *ids)
    assert sorted(r["recipient"] for r in rows) == sorted(f"c{i}@x.test" for i in range(80))
    evs = store.rows(f"SELECT recipient FROM event WHERE event = 'accepted' AND message_id IN ({marks})", *ids)
    assert len(evs) == 80
