"""Receiving policy: plus-addressing, postmaster, returning mail a full mailbox never took
(RFC 3464 notices), and collecting message bodies nothing references any more."""
from __future__ import annotations

import asyncio
import email
import imaplib
import smtplib
import threading
import time
import uuid
from email import policy

import pytest

from mailplat import config as mconfig
from mailplat.core import mailboxes, receive
from mailplat.core.context import Context
from mailplat.errors import NotFound
from mailplat.store import blobs
from mailplat.store import db as storedb
from mailplat.store.mailbox_models import InboundJob, Mailbox, MailMessage
from mailplat.store.models import Blob, Domain, Message, QueueItem
from mailplat.store.route_models import StoredMessage
from tests.conftest import dns_sets
from tests.relaytest import db_url_of, point_mx, _with_store
from tests.smtpsink import free_port
from tests.support import start_server, wait_for

PASSWORD = "correct horse"


# -- core, on SQLite and PostgreSQL ----------------------------------------------------------------
def _ctx(db_url, tmp_path, **mailaccess) -> Context:
    cfg = mconfig.from_raw({"server": {"hostname": "mx.example.test"}, "mailaccess": mailaccess},
                           tmp_path, check_files=False)
    return Context(config=cfg, store=storedb.open_store(db_url))


async def _domain(ctx, name: str) -> None:
    await ctx.store.write(lambda: Domain.create(id=uuid.uuid4().hex[:24], name=name, smtp_login=f"postmaster@{name}"))


def _inbox(address: str) -> list[bytes]:
    rows = (MailMessage.select(MailMessage.blob).join(mailboxes.MailFolder)
            .join(Mailbox).where((Mailbox.address == address) & (mailboxes.MailFolder.name == "INBOX"))
            .order_by(MailMessage.uid))
    return [blobs.get_sync(r.blob) for r in rows]


def test_core_plus_address_and_postmaster(db_url, tmp_path):
    ctx = _ctx(db_url, tmp_path)

    async def scenario():
        await _domain(ctx, "ours.test")
        await mailboxes.create_mailbox(ctx, "ours.test", "ann", PASSWORD)
        await mailboxes.create_mailbox(ctx, "ours.test", "ann+exact", PASSWORD)
        await receive.check_recipient(ctx, "Ann+News@ours.test")
        await receive.check_recipient(ctx, "postmaster@ours.test")
        await receive.check_recipient(ctx, "postmaster+x@ours.test")
        for nobody in ("bob+x@ours.test", "+x@ours.test"):
            with pytest.raises(NotFound):
                await receive.check_recipient(ctx, nobody)
        raw = b"Subject: s\r\n\r\nbody\r\n"
        await receive.accept(ctx, "s@far.test", ["ann+news@ours.test", "ann+exact@ours.test",
                                                  "postmaster@ours.test"], raw, "192.0.2.1")
        assert await receive.deliver_due(ctx) == 1
        ann = await ctx.store.read(_inbox, "ann@ours.test")
        assert len(ann) == 1 and b"\r\nDelivered-To: ann+news@ours.test\r\nSubject: s\r\n" in ann[0]
        exact = await ctx.store.read(_inbox, "ann+exact@ours.test")  # its own mailbox: linked as is
        assert len(exact) == 1 and b"Delivered-To" not in exact[0]
        # No postmaster mailbox: one is made, locked (no password logs in), and the mail is in it.
        pm = await ctx.store.read(_inbox, "postmaster@ours.test")
        assert len(pm) == 1 and b"Delivered-To: postmaster@ours.test\r\n" in pm[0]
        locked = await ctx.store.read(lambda: Mailbox.get(Mailbox.address == "postmaster@ours.test").password_hash)
        assert locked == receive.LOCKED_PASSWORD
        await receive.accept(ctx, "s@far.test", ["postmaster+y@ours.test"], raw, "192.0.2.1")
        await receive.deliver_due(ctx)
        assert len(await ctx.store.read(_inbox, "postmaster@ours.test")) == 2

        # Plus-addressing off: user+tag is unknown again; postmaster is still taken.
        off = Context(config=ctx.config.with_overrides(smtp={"recipient_delimiter": ""}), store=ctx.store)
        with pytest.raises(NotFound):
            await receive.check_recipient(off, "ann+news@ours.test")
        # The configured postmaster mailbox takes postmaster mail of a domain without one.
        await _domain(ctx, "other.test")
        conf = Context(config=ctx.config.with_overrides(smtp={"postmaster_mailbox": "ann@ours.test"}),
                       store=ctx.store)
        await receive.accept(conf, "s@far.test", ["postmaster@other.test"], raw, "192.0.2.1")
        await receive.deliver_due(conf)
        ann = await ctx.store.read(_inbox, "ann@ours.test")
        assert len(ann) == 2 and b"Delivered-To: postmaster@other.test\r\n" in ann[1]
        assert not await ctx.store.read(mailboxes.mailbox_exists_sync, "postmaster@other.test")

    try:
        asyncio.run(scenario())
    finally:
        ctx.store.close()


