"""IMAP extensions over real sockets with imaplib, each with its error cases: ESEARCH (RFC 4731),
SEARCHRES (RFC 5182), LIST-EXTENDED (RFC 5258) with LIST-STATUS (RFC 5819) and the SPECIAL-USE
options (RFC 6154), MULTIAPPEND (RFC 3502, all or nothing), RENAME INBOX (RFC 3501 6.3.5),
AUTHENTICATE LOGIN beside PLAIN, with and without SASL-IR (RFC 4959), BINARY (RFC 3516),
UTF8=ACCEPT (RFC 6855), QRESYNC (RFC 7162), COMPRESS=DEFLATE (RFC 4978), SORT (RFC 5256, 5957),
CREATE-SPECIAL-USE (RFC 6154), STATUS=SIZE (RFC 8438), WITHIN (RFC 5032), THREAD (RFC 5256)."""
from __future__ import annotations

import base64
import imaplib
import re
import zlib

import pytest

from tests.support import init_data_dir, serve
from tests.test_imap import PASSWORD, Raw, login, new_mailbox


@pytest.fixture
def addr(server):
    return new_mailbox(server)


def cmd(m: imaplib.IMAP4, name: str, *args: str) -> tuple[str, list]:
    """One command; returns (status, tagged text) without raising on NO/BAD."""
    try:
        typ, data = m._simple_command(name, *args)
    except m.error as exc:  # BAD
        return "BAD", [str(exc).encode()]
    return typ, data


def untagged(m: imaplib.IMAP4, name: str) -> list[bytes]:
    return m.untagged_responses.pop(name, [])


def fill(m: imaplib.IMAP4, n: int) -> None:
    for i in range(1, n + 1):
        m.append("INBOX", r"(\Seen)" if i % 2 == 0 else None, None,
                 f"From: f{i}@far.test\r\nSubject: note {i}\r\n\r\nbody {i}\r\n".encode())


def test_esearch_return_options(server, addr):
    m = login(server, addr)
    assert {"ESEARCH", "SEARCHRES", "LIST-EXTENDED", "LIST-STATUS"} <= set(m.capability()[1][0].decode().split())
    fill(m, 5)
    m.select("INBOX")
    typ, _ = cmd(m, "SEARCH", "RETURN", "(MIN MAX COUNT)", "UNSEEN")
    assert typ == "OK"
    [line] = untagged(m, "ESEARCH")
    assert re.fullmatch(rb'\(TAG "\w+"\) MIN 1 MAX 5 COUNT 3', line), line
    assert untagged(m, "SEARCH") == []  # ESEARCH replaces SEARCH
    cmd(m, "SEARCH", "RETURN", "()", "ALL")  # () means ALL, as a compact set
    assert untagged(m, "ESEARCH")[0].endswith(b") ALL 1:5")
    m.store("3", "+FLAGS", r"(\Deleted)")
    m.expunge()
    cmd(m, "UID", "SEARCH", "RETURN", "(ALL MIN)", "ALL")
    assert re.fullmatch(rb'\(TAG "\w+"\) UID MIN 1 ALL 1:2,4:5', untagged(m, "ESEARCH")[0])
    cmd(m, "SEARCH", "RETURN", "(MIN MAX ALL COUNT)", "SUBJECT", "nothing-like-this")
    assert re.fullmatch(rb'\(TAG "\w+"\) COUNT 0', untagged(m, "ESEARCH")[0])  # no MIN/MAX/ALL
    # CONDSTORE: the highest modseq of the returned messages
    cmd(m, "STORE", "2", "+FLAGS.SILENT", r"(\Flagged)")
    untagged(m, "FETCH")
    typ, _ = cmd(m, "FETCH", "1:*", "(MODSEQ)")
    modseqs = [int(re.search(rb"MODSEQ \((\d+)\)", x).group(1)) for x in untagged(m, "FETCH")]
    cmd(m, "SEARCH", "RETURN", "(COUNT)", "MODSEQ", "1")
    assert untagged(m, "ESEARCH")[0].endswith(b" COUNT 4 MODSEQ %d" % max(modseqs))
    # errors: unknown option, missing list
    assert cmd(m, "SEARCH", "RETURN", "(FIRST)", "ALL")[0] == "BAD"
    assert cmd(m, "SEARCH", "RETURN", "ALL")[0] == "BAD"
    assert cmd(m, "SEARCH", "RETURN", "(ALL)")[0] == "BAD"  # no search key
    assert cmd(m, "NOOP")[0] == "OK"
    m.logout()


