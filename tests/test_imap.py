"""IMAP over real sockets: imaplib on plain, STARTTLS and implicit TLS; LOGINDISABLED; APPEND
and FETCH byte for byte; UIDPLUS, MOVE, SPECIAL-USE, CONDSTORE; IDLE push of a message
delivered over SMTP; two sessions kept consistent; folder-name rules; and hostile input
(literals, nesting, long lines) answered quickly without hurting other sessions."""
from __future__ import annotations

import imaplib
import re
import smtplib
import socket
import ssl
import time
import uuid

import pytest

from tests.support import init_data_dir, serve, wait_for

PASSWORD = "imap-pass-1"


def _tls_context(server) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.data_dir / "tls" / "cert.pem"))


def new_mailbox(server) -> str:
    domain = f"i{uuid.uuid4().hex[:8]}.example.test"
    assert server.api("POST", "/v3/domains", data={"name": domain}).status_code == 200
    addr = f"user@{domain}"
    r = server.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": addr, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return addr


@pytest.fixture
def addr(server):
    return new_mailbox(server)


def login(server, addr) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    m.login(addr, PASSWORD)
    return m


class Raw:
    """A bare IMAP connection for what imaplib will not send."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def line(self) -> bytes:
        data = self.file.readline(1_000_000)
        if not data:
            raise ConnectionError("closed")
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line.startswith(tag + b" "):
                return out

    def close(self):
        self.file.close()
        self.sock.close()


# -- transport and login ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A server without dev mode: no passwords before TLS, even from loopback."""
    data_dir = tmp_path_factory.mktemp("strict")
    key = init_data_dir(data_dir)
    cfg = data_dir / "mailplat.toml"
    cfg.write_text(cfg.read_text().replace("dev_mode = true", "dev_mode = false"))
    srv = serve(data_dir, key, ["api", "mailaccess"])
    yield srv
    srv.stop()