def test_core_route_naming_the_full_address_keeps_it(db_url, tmp_path):
    """A route whose match_recipient names user+tag takes it: no plus-address copy for user."""
    from mailplat.core import routes
    ctx = _ctx(db_url, tmp_path)

    async def scenario():
        await _domain(ctx, "rt.test")
        await mailboxes.create_mailbox(ctx, "rt.test", "ann", PASSWORD)
        await routes.create_route(ctx, 0, "", 'match_recipient("ann\\+hook@rt.test")', ["store()"])
        await routes.create_route(ctx, 9, "", "catch_all()", ["store()"])
        raw = b"Subject: s\r\n\r\nbody\r\n"
        await receive.accept(ctx, "s@far.test", ["ann+hook@rt.test", "ann+other@rt.test"], raw, "192.0.2.1")
        await receive.deliver_due(ctx)
        got = await ctx.store.read(_inbox, "ann@rt.test")  # a catch_all route does not name ann+other
        assert len(got) == 1 and b"Delivered-To: ann+other@rt.test\r\n" in got[0]

    try:
        asyncio.run(scenario())
    finally:
        ctx.store.close()


def test_core_given_up_full_mailbox_is_returned_to_its_sender(db_url, tmp_path):
    ctx = _ctx(db_url, tmp_path, quota_bytes=1000, over_quota_days=1.0)
    now = [time.time()]
    ctx = Context(config=ctx.config, store=ctx.store, clock=lambda: now[0])

    async def scenario():
        await _domain(ctx, "small.test")
        await mailboxes.create_mailbox(ctx, "small.test", "tiny", PASSWORD)
        big = b"Subject: big one\r\nMessage-Id: <orig@far.test>\r\n\r\n" + b"y" * 2000 + b"\r\n"
        report = (b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b--\r\n"
                  + b"z" * 2000)
        await receive.accept(ctx, "Sender@far.test", ["tiny@small.test"], big, "192.0.2.1")
        await receive.accept(ctx, "", ["tiny@small.test"], big, "192.0.2.1")  # null sender: no notice
        await receive.accept(ctx, "MAILER-DAEMON@far.test", ["tiny@small.test"], big, "192.0.2.1")
        await receive.accept(ctx, "s2@far.test", ["tiny@small.test"], report, "192.0.2.1")  # a report itself
        await receive.deliver_due(ctx)
        states = await ctx.store.read(lambda: {j.state for j in InboundJob.select()})
        assert states == {"queued"}  # retried while younger than over_quota_days
        assert await ctx.store.read(lambda: Message.select().count()) == 0
        now[0] += 86400.0 + 1
        await ctx.store.write(lambda: InboundJob.update(next_attempt_at=0).execute())
        await receive.deliver_due(ctx)
        states = await ctx.store.read(lambda: [j.state for j in InboundJob.select()])
        assert states == ["failed"] * 4
        msgs = await ctx.store.read(lambda: list(Message.select()))
        assert len(msgs) == 1 and msgs[0].sender == "" and msgs[0].source == "dsn"
        rcpts = await ctx.store.read(lambda: [q.recipient for q in QueueItem.select()])
        assert rcpts == ["Sender@far.test"]
        notice = email.message_from_bytes(await ctx.store.read(blobs.get_sync, msgs[0].blob), policy=policy.default)
        assert notice.get_content_type() == "multipart/report"
        assert notice.get_param("report-type") == "delivery-status"
        assert notice["From"].addresses[0].addr_spec == "MAILER-DAEMON@small.test"
        human, status, headers = notice.get_payload()
        assert status.get_content_type() == "message/delivery-status"
        text = status.as_bytes().decode()
        assert "Final-Recipient: rfc822; tiny@small.test" in text and "Action: failed" in text
        assert "Status: 5.2.2" in text and "Reporting-MTA: dns; mx.example.test" in text
        assert headers.get_content_type() == "text/rfc822-headers"
        assert b"Message-Id: <orig@far.test>" in headers.as_bytes() and b"yyyy" not in headers.as_bytes()
        await receive.deliver_due(ctx)  # sent once
        assert await ctx.store.read(lambda: Message.select().count()) == 1
        # A notice being sent is leased: another worker process does not send it too, unless
        # the lease runs out (the sender crashed).
        await ctx.store.write(lambda: InboundJob.update(state="bouncing", lease_until=None).where(
            InboundJob.mail_from == "").execute())
        first = await ctx.store.write(receive._claim_bouncing_sync, now[0])
        assert len(first) == 1 and await ctx.store.write(receive._claim_bouncing_sync, now[0]) == []
        assert len(await ctx.store.write(receive._claim_bouncing_sync, now[0] + receive.NOTICE_LEASE + 1)) == 1

    try:
        asyncio.run(scenario())
    finally:
        ctx.store.close()