def test_searchres_saves_and_reuses(server, addr):
    m = login(server, addr)
    fill(m, 6)
    assert m.create("Kept")[0] == "OK"
    m.select("INBOX")
    typ, _ = cmd(m, "SEARCH", "RETURN", "(SAVE)", "UNSEEN")
    assert typ == "OK" and untagged(m, "ESEARCH") == [] and untagged(m, "SEARCH") == []
    typ, data = m.fetch("$", "(UID)")
    assert [re.search(rb"UID (\d+)", x).group(1) for x in data] == [b"1", b"3", b"5"]
    assert m.uid("SEARCH", None, "$", "SUBJECT", "note")[1] == [b"1 3 5"]  # "$" as a search key
    assert m.search(None, "NOT", "UID", "$")[1] == [b"2 4 6"]
    typ, data = m.uid("COPY", "$", "Kept")
    assert typ == "OK"
    # SAVE with MIN and MAX keeps only those two; the ESEARCH answer still comes
    cmd(m, "UID", "SEARCH", "RETURN", "(SAVE MIN MAX)", "SEEN")
    assert re.fullmatch(rb'\(TAG "\w+"\) UID MIN 2 MAX 6', untagged(m, "ESEARCH")[0])
    assert m.search(None, "$")[1] == [b"2 6"]
    # expunged messages leave "$"; sequence numbers follow
    m.store("2", "+FLAGS", r"(\Deleted)")
    m.expunge()
    typ, data = m.fetch("$", "(UID)")
    assert [re.search(rb"(\d+) \(UID (\d+)", x).groups() for x in data] == [(b"5", b"6")]
    # a failed SEARCH ... SAVE empties "$"; an empty "$" matches nothing and is no error
    assert cmd(m, "SEARCH", "RETURN", "(SAVE)", "CHARSET", "KOI8-R", "ALL")[0] == "NO"
    assert m.search(None, "$")[1] == [b""]
    typ, data = m.fetch("$", "(UID)")
    assert typ == "OK" and data == [None]
    cmd(m, "SEARCH", "RETURN", "(SAVE)", "ALL")
    assert cmd(m, "SEARCH", "RETURN", "(SAVE)", "NOSUCHKEY")[0] == "BAD"
    assert m.search(None, "$")[1] == [b""]
    # "$" is a whole sequence set, not a part of one; and is empty after a new SELECT
    cmd(m, "SEARCH", "RETURN", "(SAVE)", "ALL")
    assert cmd(m, "FETCH", "$,1", "(UID)")[0] == "BAD"
    m.select("INBOX")
    assert m.search(None, "$")[1] == [b""]
    m.select("Kept")
    assert m.search(None, "ALL")[1] == [b"1 2 3"]
    m.logout()


