"""The receive path: RCPT decisions, commit before 250, delivery into mailboxes from the inbound
job, and byte-exact round trips (SMTP in; IMAP and POP3 out) of awkward real-world messages."""
from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import smtplib
import uuid

import pytest

from mailplat import config as mconfig
from mailplat.core import mailboxes, receive
from mailplat.core.context import Context
from mailplat.errors import ForbiddenError, NotFound
from mailplat.store import db as storedb
from mailplat.store.mailbox_models import InboundJob, MailMessage
from mailplat.store.models import Domain
from tests.support import wait_for

PASSWORD = "correct horse"


# -- core, on SQLite and PostgreSQL -----------------------------------------------------------
def _ctx(db_url, tmp_path) -> Context:
    cfg = mconfig.from_raw({"server": {"hostname": "mx.example.test"}}, tmp_path, check_files=False)
    store = storedb.open_store(db_url)
    return Context(config=cfg, store=store)


def test_core_receive_commits_then_files_once(db_url, tmp_path):
    ctx = _ctx(db_url, tmp_path)

    async def scenario():
        await ctx.store.write(lambda: Domain.create(id=uuid.uuid4().hex[:24], name="ours.test",
                                                     smtp_login="postmaster@ours.test"))
        await ctx.store.write(lambda: Domain.create(id=uuid.uuid4().hex[:24], name="wild.test",
                                                     smtp_login="postmaster@wild.test", wildcard=True))
        await mailboxes.create_mailbox(ctx, "ours.test", "ann", PASSWORD)
        await receive.check_recipient(ctx, "Ann@OURS.test")
        with pytest.raises(NotFound) as nf:
            await receive.check_recipient(ctx, "nobody@ours.test")
        assert nf.value.smtp_reply.startswith("550 5.1.1")
        for other in ("x@other.test", "x@ours.test.evil.test", "x@[127.0.0.1]", "x@sub.ours.test"):
            with pytest.raises(ForbiddenError) as fe:
                await receive.check_recipient(ctx, other)
            assert fe.value.smtp_reply.startswith("554 5.7.1")
        with pytest.raises(NotFound):  # a wildcard domain's subdomain is ours: unknown user, not relay
            await receive.check_recipient(ctx, "x@deep.sub.wild.test")

        raw = b"Subject: hello\r\n\r\nbody\r\n"
        job_id = await receive.accept(ctx, "s@far.test", ["ann@ours.test"], raw, "192.0.2.7")
        # Committed before accept() returned: visible to a fresh read, not yet delivered.
        jobs = await ctx.store.read(lambda: [(j.state, j.size) for j in InboundJob.select()])
        assert jobs[0][0] == "queued" and jobs[0][1] > len(raw) and job_id.startswith("in-")
        assert await receive.deliver_due(ctx) == 1
        assert await receive.deliver_due(ctx) == 0  # nothing filed twice
        rows = await ctx.store.read(lambda: list(MailMessage.select()))
        assert len(rows) == 1
        data = (await ctx.store.read(mailboxes.blob_bytes_sync, [rows[0].blob]))[rows[0].blob]
        assert data.startswith(b"Received: from [192.0.2.7] by mx.example.test")
        assert data.split(b"\r\n", 2)[2] == raw
        listing = await mailboxes.list_mailboxes(ctx, "ours.test")
        assert listing["items"][0]["size_bytes"] == len(data)
        state = await ctx.store.read(lambda: InboundJob.get().state)
        assert state == "done"

    try:
        asyncio.run(scenario())
    finally:
        ctx.store.close()