def test_core_blob_gc(db_url, tmp_path):
    ctx = _ctx(db_url, tmp_path)

    async def scenario():
        await _domain(ctx, "gc.test")
        await mailboxes.create_mailbox(ctx, "gc.test", "ann", PASSWORD)
        mbid = await ctx.store.read(mailboxes.account_id_sync, "ann@gc.test")
        fid, _, (gone_uid,), _ = await ctx.store.write(mailboxes.append_sync, mbid, "INBOX",
                                                      [(b"Subject: a\r\n\r\ngone\r\n", [], 0.0)])
        await ctx.store.write(mailboxes.append_sync, mbid, "INBOX", [(b"Subject: b\r\n\r\nkept\r\n", [], 0.0)])
        await ctx.store.write(mailboxes.store_flags_sync, fid, [gone_uid], ["\\Deleted"], 1)
        await ctx.store.write(mailboxes.expunge_sync, fid)
        gone, kept = blobs.digest(b"Subject: a\r\n\r\ngone\r\n"), blobs.digest(b"Subject: b\r\n\r\nkept\r\n")
        # Within the grace period nothing goes; past it, only the unreferenced blob.
        assert await ctx.store.write(blobs.collect_sync, time.time() - 3600) == 0
        assert await ctx.store.write(blobs.collect_sync, time.time() + 1) == 1
        present = await ctx.store.read(mailboxes.blobs_present_sync, [gone, kept])
        assert present == [kept]
        # Stored again (and referenced) after it went: back, and kept by the next pass.
        await ctx.store.write(mailboxes.append_sync, mbid, "INBOX", [(b"Subject: a\r\n\r\ngone\r\n", [], 0.0)])
        assert await ctx.store.write(blobs.collect_sync, time.time() + 1) == 0
        assert sorted(await ctx.store.read(mailboxes.blobs_present_sync, [gone, kept])) == sorted([gone, kept])

        # Sent mail: the body goes keep_sent_bodies_days after every recipient is final.
        from mailplat.core import send
        for subject in ("done", "pending"):
            await send.submit(ctx, send.SendRequest(domain="gc.test", source="api", from_="a@gc.test",
                                                    to=["x@far.test"], subject=subject, text="hi"))
        await ctx.store.write(lambda: QueueItem.update(state="delivered").where(
            QueueItem.message.in_(Message.select(Message.id).where(Message.subject == "done"))).execute())
        sent = await ctx.store.read(lambda: {m.subject: m.blob for m in Message.select()})
        assert await receive.collect_garbage(ctx, 0) == 0  # younger than 30 days
        await ctx.store.write(lambda: Message.update(created_at=Message.created_at - 31 * 86400).execute())
        assert await receive.collect_garbage(ctx, 0) == 1
        assert await ctx.store.read(mailboxes.blobs_present_sync, list(sent.values())) == [sent["pending"]]
        assert await ctx.store.read(lambda: Message.select().count()) == 2  # the rows stay

    try:
        asyncio.run(scenario())
    finally:
        ctx.store.close()


def test_every_blob_column_is_a_gc_reference():
    from mailplat.store.models import ALL_MODELS
    columns = {(m, name) for m in ALL_MODELS for name in m._meta.fields if name == "blob"}
    assert columns == set(blobs.REFERENCES)