def test_logindisabled_before_starttls_and_login_after(strict):
    addr = new_mailbox(strict)
    m = imaplib.IMAP4("127.0.0.1", strict.ports["imap"])
    assert "LOGINDISABLED" in m.capabilities and "STARTTLS" in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        m.login(addr, PASSWORD)
    m.starttls(_tls_context(strict))
    assert "LOGINDISABLED" not in m.capabilities and "STARTTLS" not in m.capabilities
    assert m.login(addr, PASSWORD)[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()

    s = imaplib.IMAP4_SSL("127.0.0.1", strict.ports["imaps"], ssl_context=_tls_context(strict))
    assert "AUTH=PLAIN" in s.capabilities and "LOGINDISABLED" not in s.capabilities
    assert s.authenticate("PLAIN", lambda _: f"\0{addr}\0{PASSWORD}".encode())[0] == "OK"
    assert "UIDPLUS" in s.capabilities or s.capability()[0] == "OK"
    s.logout()


def test_starttls_drops_pipelined_plaintext(strict):
    raw = Raw(strict.ports["imap"])
    raw.send(b"a STARTTLS\r\nb CAPABILITY\r\n")
    assert raw.line().startswith(b"a OK")
    tls = _tls_context(strict).wrap_socket(raw.sock, server_hostname="localhost")
    f = tls.makefile("rb")
    tls.sendall(b"c NOOP\r\n")
    first = f.readline()
    assert first.startswith(b"c OK"), first  # nothing answered for the injected "b"
    tls.close()


def test_wrong_password_is_refused_and_right_one_still_works(server, addr):
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    for _ in range(2):
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            m.login(addr, "wrong-password")
    with pytest.raises(imaplib.IMAP4.error):
        m.login("nobody@nowhere.test", PASSWORD)
    assert m.login(addr, PASSWORD)[0] == "OK"
    m.logout()


# -- mailbox commands -------------------------------------------------------------------------
def test_special_use_folders_and_names(server, addr):
    m = login(server, addr)
    typ, lines = m.list()
    listed = {re.search(rb'"([^"]+)"$', ln).group(1): ln for ln in lines}
    for name, use in ((b"Sent", b"\\Sent"), (b"Drafts", b"\\Drafts"), (b"Trash", b"\\Trash"),
                      (b"Junk", b"\\Junk"), (b"Archive", b"\\Archive")):
        assert use in listed[name]
    assert b"INBOX" in listed
    typ, lines = m._simple_command("LIST", "(SPECIAL-USE)", '""', "*")
    special = m.untagged_responses.pop("LIST")
    assert typ == "OK" and len(special) == 5 and not any(b'"INBOX"' in ln for ln in special)
    odd = ["Entw&APw-rfe", "&ZeVnLIqe-", "a b", "Proj/Sub &- more"]
    for name in odd:
        assert m.create(f'"{name}"')[0] == "OK", name
    typ, lines = m.list()
    for name in odd:
        assert any(ln.endswith(b'"' + name.encode() + b'"') for ln in lines), name
    for bad in ["../etc", "a/../b", "/abs", "~root", "&Jjo", "&AGE-", "x/./y", "a//b"]:
        typ, data = m._simple_command("CREATE", f'"{bad}"')
        assert typ == "NO", bad
    assert m.rename('"a b"', '"c d"')[0] == "OK"
    assert m.delete('"c d"')[0] == "OK"
    assert m.select('"c d"')[0] == "NO"
    assert m.delete("INBOX")[0] == "NO"
    typ, data = m.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")
    assert typ == "OK" and b"MESSAGES 0" in data[0]
    m.logout()


def test_append_fetch_uidplus_move_and_expunge(server, addr):
    m = login(server, addr)
    raw = (b"From: A <a@far.test>\r\nTo: user@x.test\r\nSubject: =?utf-8?q?H=C3=A9llo?=\r\n"
           b"Message-ID: <m1@far.test>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBody \xc3\xa9\r\n.\r\n")
    typ, data = m.append("INBOX", r"(\Flagged $Label1)", imaplib.Time2Internaldate(1_700_000_000), raw)
    assert typ == "OK"
    uidvalidity, uid = map(int, re.search(rb"APPENDUID (\d+) (\d+)", data[0]).groups())
    typ, data = m.select("INBOX")
    assert data == [b"1"]
    assert m.untagged_responses["UIDVALIDITY"] == [str(uidvalidity).encode()]
    typ, data = m.uid("FETCH", str(uid), "(UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[] ENVELOPE BODYSTRUCTURE)")
    meta, body = data[0]
    assert body == raw
    assert b"RFC822.SIZE %d" % len(raw) in meta and b"\\Flagged" in meta and b"$Label1" in meta
    assert b'INTERNALDATE "14-Nov-2023 22:13:20 +0000"' in meta
    assert b'"<m1@far.test>"' in meta and b'("A" NIL "a" "far.test")' in meta
    assert b'("TEXT" "PLAIN" ("CHARSET" "utf-8")' in meta
    typ, data = m.uid("FETCH", str(uid), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT]<0.4> BODY.PEEK[1])")
    parts = [p for p in data if isinstance(p, tuple)]
    assert parts[0][1] == b"Subject: =?utf-8?q?H=C3=A9llo?=\r\n\r\n"
    assert parts[1][1] == b"Body"
    assert parts[2][1] == b"Body \xc3\xa9\r\n.\r\n"
    assert b"\\Seen" not in m.uid("FETCH", str(uid), "(FLAGS)")[1][0]
    m.uid("FETCH", str(uid), "(BODY[TEXT])")
    assert b"\\Seen" in m.uid("FETCH", str(uid), "(FLAGS)")[1][0]

    typ, data = m._simple_command("UID", "COPY", str(uid), "Archive")
    assert typ == "OK" and re.search(rb"\[COPYUID \d+ %d 1\]" % uid, data[0]), data
    typ, data = m._simple_command("UID", "COPY", str(uid), "NoSuchFolder")
    assert typ == "NO" and b"TRYCREATE" in data[0]
    typ, data = m._simple_command("UID", "MOVE", str(uid), "Trash")
    assert typ == "OK"
    assert re.search(rb"\d+ %d 1" % uid, m.untagged_responses["COPYUID"][0])
    assert m.untagged_responses["EXPUNGE"] == [b"1"]
    assert m.select("INBOX")[1] == [b"0"]
    assert m.select("Trash")[1] == [b"1"]

    for i in range(3):
        m.append("Trash", None, None, b"Subject: %d\r\n\r\nx\r\n" % i)
    m.select("Trash")
    typ, data = m.uid("SEARCH", None, "ALL")
    uids = data[0].split()
    assert len(uids) == 4
    m.uid("STORE", b",".join(uids).decode(), "+FLAGS.SILENT", r"(\Deleted)")
    typ, data = m._simple_command("UID", "EXPUNGE", uids[0].decode())
    assert typ == "OK" and m.untagged_responses.pop("EXPUNGE") == [b"1"]
    typ, data = m.search(None, "DELETED")
    assert data[0].split() == [b"1", b"2", b"3"]
    assert m.expunge()[1] == [b"3", b"2", b"1"]
    assert m.select("Trash")[1] == [b"0"]
    m.logout()