def test_core_full_mailbox_defers_delivery_and_append(db_url, tmp_path):
    ctx = _ctx(db_url, tmp_path)
    ctx = Context(config=ctx.config.with_overrides(mailaccess={"quota_bytes": 1000}), store=ctx.store)

    async def scenario():
        await ctx.store.write(lambda: Domain.create(id=uuid.uuid4().hex[:24], name="small.test",
                                                     smtp_login="postmaster@small.test"))
        await mailboxes.create_mailbox(ctx, "small.test", "tiny", PASSWORD)
        mbid = await ctx.store.read(mailboxes.account_id_sync, "tiny@small.test")
        with pytest.raises(mailboxes.OverQuota):
            await ctx.store.write(mailboxes.append_sync, mbid, "INBOX", [(b"x" * 2000, [], 0.0)])
        await receive.accept(ctx, "s@far.test", ["tiny@small.test"], b"Subject: big\r\n\r\n" + b"y" * 2000, "192.0.2.1")
        await receive.accept(ctx, "s@far.test", ["tiny@small.test"], b"Subject: ok\r\n\r\nsmall\r\n", "192.0.2.1")
        await receive.deliver_due(ctx)
        jobs = await ctx.store.read(lambda: sorted((j.size, j.state, j.last_error, j.next_attempt_at > ctx.clock())
                                                   for j in InboundJob.select()))
        assert jobs[0][1] == "done" and jobs[0][0] < 1000  # the small one (sizes include our trace header)
        assert jobs[1][1:] == ("queued", "mailbox full", True)  # kept, retried later, never dropped
        count = await ctx.store.read(lambda: MailMessage.select().count())
        assert count == 1

    try:
        asyncio.run(scenario())
    finally:
        ctx.store.close()


# -- over real sockets -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def box(server):
    domain = f"r{uuid.uuid4().hex[:8]}.example.test"
    assert server.api("POST", "/v3/domains", data={"name": domain}).status_code == 200
    addr = f"rcv@{domain}"
    r = server.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": addr, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return domain, addr


def test_rcpt_decisions_during_the_session(server, box):
    domain, addr = box
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("a@far.test")[0] == 250
        code, msg = s.rcpt(f"nobody@{domain}")
        assert code == 550 and b"5.1.1" in msg
        code, msg = s.rcpt("someone@not-ours.test")
        assert code == 554 and b"5.7.1" in msg
        assert s.rcpt(addr)[0] == 250


def _strip_trace(data: bytes) -> bytes:
    assert data.startswith(b"Received: from ")
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", data)
    return data[m.end():]


def _tricky() -> dict[str, bytes]:
    boundary_a, boundary_b = b"==outer==", b"--inner--"
    nested = (b"From: x@far.test\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=\"" + boundary_a + b"\"\r\n\r\n"
              b"--" + boundary_a + b"\r\nContent-Type: multipart/alternative; boundary=\"" + boundary_b + b"\"\r\n\r\n"
              b"--" + boundary_b + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain \xc3\xa9\r\n"
              b"--" + boundary_b + b"\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--" + boundary_b + b"--\r\n"
              b"--" + boundary_a + b"\r\nContent-Type: message/rfc822\r\n\r\n"
              b"From: inner@far.test\r\nSubject: inner\r\n\r\ninner body\r\n"
              b"--" + boundary_a + b"--\r\n")
    return {
        "utf8": "Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße, 日本語 ✓\r\n".encode(),
        "latin1": b"Subject: latin\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nD\xe9j\xe0 vu \xff\r\n",
        "nested": nested,
        "long_lines": b"Subject: long\r\n\r\n" + b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n",
        "dots": b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nend\r\n",
        "mbox_from": b"Subject: from\r\n\r\nFrom here on\r\n>From quoted\r\nFrom \r\n",
        "empty_body": b"Subject: empty\r\n\r\n",
        "big": b"Subject: big\r\n\r\n" + (b"0123456789abcdef" * 4 + b"\r\n") * 31000,
    }