def test_pg_gc_waits_for_a_writer_storing_the_same_body(db_url, tmp_path):
    """A collection running while another transaction stores the same bytes again (put_sync:
    its ON CONFLICT refresh locks the row) waits for it, then keeps the blob that transaction
    references."""
    if not db_url.startswith("postgres"):
        pytest.skip("PostgreSQL only: SQLite serializes write transactions")
    import psycopg2
    ctx = _ctx(db_url, tmp_path)
    body = b"Subject: again\r\n\r\nsame bytes\r\n"
    sha = blobs.digest(body)
    stored, release, result = threading.Event(), threading.Event(), {}

    def writer():  # a connection of its own (peewee connections are per thread)
        with ctx.store.sync():
            blobs.put_sync(body)
            stored.set()
            release.wait(30)
            StoredMessage.create(key="k1", domain="x.test", blob=sha, size=len(body), expires_at=time.time() + 60)

    def gc():
        with ctx.store.sync():
            result["n"] = blobs.collect_sync(time.time() - 60)

    watcher = psycopg2.connect(db_url)
    watcher.autocommit = True  # pg_stat_activity is a snapshot per transaction
    cur = watcher.cursor()

    def gc_waits():
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'DELETE%%'")
        return cur.fetchone()[0] == 1

    threads = [threading.Thread(target=writer), threading.Thread(target=gc)]
    try:
        with ctx.store.sync():
            blobs.put_sync(body)
            Blob.update(created_at=0).where(Blob.sha256 == sha).execute()  # old and unreferenced
        threads[0].start()
        assert stored.wait(10)
        threads[1].start()
        wait_for(gc_waits, timeout=10, what="the collection to wait on the writer's row lock")
        release.set()
        for t in threads:
            t.join(10)
        assert result == {"n": 0}
        with ctx.store.sync():
            assert Blob.select().where(Blob.sha256 == sha).exists()
            assert StoredMessage.select().count() == 1
    finally:
        release.set()
        watcher.close()
        ctx.store.close()


# -- over real sockets ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mx(tmp_path_factory, dns_server):
    """A mailplat whose relay delivers to its own MX (so a notice it returns arrives in a
    mailbox here), mailboxes of 4000 bytes, and full mailboxes given up at once."""
    import os
    from tests.conftest import PG_BASE
    from tests.support import pg_database
    port = free_port()
    sets = dns_sets(dns_server) + [f"relay.remote_port={port}",
                                   "relay.allow_private_mx=true", "mailaccess.quota_bytes=4000",
                                   "mailaccess.over_quota_days=0"]
    env = {"MAILPLAT_SMTP_PORT": str(port)}  # init gives every port 0; the environment wins
    data_dir = tmp_path_factory.mktemp("mailplat")
    if os.environ.get("MAILPLAT_TEST_PG_SERVER") and PG_BASE:
        with pg_database(PG_BASE) as url:
            srv = start_server(data_dir, db_url=url, sets=sets, env=env)
            srv.dns, srv.data_dir = dns_server, data_dir
            yield srv
            srv.stop()
    else:
        srv = start_server(data_dir, sets=sets, env=env)
        srv.dns, srv.data_dir = dns_server, data_dir
        yield srv
        srv.stop()


def _mailbox(srv, domain: str, local: str) -> str:
    r = srv.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": local, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return f"{local}@{domain}"


def _new_domain(srv) -> str:
    domain = f"p{uuid.uuid4().hex[:8]}.example.test"
    assert srv.api("POST", "/v3/domains", data={"name": domain}).status_code == 200
    return domain