NESTED = (b"From: \"Ann Example\" <ann@far.test>\r\nTo: a@x.test, \"B, C\" <bc@y.test>\r\nCc: group: ;\r\n"
          b"Subject: nested\r\nDate: Tue, 24 Nov 2026 10:00:00 +0100\r\nMessage-ID: <n1@far.test>\r\n"
          b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"AA\"\r\n\r\npreamble\r\n"
          b"--AA\r\nContent-Type: multipart/alternative; boundary=BB\r\n\r\n"
          b"--BB\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nh\xc3\xa9llo\r\n"
          b"--BB\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<b>hi</b>\r\n--BB--\r\n"
          b"--AA\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment; filename=\"fw.eml\"\r\n\r\n"
          b"From: inner@far.test\r\nSubject: inner\r\nContent-Type: text/plain\r\n\r\ninner body\r\n"
          b"--AA\r\nContent-Type: application/octet-stream; name=\"x.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
          b"AAECAw==\r\n--AA--\r\nepilogue\r\n")


def test_bodystructure_envelope_and_sections_on_nested_mime(server, addr):
    m = login(server, addr)
    m.append("INBOX", None, None, NESTED)
    m.select("INBOX")
    typ, data = m.fetch("1", "(BODYSTRUCTURE ENVELOPE)")
    meta = data[0] if isinstance(data[0], bytes) else data[0][0]
    assert b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "8BIT" 6 1' in meta
    assert b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 9 1' in meta
    assert b'"ALTERNATIVE" ("BOUNDARY" "BB")' in meta
    assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" ' in meta and b'"inner"' in meta
    assert b'("ATTACHMENT" ("FILENAME" "fw.eml"))' in meta
    assert b'("APPLICATION" "OCTET-STREAM" ("NAME" "x.bin") NIL NIL "BASE64" 8' in meta
    assert b'"MIXED" ("BOUNDARY" "AA")' in meta
    assert b'(("Ann Example" NIL "ann" "far.test"))' in meta
    assert b'((NIL NIL "a" "x.test") ("B, C" NIL "bc" "y.test"))' in meta
    assert b'((NIL NIL "group" NIL) (NIL NIL NIL NIL))' in meta  # RFC 3501 group syntax
    want = {"1.1": b"h\xc3\xa9llo", "1.2": b"<b>hi</b>", "2": b"From: inner@far.test\r\nSubject: inner\r\n"
            b"Content-Type: text/plain\r\n\r\ninner body", "2.HEADER": b"From: inner@far.test\r\nSubject: inner\r\n"
            b"Content-Type: text/plain\r\n\r\n", "2.TEXT": b"inner body", "2.1": b"inner body", "3": b"AAECAw==",
            "3.MIME": b"Content-Type: application/octet-stream; name=\"x.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n",
            "1.1.MIME": b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n", "9": b""}
    for section, expected in want.items():
        typ, data = m.fetch("1", f"(BODY.PEEK[{section}])")
        assert data[0][1] == expected, section
    typ, data = m.fetch("1", "(BODY.PEEK[]<10.20> BODY.PEEK[HEADER.FIELDS.NOT (TO CC DATE MESSAGE-ID MIME-VERSION CONTENT-TYPE)])")
    assert data[0][1] == NESTED[10:30]
    assert data[1][1] == b"From: \"Ann Example\" <ann@far.test>\r\nSubject: nested\r\n\r\n"
    m.logout()


def test_connection_cap_per_ip(server):
    socks = []
    try:
        refused = None
        for _ in range(60):
            raw = Raw(server.ports["imap"])
            socks.append(raw)
            if raw.greeting.startswith(b"* BYE"):
                refused = raw.greeting
                break
        assert refused is not None and b"UNAVAILABLE" in refused and len(socks) == 51
    finally:
        for s in socks:
            s.close()
    def greeted():
        probe = Raw(server.ports["imap"])
        probe.close()
        return probe.greeting.startswith(b"* OK")

    wait_for(greeted, timeout=10, what="slots freed")


def test_search_and_condstore(server, addr):
    m = login(server, addr)
    for i, subj in enumerate(["apple pie", "Banana split", "cherry tart"]):
        m.append("INBOX", r"(\Seen)" if i == 1 else None, None,
                 f"From: f{i}@far.test\r\nSubject: {subj}\r\n\r\nbody number {i}\r\n".encode())
    m.select("INBOX")
    assert m.search(None, "SUBJECT", "banana")[1] == [b"2"]
    assert m.search(None, "UNSEEN")[1] == [b"1 3"]
    assert m.search(None, "OR", "FROM", "f0@", "BODY", '"number 2"')[1] == [b"1 3"]
    assert m.search(None, "NOT", "(SEEN)", "SMALLER", "10000")[1] == [b"1 3"]
    assert m.uid("SEARCH", None, "UID", "2:*")[1] == [b"2 3"]
    assert m.search("UTF-8", "TEXT", "tart")[1] == [b"3"]
    typ, data = m._simple_command("FETCH", "1:*", "(MODSEQ)")
    modseqs = [int(re.search(rb"MODSEQ \((\d+)\)", x).group(1)) for x in m.untagged_responses.pop("FETCH")]
    typ, data = m._simple_command("STORE", "1", "(UNCHANGEDSINCE %d)" % modseqs[0], "+FLAGS", r"(\Answered)")
    assert typ == "OK"
    typ, data = m._simple_command("STORE", "1", "(UNCHANGEDSINCE %d)" % modseqs[0], "+FLAGS", r"(\Draft)")
    assert typ == "OK" and b"[MODIFIED 1]" in data[0]
    m.logout()


def test_small_commands_and_states(server, addr):
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    with pytest.raises(imaplib.IMAP4.error):
        m.select("INBOX")  # before login
    m.login(addr, PASSWORD)
    typ, data = m.xatom("ID", "NIL")
    assert typ == "OK" and m.untagged_responses.pop("ID")[0].startswith(b'("name" "mailplat")')
    typ, data = m.enable("CONDSTORE")
    assert typ == "OK" and m.untagged_responses.pop("ENABLED") == [b"CONDSTORE"]
    assert m.namespace()[1] == [b'(("" "/")) NIL NIL']
    with pytest.raises(imaplib.IMAP4.error):
        m.fetch("1", "(FLAGS)")  # not selected
    for i in range(2):
        m.append("INBOX", r"(\Deleted)" if i == 0 else None, None, b"Subject: %d\r\n\r\nx\r\n" % i)
    m.append("INBOX", "($NotDeleted)", None, b"Subject: kw\r\n\r\nx\r\n")  # a keyword, not \Deleted
    assert m.unsubscribe("Junk")[0] == "OK"
    assert b'"Junk"' not in b"".join(m.lsub()[1]) and b'"Sent"' in b"".join(m.lsub()[1])
    assert m.subscribe("Junk")[0] == "OK"
    m.select("INBOX", readonly=True)
    typ, data = m.store("1", "+FLAGS", r"(\Seen)")
    assert typ == "NO"
    m.fetch("2", "(BODY[])")  # EXAMINE: no implicit \Seen
    assert b"\\Seen" not in m.fetch("2", "(FLAGS)")[1][0]
    assert m.unselect()[0] == "OK"
    m.select("INBOX")
    assert m.check()[0] == "OK"
    assert m.close()[0] == "OK"  # CLOSE expunges the \Deleted message silently
    typ, data = m.getquotaroot("INBOX")
    assert typ == "OK" and data[0] == [b'"INBOX" ""'] and re.fullmatch(rb'"" \(STORAGE 1 1048576\)', data[1][0]), data
    assert m.setquota('""', "(STORAGE 1)")[0] == "NO"
    typ, data = m.status("INBOX", "(MESSAGES UNSEEN HIGHESTMODSEQ)")
    assert re.search(rb"MESSAGES 2 UNSEEN 2 HIGHESTMODSEQ \d+", data[0]), data
    with pytest.raises(imaplib.IMAP4.error):
        m.fetch("1", "(FLAGS)")  # CLOSE left the selected state
    m.logout()


def test_two_sessions_stay_consistent(server, addr):
    a, b = login(server, addr), login(server, addr)
    for i in range(3):
        a.append("INBOX", None, None, b"Subject: s%d\r\n\r\nx\r\n" % i)
    a.select("INBOX")
    b.select("INBOX")
    a.store("2", "+FLAGS", r"(\Flagged \Deleted)")
    b.noop()
    fetches = b.untagged_responses.pop("FETCH", [])
    assert any(f.startswith(b"2 (") and b"\\Flagged" in f for f in fetches), fetches
    a.expunge()
    b.noop()
    assert b.untagged_responses.pop("EXPUNGE") == [b"2"]
    assert b.search(None, "ALL")[1] == [b"1 2"]
    a.append("INBOX", None, None, b"Subject: new\r\n\r\nx\r\n")
    b.noop()
    assert b.untagged_responses.pop("EXISTS")[-1] == b"3"
    a.logout()
    b.logout()


def test_own_changes_and_interleaved_ones_both_reported(server, addr):
    """A session's own APPEND/STORE/EXPUNGE keep its view without reading it back only when
    nothing else changed the folder in between; another session's change is still reported."""
    a, b = Raw(server.ports["imap"]), Raw(server.ports["imap"])
    for r in (a, b):
        assert r.cmd(b"l", b'LOGIN "%s" "%s"' % (addr.encode(), PASSWORD.encode()))[-1].startswith(b"l OK")
    msg = b"Subject: v\r\n\r\nx\r\n"
    for r in (a, b):
        assert b"* 0 EXISTS\r\n" in r.cmd(b"s", b"SELECT INBOX")
    a.send(b"a1 APPEND INBOX {%d+}\r\n%s\r\n" % (len(msg), msg))
    out = a.until(b"a1")
    assert len(out) == 2 and out[0] == b"* 1 EXISTS\r\n" and out[1].startswith(b"a1 OK [APPENDUID"), out
    b.send(b"b1 APPEND INBOX {%d+}\r\n%s\r\n" % (len(msg), msg))
    out = b.until(b"b1")
    assert out[0] == b"* 2 EXISTS\r\n" and out[-1].startswith(b"b1 OK [APPENDUID"), out
    a.send(b"a2 APPEND INBOX {%d+}\r\n%s\r\n" % (len(msg), msg))
    out = a.until(b"a2")
    assert b"* 3 EXISTS\r\n" in out and out[-1].startswith(b"a2 OK"), out
    assert a.cmd(b"a3", b"STORE 3 +FLAGS (\\Deleted)")[0] == b"* 3 FETCH (FLAGS (\\Deleted))\r\n"
    b.cmd(b"b2", b"STORE 1 +FLAGS.SILENT (\\Flagged)")
    out = a.cmd(b"a4", b"EXPUNGE")
    assert b"* 3 EXPUNGE\r\n" in out and b"* 1 FETCH (UID 1 FLAGS (\\Flagged))\r\n" in out, out
    # b may not hear of the expunge during FETCH, but must at the next command that allows it.
    out = b.cmd(b"b3", b"FETCH 1 (FLAGS)")
    assert not any(line.endswith(b"EXPUNGE\r\n") for line in out), out
    out = b.cmd(b"b4", b"FETCH 2 (FLAGS)")
    assert not any(line.endswith(b"EXPUNGE\r\n") for line in out), out
    out = b.cmd(b"b5", b"UID SEARCH ALL")
    assert b"* 3 EXPUNGE\r\n" in out and b"* SEARCH 1 2\r\n" in out, out
    b.cmd(b"b6", b"STORE 1 +FLAGS.SILENT (\\Seen)")
    out = a.cmd(b"a5", b"SELECT INBOX")
    assert b"* 2 EXISTS\r\n" in out and b"* OK [UNSEEN 2] First unseen\r\n" in out, out
    a.close()
    b.close()


def test_idle_push_of_smtp_delivery(server, addr):
    raw = Raw(server.ports["imap"])
    assert raw.cmd(b"a", f'LOGIN "{addr}" "{PASSWORD}"'.encode())[-1].startswith(b"a OK")
    assert raw.cmd(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
    raw.send(b"c IDLE\r\n")
    assert raw.line().startswith(b"+")
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@far.test", [addr], b"Subject: push\r\n\r\nhello\r\n")
    sent = time.monotonic()
    line = raw.line()
    elapsed = time.monotonic() - sent
    assert line == b"* 1 EXISTS\r\n"
    assert elapsed < 3.0, f"IDLE push took {elapsed:.2f}s (total {time.monotonic() - start:.2f}s)"
    raw.send(b"DONE\r\nd NOOP\r\n")  # a command pipelined right after DONE is not lost
    assert raw.until(b"c")[-1].startswith(b"c OK")
    assert raw.until(b"d")[-1].startswith(b"d OK")
    raw.close()


# -- hostile input ----------------------------------------------------------------------------
def test_literal_abuse_is_refused_without_continuation(server, addr):
    raw = Raw(server.ports["imap"])
    # Before login: no "+" for anything but a small literal.
    assert raw.cmd(b"a", b"LOGIN {99999999}")[-1].startswith(b"a BAD")
    assert raw.cmd(b"b", b"LOGIN {-1}")[-1].startswith(b"b BAD")
    assert raw.cmd(b"c", b"LOGIN {99999999999999999999}")[-1].startswith(b"c BAD")
    assert raw.cmd(b"d", f'LOGIN "{addr}" "{PASSWORD}"'.encode())[-1].startswith(b"d OK")
    raw.send(b"e APPEND INBOX {30000000}\r\n")
    reply = raw.line()
    assert reply.startswith(b"e NO [TOOBIG]"), reply
    assert raw.cmd(b"f", b"SELECT INBOX")[-1].startswith(b"f OK")
    assert raw.cmd(b"g", b"SEARCH {-1}")[-1].startswith(b"g BAD")
    # LITERAL+: data follows at once, without waiting for "+".
    msg = b"Subject: lp\r\n\r\nliteral plus\r\n"
    raw.send(b"h APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\n")
    assert raw.until(b"h")[-1].startswith(b"h OK [APPENDUID")
    raw.close()


def test_nesting_and_long_lines(server, addr):
    raw = Raw(server.ports["imap"])
    start = time.monotonic()
    assert raw.cmd(b"a", b"LOGIN " + b"(" * 10_000 + b")" * 10_000)[-1].startswith(b"a BAD")
    assert raw.cmd(b"b", f'LOGIN "{addr}" "{PASSWORD}"'.encode())[-1].startswith(b"b OK")
    assert raw.cmd(b"c", b"SELECT INBOX")[-1].startswith(b"c OK")
    assert raw.cmd(b"d", b"SEARCH " + b"(" * 10_000 + b"ALL" + b")" * 10_000)[-1].startswith(b"d BAD")
    assert raw.cmd(b"e", b"SEARCH " + b"NOT " * 5000 + b"ALL")[-1].startswith(b"e BAD")
    assert raw.cmd(b"f", b"FETCH 1:* (FLAGS")[-1].startswith(b"f BAD")
    assert raw.cmd(b"g", b"CREATE \"\x00\"")[-1][:4] in (b"g BA", b"g NO")
    assert raw.cmd(b"h", b"NOOP")[-1].startswith(b"h OK")
    assert time.monotonic() - start < 5.0
    raw.send(b"i NOOP " + b"x" * 200_000 + b"\r\n")
    assert raw.line().startswith(b"* BYE")
    raw.close()


def test_stalled_literal_does_not_block_others(server, addr):
    stalled = Raw(server.ports["imap"])
    stalled.send(b"a LOGIN {10}\r\n")
    assert stalled.line().startswith(b"+")
    stalled.send(b"abc")  # and then nothing
    other = Raw(server.ports["imap"])
    start = time.monotonic()
    assert other.cmd(b"x", f'LOGIN "{addr}" "{PASSWORD}"'.encode())[-1].startswith(b"x OK")
    assert other.cmd(b"y", b"LIST \"\" *")[-1].startswith(b"y OK")
    assert time.monotonic() - start < 5.0
    other.close()
    stalled.close()


def test_garbage_before_login_closes_after_many_errors(server):
    raw = Raw(server.ports["imap"])
    for i in range(19):
        assert raw.cmd(b"t%d" % i, b"FROBNICATE")[-1].startswith(b"t%d BAD" % i)
    raw.send(b"t99 FROBNICATE\r\n")
    lines = [raw.line(), raw.line()]
    assert lines[-1].startswith(b"* BYE")
    raw.close()


def test_random_garbage_harms_no_one(server, addr):
    import random
    rnd = random.Random(4)
    alphabet = b' (){}[]"\\*%+-.:<>0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz\x00\x01\x7f\xff'
    words = [b"FETCH", b"UID", b"SEARCH", b"APPEND", b"LIST", b"SELECT", b"STORE", b"{5}", b"{0}", b"{5+}",
             b"BODY[1.2.3.HEADER.FIELDS (A B)]<0.5>", b"NOT", b"OR", b"(", b")", b"*", b"1:*", b"INBOX"]
    for session in range(3):
        raw = Raw(server.ports["imap"])
        raw.cmd(b"a", f'LOGIN "{addr}" "{PASSWORD}"'.encode())
        raw.cmd(b"b", b"SELECT INBOX")
        for i in range(15):
            parts = [rnd.choice(words) if rnd.random() < 0.6 else bytes(rnd.choice(alphabet) for _ in range(rnd.randint(1, 8)))
                     for _ in range(rnd.randint(1, 12))]
            line = b"t%d " % i + b" ".join(parts)
            raw.send(line.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n")
        raw.sock.settimeout(0.5)
        try:
            while raw.line():
                pass
        except (TimeoutError, socket.timeout, ConnectionError, OSError):
            pass
        raw.close()
    m = login(server, addr)  # the server and other sessions are fine
    assert m.select("INBOX")[0] == "OK" and m.noop()[0] == "OK"
    m.logout()
    assert "imap command failed" not in server.logs()  # garbage is BAD/NO, never our own error


# -- real clients ------------------------------------------------------------------------------
def test_mbsync_pulls_byte_exact_copies(server, addr, tmp_path):
    import shutil
    import subprocess
    if not shutil.which("mbsync"):
        pytest.skip("mbsync (Debian package isync) is not installed")
    bodies = [b"Subject: one\r\n\r\n.dot line\r\nFrom here\r\n", b"Subject: two\r\nContent-Type: text/plain; "
              b"charset=iso-8859-1\r\n\r\n\xe9t\xe9\r\n" + b"z" * 998 + b"\r\n"]
    m = login(server, addr)
    for b in bodies:
        m.append("INBOX", None, None, b)
    m.logout()
    maildir = tmp_path / "mail"
    maildir.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""IMAPAccount t
Host 127.0.0.1
Port {server.ports['imaps']}
User {addr}
Pass {PASSWORD}
SSLType IMAPS
CertificateFile {server.data_dir / 'tls' / 'cert.pem'}

IMAPStore remote
Account t

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX

Channel c
Far :remote:
Near :local:
Patterns INBOX
Create Near
Sync Pull
SyncState *
""")
    out = subprocess.run(["mbsync", "-c", str(rc), "c"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    # mbsync adds its own X-TUID header and stores LF line ends locally: undo both.
    got = sorted(re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", p.read_bytes())
                 for p in (maildir / "INBOX" / "new").iterdir())
    assert got == sorted(b.replace(b"\r\n", b"\n") for b in bodies)


def test_orderly_stop_says_bye(strict):
    """Runs last against the strict server: SIGTERM ends sessions with BYE and exit status 0."""
    addr = new_mailbox(strict)
    ctx = _tls_context(strict)
    sessions = []
    for _ in range(2):
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", strict.ports["imaps"]), timeout=10),
                               server_hostname="localhost")
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(f'a LOGIN "{addr}" "{PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        while not f.readline().startswith(b"b OK"):
            pass
        sessions.append((sock, f))
    sessions[1][0].sendall(b"c IDLE\r\n")
    assert sessions[1][1].readline().startswith(b"+")
    assert strict.stop() == 0
    for sock, f in sessions:
        assert f.readline().startswith(b"* BYE")
        sock.close()
