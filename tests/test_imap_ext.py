"""IMAP extensions over real sockets with imaplib: ESEARCH (RFC 4731) and SEARCHRES (RFC 5182),
including their error cases."""
from __future__ import annotations

import imaplib
import re

import pytest

from tests.test_imap import login, new_mailbox


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
    assert {"ESEARCH", "SEARCHRES"} <= set(m.capability()[1][0].decode().split())
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