def _imap(srv, address: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
    imap.login(address, PASSWORD)
    return imap


def _fetch_all(imap) -> list[bytes]:
    typ, data = imap.select("INBOX")
    if int(data[0]) == 0:
        return []
    typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
    return [part[1] for part in data if isinstance(part, tuple)]


def test_plus_address_and_postmaster_over_smtp_and_imap(mx):
    domain = _new_domain(mx)
    ann = _mailbox(mx, domain, "ann")
    with smtplib.SMTP("127.0.0.1", mx.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        s.mail("a@far.test")
        assert s.rcpt(f"bob+x@{domain}")[0] == 550  # no mailbox bob: unknown
        s.rset()
        s.sendmail("a@far.test", [f"ann+lists@{domain}"], b"Subject: plus\r\n\r\nfor ann\r\n")
        s.sendmail("a@far.test", [f"PostMaster@{domain}"], b"Subject: pm\r\n\r\nfor postmaster\r\n")
    imap = _imap(mx, ann)
    got = wait_for(lambda: _fetch_all(imap), timeout=30, what="plus-addressed mail in ann's INBOX")
    assert len(got) == 1 and b"Delivered-To: ann+lists@" + domain.encode() + b"\r\nSubject: plus\r\n" in got[0]
    imap.logout()
    # postmaster@ had no mailbox: one was made, and it shows in the Mailboxes API.
    wait_for(lambda: any(i["mailbox"] == f"postmaster@{domain}"
                         for i in mx.api("GET", f"/v3/{domain}/mailboxes").json()["items"]),
             timeout=30, what="postmaster mailbox")
    with pytest.raises(imaplib.IMAP4.error):
        _imap(mx, f"postmaster@{domain}")  # locked until the operator sets a password
    r = mx.api("PUT", f"/v3/{domain}/mailboxes/postmaster", data={"password": PASSWORD})
    assert r.status_code == 200, r.text
    imap = _imap(mx, f"postmaster@{domain}")
    got = wait_for(lambda: _fetch_all(imap), timeout=30, what="postmaster mail")
    assert b"Subject: pm\r\n\r\nfor postmaster\r\n" in got[0] and b"Delivered-To: postmaster@" in got[0]
    imap.logout()


def test_full_mailbox_mail_comes_back_as_a_notice(mx):
    domain, sender_domain = _new_domain(mx), _new_domain(mx)
    tiny = _mailbox(mx, domain, "tiny")
    sender = _mailbox(mx, sender_domain, "writer")
    point_mx(mx.dns, sender_domain, "127.0.0.1")
    big = b"Subject: too big\r\nMessage-Id: <big@x.test>\r\n\r\n" + b"x" * 5000 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", mx.ports["smtp"], timeout=30) as s:
        s.sendmail(sender, [tiny], big)
    imap = _imap(mx, sender)
    got = wait_for(lambda: _fetch_all(imap), timeout=60, what="the notice in the sender's INBOX")
    imap.logout()
    notice = email.message_from_bytes(got[0], policy=policy.default)
    assert notice.get_content_type() == "multipart/report"
    status = notice.get_payload()[1].as_bytes().decode()
    assert f"Final-Recipient: rfc822; {tiny}" in status and "Status: 5.2.2" in status
    assert b"Message-Id: <big@x.test>" in notice.get_payload()[2].as_bytes()
    assert len(_with_store(db_url_of(mx.data_dir), lambda: list(
        Message.select().where(Message.source == "dsn")))) >= 1
    imap = _imap(mx, tiny)
    assert _fetch_all(imap) == []
    imap.logout()


def test_expunged_message_body_is_collected(mx):
    domain = _new_domain(mx)
    ann = _mailbox(mx, domain, "ann")
    with smtplib.SMTP("127.0.0.1", mx.ports["smtp"], timeout=30) as s:
        s.sendmail("a@far.test", [ann], b"Subject: one\r\n\r\nfirst\r\n")
        s.sendmail("a@far.test", [ann], b"Subject: two\r\n\r\nsecond\r\n")
    imap = _imap(mx, ann)
    got = wait_for(lambda: len(_fetch_all(imap)) == 2 and _fetch_all(imap), timeout=30, what="two messages")
    shas = [blobs.digest(b) for b in got]
    url = db_url_of(mx.data_dir)
    # Done inbound jobs are kept a week and hold the bodies: let them age out first.
    _with_store(url, lambda: InboundJob.update(received_at=0).where(InboundJob.blob.in_(shas)).execute())
    _with_store(url, receive._purge_sync, time.time())
    imap.uid("STORE", "1", "+FLAGS", "(\\Deleted)")
    imap.expunge()
    imap.logout()
    for bad in ("-1", "nan", "soon"):  # a negative grace would remove bodies being stored now
        refused = mx.cli("db", "gc", "--grace", bad, check=False)
        assert refused.returncode == 2 and "--grace" in refused.stderr, bad
    assert sorted(_with_store(url, mailboxes.blobs_present_sync, shas)) == sorted(shas)  # nothing removed
    out = mx.cli("db", "gc", "--grace", "0").stdout
    assert out.startswith("deleted ")
    present = _with_store(url, mailboxes.blobs_present_sync, shas)
    assert present == [shas[1]]