def test_list_extended_and_list_status(server, addr):
    m = login(server, addr)
    for name in ("Work", "Work/Alpha", "Work/Beta", "Work/Beta/Deep"):
        assert m.create(name)[0] == "OK"
    for name in ("Work", "Work/Beta"):
        assert m.unsubscribe(name)[0] == "OK"
    m.append("Work/Alpha", None, None, b"Subject: a\r\n\r\nx\r\n")
    m.append("Work/Alpha", r"(\Seen)", None, b"Subject: b\r\n\r\nx\r\n")

    def listing(*args: str) -> list[bytes]:
        typ, _ = cmd(m, "LIST", *args)
        assert typ == "OK"
        return untagged(m, "LIST")

    # several patterns, each name once; INBOX in any case
    assert listing('""', '("inbox" "Work/%" "Work/*")') == [
        b'(\\HasNoChildren) "/" "INBOX"', b'(\\HasNoChildren) "/" "Work/Alpha"',
        b'(\\HasChildren) "/" "Work/Beta"', b'(\\HasNoChildren) "/" "Work/Beta/Deep"']
    # SUBSCRIBED selection: \Subscribed shown, unsubscribed left out
    lines = listing("(SUBSCRIBED)", '""', '"Work*"')
    assert lines == [b'(\\HasNoChildren \\Subscribed) "/" "Work/Alpha"',
                     b'(\\HasNoChildren \\Subscribed) "/" "Work/Beta/Deep"']
    # RECURSIVEMATCH: unsubscribed parents of subscribed mailboxes, with CHILDINFO
    lines = listing("(SUBSCRIBED RECURSIVEMATCH)", '""', '"Work/%"')
    assert lines == [b'(\\HasNoChildren \\Subscribed) "/" "Work/Alpha"',
                     b'(\\HasChildren) "/" "Work/Beta" ("CHILDINFO" ("SUBSCRIBED"))']
    # RETURN (SUBSCRIBED CHILDREN) on a plain LIST
    lines = listing('""', '"Work"', "RETURN", "(SUBSCRIBED CHILDREN)")
    assert lines == [b'(\\HasChildren) "/" "Work"']
    # SPECIAL-USE as selection and return option
    lines = listing("(SPECIAL-USE)", '""', '"*"', "RETURN", "(SPECIAL-USE)")
    assert sorted(lines) == sorted(b'(\\HasNoChildren \\%s) "/" "%s"' % (u, n) for n, u in (
        (b"Sent", b"Sent"), (b"Drafts", b"Drafts"), (b"Trash", b"Trash"), (b"Junk", b"Junk"),
        (b"Archive", b"Archive")))
    # LIST-STATUS: a STATUS right after each listed mailbox's LIST
    typ, _ = cmd(m, "LIST", '""', '"Work/A%"', "RETURN", "(STATUS (MESSAGES UNSEEN UIDNEXT))")
    assert typ == "OK"
    assert untagged(m, "LIST") == [b'(\\HasNoChildren) "/" "Work/Alpha"']
    assert untagged(m, "STATUS") == [b'"Work/Alpha" (MESSAGES 2 UNSEEN 1 UIDNEXT 3)']
    raw = Raw(server.ports["imap"])  # the order on the wire: each STATUS follows its LIST
    assert raw.cmd(b"a", b'LOGIN "%s" "%s"' % (addr.encode(), PASSWORD.encode()))[-1].startswith(b"a OK")
    out = raw.cmd(b"b", b'LIST "" "Work/*" RETURN (STATUS (MESSAGES))')
    assert [x.split(b" ")[1] + b" " + x.rstrip().split(b'"')[-2] for x in out[:-1]] == [
        b"LIST Work/Alpha", b"STATUS Work/Alpha", b"LIST Work/Beta", b"STATUS Work/Beta",
        b"LIST Work/Beta/Deep", b"STATUS Work/Beta/Deep"]
    raw.close()
    m.select("INBOX")  # also in the selected state
    typ, _ = cmd(m, "LIST", "(SUBSCRIBED)", '""', '"INBOX"', "RETURN", "(STATUS (MESSAGES) CHILDREN)")
    assert typ == "OK" and untagged(m, "STATUS") == [b'"INBOX" (MESSAGES 0)']
    assert untagged(m, "LIST") == [b'(\\HasNoChildren \\Subscribed) "/" "INBOX"']
    # errors
    for bad in (("(RECURSIVEMATCH)", '""', '"*"'), ("(REMOTE RECURSIVEMATCH)", '""', '"*"'),
                ("(NOSUCH)", '""', '"*"'), ('""', '"*"', "RETURN", "(NOSUCH)"),
                ('""', '"*"', "RETURN", "(STATUS (BOGUS))"), ('""', '"*"', "RETURN", "(STATUS)"),
                ('""', '"*"', "RETURN", "SUBSCRIBED"), ('""', "()"), ("(SUBSCRIBED)", '""')):
        assert cmd(m, "LIST", *bad)[0] == "BAD", bad
    assert listing("(REMOTE)", '""', '"Work"') == [b'(\\HasChildren) "/" "Work"']
    assert listing('""', '""') == [b'(\\Noselect) "/" ""']
    m.logout()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A server whose new mailboxes hold 3000 bytes."""
    data_dir = tmp_path_factory.mktemp("small")
    key = init_data_dir(data_dir, sets=["mailaccess.quota_bytes=3000"])
    srv = serve(data_dir, key, ["api", "mailaccess"])
    yield srv
    srv.stop()


def raw_login(server, addr) -> Raw:
    raw = Raw(server.ports["imap"])
    assert raw.cmd(b"a", b'LOGIN "%s" "%s"' % (addr.encode(), PASSWORD.encode()))[-1].startswith(b"a OK")
    return raw


def msg(n: int, size: int = 0) -> bytes:
    return b"Subject: multi %d\r\n\r\n" % n + b"x" * size + b"body\r\n"


def count(m: imaplib.IMAP4, folder: str) -> int:
    typ, data = m.status(folder, "(MESSAGES)")
    return int(re.search(rb"MESSAGES (\d+)", data[0]).group(1))


def test_multiappend_all_or_nothing(server, addr, small):
    raw = raw_login(server, addr)
    one, two, three = msg(1), msg(2), msg(3)
    out = raw.cmd(b"b", b'APPEND INBOX (\\Seen) {%d+}\r\n%s {%d+}\r\n%s (\\Flagged $Work) '
                  b'"05-Mar-2021 10:00:00 +0100" {%d+}\r\n%s' % (len(one), one, len(two), two, len(three), three))
    validity, uids = re.match(rb"b OK \[APPENDUID (\d+) ([\d:,]+)\]", out[-1]).groups()
    assert uids == b"1:3"
    # synchronising literals: a continuation for each message
    raw.send(b"c APPEND INBOX {%d}\r\n" % len(one))
    assert raw.line().startswith(b"+ ")
    raw.send(one + b" {%d}\r\n" % len(two))
    assert raw.line().startswith(b"+ ")
    raw.send(two + b"\r\n")
    assert raw.until(b"c")[-1].startswith(b"c OK [APPENDUID %s 4:5]" % validity)
    m = login(server, addr)
    m.select("INBOX")
    typ, data = m.fetch("1:5", "(FLAGS INTERNALDATE BODY.PEEK[])")
    heads = [d[0] for d in data if isinstance(d, tuple)]
    assert [d[1] for d in data if isinstance(d, tuple)] == [one, two, three, one, two]
    assert b"\\Seen" in heads[0] and b"\\Seen" not in heads[1]
    assert b"\\Flagged $Work" in heads[2] and b'"05-Mar-2021 09:00:00 +0000"' in heads[2]

    # failures store nothing: an empty message, a bad flag, a dangling flag list, a bad date
    for tag, line in ((b"d", b"APPEND INBOX {%d+}\r\n%s {0+}\r\n" % (len(one), one)),
                      (b"e", b"APPEND INBOX {%d+}\r\n%s (\\Bogus) {%d+}\r\n%s" % (len(one), one, len(two), two)),
                      (b"f", b"APPEND INBOX {%d+}\r\n%s (\\Seen)" % (len(one), one)),
                      (b"g", b"APPEND INBOX {%d+}\r\n%s \"99-Foo-2021 10:00:00 +0100\" {%d+}\r\n%s"
                       % (len(one), one, len(two), two)),
                      (b"h", b"APPEND INBOX (\\Seen) (\\Seen) {%d+}\r\n%s" % (len(one), one))):
        answer = raw.cmd(tag, line)[-1]
        assert answer.startswith((tag + b" NO", tag + b" BAD")), answer
    assert raw.cmd(b"i", b"APPEND Nowhere {%d+}\r\n%s {%d+}\r\n%s" % (len(one), one, len(two), two))[-1] \
        .startswith(b"i NO [TRYCREATE]")
    assert count(m, "INBOX") == 5
    # a message over APPENDLIMIT is refused at its announcement, before any data
    raw.send(b"j APPEND INBOX {%d}\r\n%s {30000000}\r\n" % (len(one), one))
    assert raw.line().startswith(b"+ ")
    assert raw.line().startswith(b"j NO [TOOBIG]")
    assert raw.cmd(b"k", b"NOOP")[-1].startswith(b"k OK")
    raw.close()
    m.logout()

    # over quota in the middle: none of them is filed
    small_addr = new_mailbox(small)
    raw = raw_login(small, small_addr)
    big = msg(4, 1200)
    assert raw.cmd(b"b", b"APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s" % (len(big), big, len(big), big))[-1] \
        .startswith(b"b OK [APPENDUID")
    answer = raw.cmd(b"c", b"APPEND Sent {%d+}\r\n%s {%d+}\r\n%s" % (len(one), one, len(big), big))[-1]
    assert answer.startswith(b"c NO [OVERQUOTA]"), answer
    m = login(small, small_addr)
    assert count(m, "Sent") == 0 and count(m, "INBOX") == 2
    typ, data = m.getquotaroot("INBOX")
    assert int(re.search(rb"STORAGE (\d+)", data[1][0]).group(1)) == (2 * len(big) + 1023) // 1024
    m.logout()
    raw.close()


def test_rename_inbox_moves_its_messages(server, addr):
    m = login(server, addr)
    for i in range(2):
        m.append("INBOX", r"(\Flagged)" if i else None, None, msg(i))
    assert m.create("INBOX/Sub")[0] == "OK"
    m.append("INBOX/Sub", None, None, msg(9))
    watcher = login(server, addr)
    watcher.select("INBOX")
    typ, data = m.rename("INBOX", "Old/Mail")
    assert typ == "OK", data
    # the messages moved, flags and bytes kept; INBOX stays, empty; INBOX/Sub is not renamed
    m.select("Old/Mail")
    typ, data = m.fetch("1:*", "(UID FLAGS BODY.PEEK[])")
    assert [d[1] for d in data if isinstance(d, tuple)] == [msg(0), msg(1)]
    assert b"\\Flagged" in [d[0] for d in data if isinstance(d, tuple)][1]
    assert count(m, "INBOX") == 0 and count(m, "INBOX/Sub") == 1
    assert b'"Old"' in b"".join(m.list('""', "Old")[1])  # its parent was made
    # a session with INBOX selected hears of the expunges
    assert watcher.noop()[0] == "OK"
    assert len(watcher.untagged_responses.pop("EXPUNGE", [])) == 2
    # INBOX keeps its UIDVALIDITY and never reuses a UID
    m.append("INBOX", None, None, msg(3))
    watcher.noop()
    assert watcher.uid("SEARCH", None, "ALL")[1] == [b"3"]
    watcher.logout()
    # errors: the target exists, renaming to INBOX, an invalid name
    assert m.rename("INBOX", "Old/Mail")[0] == "NO"
    assert m.rename("INBOX", "Sent")[0] == "NO"
    assert m.rename("Old/Mail", "INBOX")[0] == "NO"
    assert m.rename("Old/Mail", "inbox")[0] == "NO"
    assert m.rename("INBOX", "a/../b")[0] == "NO"
    assert count(m, "INBOX") == 1 and count(m, "Sent") == 0 and count(m, "Old/Mail") == 2
    m.logout()


def test_authenticate_login_and_plain(server, addr):
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    assert {"AUTH=PLAIN", "AUTH=LOGIN"} <= set(m.capabilities)
    asked = []

    def answer(challenge: bytes) -> str:
        asked.append(challenge)
        return {b"Username:": addr, b"Password:": PASSWORD}[challenge]

    assert m.authenticate("LOGIN", answer)[0] == "OK"
    assert asked == [b"Username:", b"Password:"] and m.select("INBOX")[0] == "OK"
    m.logout()

    def b64(text: str) -> bytes:
        return base64.b64encode(text.encode())

    raw = Raw(server.ports["imap"])
    # SASL-IR: the user name comes with the command, the password after one challenge
    out = raw.cmd(b"a", b"AUTHENTICATE LOGIN " + b64(addr) + b"\r\n" + b64("wrong password"))
    assert out[0] == b"+ " + b64("Password:") + b"\r\n" and out[-1].startswith(b"a NO [AUTHENTICATIONFAILED]")
    raw.send(b"b AUTHENTICATE LOGIN\r\n")
    assert raw.line() == b"+ " + b64("Username:") + b"\r\n"
    raw.send(b"*\r\n")  # cancels
    assert raw.until(b"b")[-1].startswith(b"b BAD")
    assert raw.cmd(b"c", b"AUTHENTICATE LOGIN %%%%")[-1].startswith(b"c BAD")  # not base64
    assert raw.cmd(b"d", b"AUTHENTICATE PLAIN =")[-1].startswith(b"d BAD")  # empty is no PLAIN answer
    assert raw.cmd(b"e", b"AUTHENTICATE CRAM-MD5")[-1].startswith(b"e NO")
    assert raw.cmd(b"f", b"NOOP")[-1].startswith(b"f OK")
    out = raw.cmd(b"g", b"AUTHENTICATE PLAIN " + base64.b64encode(b"\0" + addr.encode() + b"\0" + PASSWORD.encode()))
    assert out[-1].startswith(b"g OK")
    assert raw.cmd(b"h", b"AUTHENTICATE LOGIN")[-1].startswith(b"h BAD")  # already logged in
    raw.close()


BLOB = bytes(range(256)) * 3  # every octet, NUL included


def test_binary_fetch_and_literal8_append(server, addr):
    qp_text = "caf\u00e9 = \u20ac".encode()
    message = (b"Subject: bin\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
               b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               + base64.encodebytes(BLOB).replace(b"\n", b"\r\n")
               + b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
               b"caf=C3=A9 =3D =E2=82=AC=\r\n\r\n"
               b"--b1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n"
               b"--b1--\r\n")
    m = login(server, addr)
    assert "BINARY" in m.capability()[1][0].decode().split()
    m.append("INBOX", None, None, message)
    m.select("INBOX")
    typ, data = m.fetch("1", "(BINARY.PEEK[1] BINARY.SIZE[1] BINARY.SIZE[2] BINARY.PEEK[2]<0.4>)")
    assert typ == "OK"
    head, body = data[0][0], data[0][1]
    assert head.endswith(b"BINARY[1] ~{%d}" % len(BLOB)) and body == BLOB  # NUL inside: a literal8
    rest = b"".join(x if isinstance(x, bytes) else x[0] + x[1] for x in data[1:])
    assert b"BINARY.SIZE[1] %d" % len(BLOB) in rest and b"BINARY.SIZE[2] %d" % len(qp_text) in rest
    assert qp_text[:4] in [x[1] for x in data[1:] if isinstance(x, tuple)]
    assert b"\\Seen" not in m.fetch("1", "(FLAGS)")[1][0]  # .PEEK and .SIZE leave \Seen alone
    typ, data = m.fetch("1", "(BINARY[] BINARY.SIZE[])")
    assert data[0][1] == message and b"BINARY.SIZE[] %d" % len(message) in data[1]
    assert b"\\Seen" in m.fetch("1", "(FLAGS)")[1][0]
    # errors: an encoding we cannot undo, bad sections
    typ, data = cmd(m, "FETCH", "1", "(BINARY.PEEK[3])")
    assert typ == "NO" and b"UNKNOWN-CTE" in data[0]
    for bad in ("(BINARY.SIZE[1]<0.5>)", "(BINARY[HEADER])", "(BINARY[0])", "(BINARY[1.TEXT])", "(BINARY[1)"):
        assert cmd(m, "FETCH", "1", bad)[0] == "BAD", bad
    # APPEND with a literal8: the octets are kept as sent, NUL and all
    raw = raw_login(server, addr)
    out = raw.cmd(b"b", b"APPEND INBOX ~{%d+}\r\n%s" % (len(BLOB), BLOB))
    assert out[-1].startswith(b"b OK [APPENDUID"), out
    out = raw.cmd(b"c", b"APPEND INBOX (\\Seen) ~{%d+}\r\n%s ~{%d+}\r\n%s" % (len(BLOB), BLOB, len(message), message))
    assert out[-1].startswith(b"c OK [APPENDUID"), out
    assert raw.cmd(b"d", b"APPEND INBOX ~ (\\Seen)")[-1].startswith(b"d BAD")
    raw.close()
    typ, data = m.fetch("2:4", "(BINARY.PEEK[])")
    assert [x[1] for x in data if isinstance(x, tuple)] == [BLOB, BLOB, message]
    m.logout()


def test_utf8_accept(server, addr):
    old = login(server, addr)  # never enables UTF8=ACCEPT: modified UTF-7 throughout
    assert old.create("Caf&AOk-")[0] == "OK"
    m = login(server, addr)
    assert "UTF8=ACCEPT" in m.capability()[1][0].decode().split()
    typ, _ = m.enable("UTF8=ACCEPT")  # imaplib then sends commands as UTF-8
    assert typ == "OK" and untagged(m, "ENABLED") == [b"UTF8=ACCEPT"]
    assert m.list('""', '"Caf*"')[1] == ['(\\HasNoChildren) "/" "Café"'.encode()]
    assert m.create('"Reçus/A&B"')[0] == "OK"
    assert old.list('""', '"Re*"')[1] == [b'(\\HasChildren) "/" "Re&AOc-us"',
                                          b'(\\HasNoChildren) "/" "Re&AOc-us/A&-B"']
    typ, data = m.status('"Reçus/A&B"', "(MESSAGES)")
    assert data == ['"Reçus/A&B" (MESSAGES 0)'.encode()]
    typ, data = cmd(m, "LIST", '""', '"Re%"', "RETURN", "(STATUS (UIDNEXT))")
    assert untagged(m, "STATUS") == ['"Reçus" (UIDNEXT 1)'.encode()] and untagged(m, "LIST")
    # APPEND ... UTF8 (~{n}) with a raw UTF-8 header (RFC 6532), then search in UTF-8
    message = "Subject: été à Zürich\r\nFrom: zoé@exemple.test\r\n\r\nbonjour\r\n".encode()
    raw = raw_login(server, addr)
    assert raw.cmd(b"a", b"ENABLE UTF8=ACCEPT")[-1].startswith(b"a OK")
    out = raw.cmd(b"b", b'APPEND "Caf\xc3\xa9" (\\Seen) UTF8 (~{%d+}\r\n%s)' % (len(message), message))
    assert out[-1].startswith(b"b OK [APPENDUID"), out
    assert raw.cmd(b"c", b'SELECT "Caf\xc3\xa9"')[-1].startswith(b"c OK")
    assert raw.cmd(b"d", b'SEARCH SUBJECT "Z\xc3\xbcrich"')[0] == b"* SEARCH 1\r\n"
    assert raw.cmd(b"e", b"SEARCH CHARSET UTF-8 ALL")[-1].startswith(b"e BAD")  # no CHARSET after ENABLE
    assert raw.cmd(b"f", b'CREATE "\xff\xfe"')[-1].startswith(b"f NO")  # not UTF-8
    assert raw.cmd(b"g", b'CREATE "Caf&AOk-"')[-1].startswith(b"g OK")  # taken as it is, no UTF-7
    raw.close()
    assert b'"Caf&-AOk-"' in b"".join(old.list('""', '"Caf*"')[1])
    old.select("Caf&AOk-")
    typ, data = old.fetch("1", "(BODY.PEEK[] ENVELOPE)")
    literals = [x[1] for x in data if isinstance(x, tuple)]
    assert message in literals and "été à Zürich".encode() in literals  # ENVELOPE: the octets as stored
    # a session that did not enable it: no UTF8 (...) APPEND, names still modified UTF-7
    raw = raw_login(server, addr)
    assert raw.cmd(b"h", b"APPEND INBOX UTF8 (~{%d+}\r\n%s)" % (len(message), message))[-1].startswith(b"h BAD")
    assert raw.cmd(b"i", b'CREATE "Caf\xc3\xa9x"')[-1].startswith(b"i NO")
    raw.close()
    m.logout()
    old.logout()


def test_qresync(server, addr):
    other = login(server, addr)
    for i in range(1, 6):
        other.append("INBOX", None, None, msg(i))
    m = login(server, addr)
    assert "QRESYNC" in m.capability()[1][0].decode().split()
    assert cmd(m, "SELECT", "INBOX", "(QRESYNC (1 1))")[0] == "BAD"  # not enabled yet
    typ, _ = cmd(m, "ENABLE", "QRESYNC")
    assert typ == "OK" and untagged(m, "ENABLED") == [b"QRESYNC"]
    m.select("INBOX")
    validity = int(untagged(m, "UIDVALIDITY")[0])
    [modseq] = [int(re.search(rb"HIGHESTMODSEQ (\d+)", x).group(1)) for x in untagged(m, "OK") if b"HIGHESTMODSEQ" in x]
    m.unselect()
    # meanwhile: message 2 flagged, message 3 expunged
    other.select("INBOX")
    other.store("2", "+FLAGS", r"(\Flagged)")
    other.store("3", "+FLAGS", r"(\Deleted)")
    other.expunge()

    def resync(params: str) -> tuple[list, list]:
        typ, data = cmd(m, "SELECT", "INBOX", f"(QRESYNC ({params}))")
        assert typ == "OK", data
        m.state = "SELECTED"  # imaplib's own bookkeeping
        return untagged(m, "VANISHED"), untagged(m, "FETCH")

    vanished, fetches = resync(f"{validity} {modseq}")
    assert vanished == [b"(EARLIER) 3"]
    assert len(fetches) == 1 and re.fullmatch(rb"2 \(UID 2 FLAGS \(\\Flagged\) MODSEQ \(\d+\)\)", fetches[0])
    assert untagged(m, "OK") and b"[CLOSED]" not in b"".join(untagged(m, "OK"))
    vanished, fetches = resync(f"{validity} {modseq} 1,4:5")  # known UIDs narrow both
    assert vanished == [] and fetches == []
    untagged(m, "OK")
    vanished, fetches = resync(f"{validity} {modseq} 1:* (1:3 1,2,4)")  # with sequence match data
    assert vanished == [b"(EARLIER) 3"] and len(fetches) == 1
    assert any(b"[CLOSED]" in x for x in untagged(m, "OK"))  # the previous SELECT was closed
    vanished, fetches = resync(f"{validity + 1} {modseq}")  # another UIDVALIDITY: a plain SELECT
    assert vanished == [] and fetches == []
    [now] = [int(re.search(rb"HIGHESTMODSEQ (\d+)", x).group(1)) for x in untagged(m, "OK") if b"HIGHESTMODSEQ" in x]
    vanished, fetches = resync(f"{validity} {now}")  # up to date: nothing to say
    assert vanished == [] and fetches == []
    # live: VANISHED instead of EXPUNGE, for others' expunges and for our own
    other.store("4", "+FLAGS", r"(\Deleted)")  # UID 5 at sequence 4
    other.expunge()
    assert m.noop()[0] == "OK"
    assert untagged(m, "VANISHED") == [b"5"] and untagged(m, "EXPUNGE") == []
    m.store("1", "+FLAGS.SILENT", r"(\Deleted)")
    typ, data = cmd(m, "EXPUNGE")
    assert untagged(m, "VANISHED") == [b"1"] and untagged(m, "EXPUNGE") == []
    assert typ == "OK" and re.match(rb"\[HIGHESTMODSEQ \d+\]", data[-1])
    # UID FETCH (CHANGEDSINCE n VANISHED)
    typ, _ = cmd(m, "UID", "FETCH", "1:*", "(FLAGS)", f"(CHANGEDSINCE {modseq} VANISHED)")
    assert typ == "OK" and untagged(m, "VANISHED") == [b"(EARLIER) 1,3,5"]
    assert [re.search(rb"UID (\d+)", x).group(1) for x in untagged(m, "FETCH")] == [b"2"]
    # errors
    for bad in (("FETCH", "1:*", "(FLAGS)", f"(CHANGEDSINCE {modseq} VANISHED)"),  # not UID FETCH
                ("UID", "FETCH", "1:*", "(FLAGS)", "(VANISHED)"),  # no CHANGEDSINCE
                ("UID", "FETCH", "1:*", "(FLAGS)", "(NOSUCH 1)"),
                ("SELECT", "INBOX", "(QRESYNC (0 1))"), ("SELECT", "INBOX", "(QRESYNC (1))"),
                ("SELECT", "INBOX", "(QRESYNC (1 1 1:* (1:2)))"), ("SELECT", "INBOX", "(NOSUCH)")):
        assert cmd(m, *bad)[0] == "BAD", bad
    other.logout()
    plain = login(server, addr)  # without QRESYNC nothing changes: EXPUNGE as before
    plain.select("INBOX")
    plain.store("1", "+FLAGS.SILENT", r"(\Deleted)")
    assert plain.expunge()[1] == [b"1"] and "VANISHED" not in plain.untagged_responses
    plain.logout()
    m.logout()


class Deflated:
    """The client side of COMPRESS DEFLATE over a Raw connection."""

    def __init__(self, raw: Raw):
        self.raw, self.out, self.inf, self.buf = raw, zlib.compressobj(6, zlib.DEFLATED, -15), \
            zlib.decompressobj(-15), b""

    def send(self, data: bytes) -> None:
        self.raw.sock.sendall(self.out.compress(data) + self.out.flush(zlib.Z_SYNC_FLUSH))

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.raw.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += self.inf.decompress(chunk)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self.inf.decompress(self.raw.sock.recv(65536))
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def cmd(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        out = []
        while not out or not out[-1].startswith(tag + b" "):
            out.append(self.line())
        return out


def test_compress_deflate(server, addr):
    big = b"Subject: big\r\n\r\n" + b"".join(b"line %06d of a long message\r\n" % i for i in range(20_000))
    m = login(server, addr)
    m.append("INBOX", None, None, big)
    m.logout()
    raw = Raw(server.ports["imap"])
    assert raw.cmd(b"a", b"COMPRESS DEFLATE")[-1].startswith(b"a BAD")  # not before login
    raw = raw_login(server, addr)
    assert raw.cmd(b"b", b"COMPRESS LZMA")[-1].startswith(b"b BAD")
    assert b"COMPRESS=DEFLATE" in raw.cmd(b"c", b"CAPABILITY")[0]
    assert raw.cmd(b"d", b"COMPRESS DEFLATE")[-1] == b"d OK DEFLATE active\r\n"
    z = Deflated(raw)
    assert z.cmd(b"e", b"COMPRESS DEFLATE")[-1].startswith(b"e NO [COMPRESSIONACTIVE]")
    assert z.cmd(b"f", b"SELECT INBOX")[-1].startswith(b"f OK")
    z.send(b"g FETCH 1 BODY.PEEK[]\r\n")
    head = z.line()
    assert head.endswith(b"{%d}\r\n" % len(big)), head
    assert z.read(len(big)) == big
    assert z.line() == b")\r\n" and z.line().startswith(b"g OK")
    # a literal, compressed like the rest
    out = z.cmd(b"h", b"APPEND INBOX {%d+}\r\n%s" % (len(big), big))
    assert out[-1].startswith(b"h OK [APPENDUID")
    # a compression bomb: 50 MB of one line, a few KB on the wire, ends the session quickly
    z.send(b"i NOOP " + b"x" * 50_000_000)
    assert any(b"BYE" in z.line() for _ in range(3))
    raw.close()
    assert login(server, addr).select("INBOX")[1] == [b"2"]  # the server is fine


def test_sort(server, addr):
    m = login(server, addr)
    assert {"SORT", "SORT=DISPLAY"} <= set(m.capability()[1][0].decode().split())
    messages = [  # (From, To, Subject, Date, padding)
        ('"Zed" <alice@far.test>', "carol@far.test", "Re: [list] banana", "Mon, 03 Jan 2022 10:00:00 +0000", 300),
        ("bob@far.test", '"Abe" <zoe@far.test>', "apple", "Sat, 01 Jan 2022 10:00:00 +0000", 10),
        ("=?utf-8?q?=C3=89mile?= <Eve@far.test>", "bob@far.test", "Fwd: Cherry (fwd)", "garbage", 100),
        ("dave@far.test", "alice@far.test", "[Fwd: APPLE]", "Sun, 02 Jan 2022 23:30:00 -0500", 50),
    ]
    for i, (frm, to, subj, date, pad) in enumerate(messages):
        m.append("INBOX", r"(\Seen)" if i % 2 else None, f'"0{i + 1}-Feb-2022 10:00:00 +0000"',
                 f"From: {frm}\r\nTo: {to}\r\nSubject: {subj}\r\nDate: {date}\r\n\r\n{'x' * pad}\r\n".encode())
    m.select("INBOX")

    def order(criteria: str, *search: str) -> list[int]:
        typ, data = m.sort(criteria, "UTF-8", *(search or ("ALL",)))
        assert typ == "OK", data
        return [int(x) for x in data[0].split()]

    assert order("(SUBJECT)") == [2, 4, 1, 3]  # apple, APPLE (same base: by sequence), banana, cherry
    assert order("(REVERSE SUBJECT)") == [3, 1, 2, 4]  # REVERSE does not reverse the tie-break
    assert order("(FROM)") == [1, 2, 4, 3]  # alice, bob, dave, Eve
    assert order("(DISPLAYFROM)") == [2, 4, 1, 3]  # bob@, dave@, Zed, Émile (octets)
    assert order("(TO)") == [4, 3, 1, 2] and order("(DISPLAYTO)") == [2, 4, 3, 1]  # Abe before alice@
    # DATE: the sent date, the internal date when unreadable (message 3: 03-Feb)
    assert order("(DATE)") == [2, 4, 1, 3] and order("(REVERSE DATE)") == [3, 1, 4, 2]
    assert order("(ARRIVAL)") == [1, 2, 3, 4] and order("(REVERSE SIZE)") == [1, 3, 4, 2]
    assert order("(SUBJECT REVERSE ARRIVAL)") == [4, 2, 1, 3]
    assert order("(SIZE)", "UNSEEN") == [3, 1] and order("(SIZE)", "SUBJECT", "nothing") == []
    typ, data = m.uid("SORT", "(REVERSE ARRIVAL)", "US-ASCII", "ALL")
    assert data == [b"4 3 2 1"]
    # errors
    for bad in (("()", "UTF-8", "ALL"), ("(NOSUCH)", "UTF-8", "ALL"), ("(SIZE REVERSE)", "UTF-8", "ALL"),
                ("(REVERSE REVERSE SIZE)", "UTF-8", "ALL"), ("SIZE", "UTF-8", "ALL"), ("(SIZE)", "UTF-8")):
        assert cmd(m, "SORT", *bad)[0] == "BAD", bad
    typ, data = cmd(m, "SORT", "(SIZE)", "KOI8-R", "ALL")
    assert typ == "NO" and b"BADCHARSET" in data[0]
    m.logout()


def test_create_special_use_and_status_size(server, addr):
    m = login(server, addr)
    assert {"CREATE-SPECIAL-USE", "STATUS=SIZE"} <= set(m.capability()[1][0].decode().split())
    assert cmd(m, "CREATE", "Outbox/Sent Items", "(USE (\\Sent))")[0] == "BAD"  # unquoted name with a space
    assert cmd(m, "CREATE", '"Old Sent/Items"', "(USE (\\sent))")[0] == "OK"
    assert m.list('""', '"Old Sent*"')[1] == [b'(\\HasChildren) "/" "Old Sent"',
                                               b'(\\HasNoChildren \\Sent) "/" "Old Sent/Items"']
    for params, code in (("(USE (\\All))", "NO"), ("(USE (\\Sent \\Junk))", "NO"), ("(USE ())", "NO"),
                         ("(FOO (\\Sent))", "BAD"), ("(USE \\Sent)", "BAD")):
        typ, data = cmd(m, "CREATE", "Nope", params)
        assert typ == code, (params, typ, data)
        assert code == "BAD" or b"[USEATTR]" in data[0]
    assert m.list('""', "Nope")[1] == [None]  # nothing was made
    m.append("INBOX", None, None, msg(1, 100))
    typ, data = m.status("INBOX", "(SIZE MESSAGES)")
    assert data == [b'"INBOX" (SIZE %d MESSAGES 1)' % len(msg(1, 100))]
    m.logout()


def test_within(server, addr):
    m = login(server, addr)
    assert "WITHIN" in m.capability()[1][0].decode().split()
    m.append("INBOX", None, '"01-Jan-2020 00:00:00 +0000"', msg(1))  # long ago
    m.append("INBOX", None, None, msg(2))  # now
    m.select("INBOX")
    assert m.search(None, "YOUNGER", "3600")[1] == [b"2"]
    assert m.search(None, "OLDER", "3600")[1] == [b"1"]
    assert m.search(None, "OR", "OLDER", "3600", "YOUNGER", "60")[1] == [b"1 2"]
    assert cmd(m, "SEARCH", "OLDER", "soon")[0] == "BAD"
    assert cmd(m, "SEARCH", "YOUNGER")[0] == "BAD"
    m.logout()


def test_thread(server, addr):
    m = login(server, addr)
    assert {"THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES"} <= set(m.capability()[1][0].decode().split())
    messages = [  # (Message-ID, reference headers, Subject, day of January 2022)
        ("a", "", "hello", "01 Jan 2022 00:00"),
        ("b", "References: <a@x>", "Re: hello", "02 Jan 2022 00:00"),
        ("c", "In-Reply-To: <a@x>", "Re: hello", "03 Jan 2022 00:00"),
        ("d", "References: <a@x> <b@x>", "Re: hello", "04 Jan 2022 00:00"),
        ("e", "", "other", "01 Jan 2022 12:00"),
        ("f", "References: <missing@x>", "Re: other", "05 Jan 2022 00:00"),  # joins "other" by subject
        ("g", "References: <zz@x>", "lonely", "06 Jan 2022 00:00"),  # two children of an unknown parent
        ("h", "References: <zz@x>", "Re: lonely", "07 Jan 2022 00:00"),
    ]
    for mid, refs, subj, date in messages:
        head = f"Message-ID: <{mid}@x>\r\n" + (refs + "\r\n" if refs else "")
        m.append("INBOX", None, None, f"{head}Subject: {subj}\r\nDate: Sat, {date}:00 +0000\r\n\r\nx\r\n".encode())
    m.select("INBOX")

    def thread(algorithm: str, *search: str) -> bytes:
        typ, data = m.thread(algorithm, "UTF-8", *(search or ("ALL",)))
        assert typ == "OK", data
        return data[0]

    assert thread("REFERENCES") == b"(1 (2 4)(3))(5 6)((7)(8))"
    assert thread("ORDEREDSUBJECT") == b"(1 (2)(3)(4))(5 6)(7 8)"
    # without a: its empty slot holds b and c, dated by b, so after e
    assert thread("REFERENCES", "NOT", "UID", "1") == b"(5 6)((2 4)(3))((7)(8))"
    assert thread("ORDEREDSUBJECT", "SUBJECT", "nothing") in (b"", None)
    typ, data = m.uid("THREAD", "REFERENCES", "UTF-8", "UID", "5:*")
    assert data == [b"(5 6)((7)(8))"]
    # a reply chain longer than Python's recursion limit is no problem (MULTIAPPEND to file it)
    raw = raw_login(server, addr)
    prev = "h"
    for batch in range(8):
        parts = []
        for i in range(batch * 150, batch * 150 + 150):
            body = f"Message-ID: <r{i}@x>\r\nReferences: <{prev}@x>\r\nSubject: Re: lonely\r\n\r\nx\r\n".encode()
            parts.append(b"{%d+}\r\n%s" % (len(body), body))
            prev = f"r{i}"
        assert raw.cmd(b"a", b"APPEND INBOX " + b" ".join(parts))[-1].startswith(b"a OK")
    raw.close()
    m.noop()
    assert thread("REFERENCES", "UID", "7:*").startswith(b"((7)(8 9 10 11")
    for bad in (("NOSUCH", "UTF-8", "ALL"), ("REFERENCES", "UTF-8"), ("(REFERENCES)", "UTF-8", "ALL")):
        assert cmd(m, "THREAD", *bad)[0] == "BAD", bad
    assert cmd(m, "THREAD", "REFERENCES", "KOI8-R", "ALL")[0] == "NO"
    m.logout()