def test_byte_exact_round_trip_smtp_to_imap_and_pop3(server, box):
    domain, addr = box
    sent = _tricky()
    for name, raw in sent.items():
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=60) as s:
            s.sendmail("sender@far.test", [addr], raw)
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    imap.login(addr, PASSWORD)

    def count():
        typ, data = imap.select("INBOX")
        return int(data[0]) >= len(sent)

    wait_for(count, timeout=30, what="delivery into INBOX")
    typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
    bodies = [part[1] for part in data if isinstance(part, tuple)]
    stripped = [_strip_trace(b) for b in bodies]
    for name, raw in sent.items():
        assert raw in stripped, f"{name} did not round-trip byte for byte over IMAP"
    imap.logout()

    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=60)
    pop.user(addr)
    pop.pass_(PASSWORD)
    n, _ = pop.stat()
    got = []
    for i in range(1, n + 1):
        _, lines, _ = pop.retr(i)
        got.append(b"\r\n".join(lines) + b"\r\n")
    pop.quit()
    stripped = [_strip_trace(b) for b in got]
    for name, raw in sent.items():
        # poplib splits on line ends and undoes dot-stuffing; the bytes between are ours to check
        assert raw in stripped, f"{name} did not round-trip byte for byte over POP3"
    sizes = server.api("GET", f"/v3/{domain}/mailboxes").json()["items"]
    assert sizes[0]["size_bytes"] == sum(len(b) for b in bodies)


def _strip_client_lf(data: bytes) -> bytes:
    """A message as mbsync/fetchmail store it (LF line ends, their own headers) back to what we
    sent: drop X-TUID (mbsync) and every leading Received header (fetchmail's, then ours)."""
    data = re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", data)
    while data.startswith(b"Received:"):
        m = re.match(rb"Received:[^\n]*\n(?:[ \t][^\n]*\n)*", data)
        data = data[m.end():]
    return data


def test_byte_exact_round_trip_smtp_to_mbsync_and_fetchmail(server, tmp_path):
    import shutil
    import subprocess
    if not (shutil.which("mbsync") and shutil.which("fetchmail")):
        pytest.skip("mbsync (isync) and fetchmail are not installed")
    domain = f"c{uuid.uuid4().hex[:8]}.example.test"
    assert server.api("POST", "/v3/domains", data={"name": domain}).status_code == 200
    addr = f"clients@{domain}"
    assert server.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": addr, "password": PASSWORD}).status_code == 200
    sent = _tricky()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=60) as s:
        for raw in sent.values():
            s.sendmail("sender@far.test", [addr], raw)
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    imap.login(addr, PASSWORD)
    wait_for(lambda: int(imap.select("INBOX")[1][0]) == len(sent), timeout=30, what="delivery")
    imap.logout()
    expected = sorted(raw.replace(b"\r\n", b"\n") for raw in sent.values())
    cert = server.data_dir / "tls" / "cert.pem"

    maildir = tmp_path / "maildir"
    maildir.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"IMAPAccount t\nHost 127.0.0.1\nPort {server.ports['imaps']}\nUser {addr}\nPass \"{PASSWORD}\"\n"
                  f"SSLType IMAPS\nCertificateFile {cert}\n\nIMAPStore remote\nAccount t\n\n"
                  f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\n\n"
                  f"Channel c\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSync Pull\nSyncState *\n")
    out = subprocess.run(["mbsync", "-c", str(rc), "c"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    got = sorted(_strip_client_lf(p.read_bytes()) for p in (maildir / "INBOX" / "new").iterdir())
    assert got == expected, "mbsync copies differ from what was sent"

    out_dir = tmp_path / "fetched"
    out_dir.mkdir()
    frc = tmp_path / "fetchmailrc"
    frc.write_text(f'poll 127.0.0.1 protocol pop3 service {server.ports["pop3s"]} user "{addr}" '
                   f'password "{PASSWORD}" ssl sslcertck sslcertfile "{cert}" sslcertpath "{tmp_path}" '
                   f'sslcommonname "localhost" mda "/bin/sh -c \'cat > {out_dir}/msg.$$\'" keep\n')
    frc.chmod(0o600)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(tmp_path)}
    res = subprocess.run(["fetchmail", "-f", str(frc), "--nosyslog"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    got = sorted(_strip_client_lf(p.read_bytes()) for p in out_dir.iterdir())
    assert got == expected, "fetchmail copies differ from what was sent"
