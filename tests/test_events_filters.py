"""Mailgun filter expressions: the parser (AND by space, OR, NOT, quoted phrases, groups,
numeric ranges), and the events API filtering real sends by subject, from, to, tags, size,
attachment, severity and message-id, with 400 for malformed expressions."""
from __future__ import annotations

import time

import pytest

from mailplat.core import eventquery as eq
from mailplat.errors import InputError
from tests.support import wait_for
from tests.test_send_api import api_only_server, make_domain


def test_parser_shapes():
    assert eq.parse("accepted OR delivered", "event") == eq.Or((eq.Term("accepted"), eq.Term("delivered")))
    assert eq.parse("foo bar", "subject") == eq.And((eq.Term("foo"), eq.Term("bar")))
    assert eq.parse("a AND b", "tags") == eq.And((eq.Term("a"), eq.Term("b")))
    assert eq.parse('"hello world"', "subject") == eq.Term("hello world")
    assert eq.parse("NOT x", "subject") == eq.Not(eq.Term("x"))
    assert eq.parse(">1000 <5000", "size") == eq.And((eq.Term("1000", ">"), eq.Term("5000", "<")))
    assert eq.parse("(a OR b) c", "subject") == eq.And((eq.Or((eq.Term("a"), eq.Term("b"))), eq.Term("c")))
    # AND binds tighter than OR
    assert eq.parse("a b OR c", "subject") == eq.Or((eq.And((eq.Term("a"), eq.Term("b"))), eq.Term("c")))
    assert eq.plain_values(eq.parse("a OR b", "event")) == ["a", "b"]
    assert eq.plain_values(eq.parse("NOT a", "event")) is None


@pytest.mark.parametrize("text,field", [('"open', "subject"), ("(a OR b", "subject"), ("a)", "subject"),
                                         ("big", "size"), ("", "subject"), ("NOT", "subject"), ("a OR", "event")])
def test_parser_rejects(text, field):
    with pytest.raises(InputError):
        eq.parse(text, field)


def test_matching():
    data = {"event": "failed", "severity": "permanent", "recipient": "bob@x.test", "tags": ["News", "weekly"],
            "message": {"headers": {"subject": "Hello big world", "from": "Ann <ann@a.test>", "to": "bob@x.test",
                                    "message-id": "m1@a.test"},
                        "attachments": [{"filename": "report.pdf"}], "size": 2048}}

    def ok(**f):
        trees = eq.compile_filters(f)
        return eq.python_filter(trees, set())(data)
    assert ok(subject="hello world") and ok(subject='"big world"') and not ok(subject='"world big"')
    assert ok(subject="NOT spam") and not ok(subject="NOT hello")
    assert ok(tags="news AND weekly") and ok(tags="daily OR weekly") and not ok(tags="news AND daily")
    assert ok(size=">1000 <5000") and not ok(size=">4096") and ok(size="2048")
    assert ok(attachment="report") and not ok(attachment="invoice")
    assert ok(**{"from": "ann@a.test"}) and ok(to="bob") and ok(**{"message-id": "<m1@a.test>"})
    assert ok(event="accepted OR failed", severity="permanent")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from api_only_server(tmp_path_factory, "mailplat-evfilters")


def test_api_filters(server):
    d = make_domain(server, "filters.example.test")

    def send(subject, to, text="x", **kw):
        r = server.api("POST", f"/v3/{d}/messages", data={"from": f"Ann <ann@{d}>", "to": to, "subject": subject,
                                                          "text": text, "o:testmode": "yes", **kw.pop("data", {})},
                       **kw)
        assert r.status_code == 200, r.text
        return r.json()["id"].strip("<>")
    t0 = time.time() - 1
    send("Weekly news digest", "a@x.test", data={"o:tag": ["news", "weekly"]})
    send("Invoice for March", "b@x.test", files={"attachment": ("invoice.pdf", b"%PDF" + b"0" * 5000)})
    big = send("Big one", "c@x.test", text="y" * 20000)

    def q(**params):
        r = server.api("GET", f"/v3/{d}/events", params={"begin": repr(t0), "ascending": "yes", **params})
        assert r.status_code == 200, r.text
        return sorted(i["recipient"] for i in r.json()["items"])
    wait_for(lambda: len(q()) == 3, timeout=10, what="events to settle")
    assert q(subject="news digest") == ["a@x.test"]
    assert q(subject='"March Invoice"') == []
    assert q(subject="NOT news") == ["b@x.test", "c@x.test"]
    assert q(subject="weekly OR invoice") == ["a@x.test", "b@x.test"]
    assert q(attachment="invoice.pdf") == ["b@x.test"]
    assert q(size=">15000") == ["c@x.test"]
    assert q(size=">100 <15000") == ["a@x.test", "b@x.test"]
    assert q(tags="news AND weekly") == ["a@x.test"]
    assert q(to="b@x.test OR c@x.test") == ["b@x.test", "c@x.test"]
    assert q(**{"from": "ann"}) == ["a@x.test", "b@x.test", "c@x.test"]
    assert q(**{"message-id": big}) == ["c@x.test"]
    assert q(event="accepted", recipient="a@x.test OR c@x.test") == ["a@x.test", "c@x.test"]
    for bad in ({"size": "huge"}, {"subject": '"open'}, {"event": "a OR"}):
        r = server.api("GET", f"/v3/{d}/events", params=bad)
        assert r.status_code == 400 and "message" in r.json(), bad
