"""The events API's substring index (event_text: FTS5 trigram on SQLite, pg_trgm GIN on
PostgreSQL; `db_url` runs both): every filter returns, page by page, exactly the events the
Python matcher keeps over all of them, whether the index finds the candidates (rare terms), the
walk tests the text in SQL (PROBE_CAP forced to 0, or a sample of events says the probe would
find more) or the probe leaves out trigrams the sample calls common; for AND/OR/NOT, phrases, case, non-ASCII
and NUL.  Purged events leave the index; migration 0009 backfills older events."""
from __future__ import annotations

import random
import time

import pytest
from playhouse.migrations import Runner

from mailplat.api.views import events as view
from mailplat.core import eventquery, events
from mailplat.core.webhooks import purge_events_sync
from mailplat.store import db as storedb
from mailplat.store.models import Domain, Event, EventText

DOMAIN = "search.example.test"
SUBJECTS = ["Hello World", "hello there", "Invoice #42 ready", "ÄRGER im Büro", "Weekly NEWS digest",
            "news", "a\x00b news", "İstanbul trip", "100% off_sale", 'say "hi" now', "KELVIN \u212a"]
FROMS = ["Ann <ann@a.test>", "Bob <BOB@b.test>", "news@a.test"]
FILES = [[], [{"filename": "report.PDF"}], [{"filename": "a.txt"}, {"filename": "Invoice-42.pdf"}]]
QUERIES = [
    {"subject": "hello"}, {"subject": "HELLO"}, {"subject": '"hello world"'}, {"subject": '"world hello"'},
    {"subject": "NOT hello"}, {"subject": "hello OR invoice"}, {"subject": "hello NOT world"},
    {"subject": "(news OR invoice) NOT weekly"}, {"subject": "ärger"}, {"subject": "büro"},
    {"subject": "istanbul"}, {"subject": "i̇stanbul"}, {"subject": "kelvin k"}, {"subject": "100%"},
    {"subject": "off_sale"}, {"subject": '"say \\"hi\\""'}, {"subject": "ne"}, {"subject": "NOT ne"},
    {"subject": '"a\x00b"'}, {"subject": "NOT \"a\x00b\""}, {"subject": "zzz-nothing"},
    {"from": "bob@b.test"}, {"from": "ann OR bob"}, {"from": "NOT news@"}, {"to": "rcpt-1"},
    {"attachment": "invoice"}, {"attachment": "pdf NOT report"},
    {"subject": "news", "from": "news@"}, {"subject": "hello", "event": "delivered"},
    {"subject": "hello OR news", "tags": "t1"},
]


@pytest.fixture
def store(db_url):
    s = storedb.open_store(db_url)
    yield s
    s.close()


def fill(n: int, seed: int = 5) -> list[dict]:
    rnd = random.Random(seed)
    now = time.time() - 100
    datas = []
    for i in range(n):
        d = {"id": f"ev{seed}x{i}", "event": rnd.choice(["delivered", "failed", "opened"]),
             "timestamp": now - i * 3 - rnd.random(), "recipient": f"rcpt-{i % 7}@r.test",
             "tags": [f"t{i % 3}"],
             "message": {"headers": {"subject": rnd.choice(SUBJECTS) + f" {i}", "from": rnd.choice(FROMS),
                                     "to": f"Rcpt-{i % 7}@r.test", "message-id": f"m{i}@a.test"},
                         "attachments": rnd.choice(FILES), "size": 100 + i},
             "envelope": {"sender": "bounce@a.test"}}
        datas.append(d)
    return datas


def all_pages(f: dict, asc: bool, limit: int = 7) -> list[str]:
    q = {"begin": None, "end": None, "asc": asc, "limit": limit, "f": f}
    got, pos = [], None
    for _ in range(500):
        items, scan_pos = view._page_sync(DOMAIN, q, pos, False, time.time() + 60)
        got += [data["id"] for _, _, data in items]
        if items:
            pos = [items[-1][0], items[-1][1]]
        elif scan_pos is not None:
            pos = scan_pos
        else:
            return got
    raise AssertionError("paging did not end")


def expected(datas: list[dict], f: dict, asc: bool) -> list[str]:
    keep = eventquery.python_filter(eventquery.compile_filters(f), set())
    hits = [d for d in datas if keep(d)]
    return [d["id"] for d in sorted(hits, key=lambda d: d["timestamp"], reverse=not asc)]


def setup_domain(datas: list[dict]) -> None:
    Domain.create(id="searchdom", name=DOMAIN, smtp_login=f"postmaster@{DOMAIN}")
    events.record_many_sync(DOMAIN, datas[: len(datas) // 2])
    for d in datas[len(datas) // 2:]:
        events.record_sync(DOMAIN, d)


def test_index_and_walk_return_what_python_matches(store, monkeypatch):
    datas = fill(160)
    with store.sync():
        setup_domain(datas)
    postgres = store.is_postgres
    used_index = 0
    for f in QUERIES:
        trees = eventquery.compile_filters(f)
        with store.sync():
            if view._candidates(trees, postgres) is not None:
                used_index += 1
            for asc in (False, True):
                want = expected(datas, f, asc)
                assert all_pages(f, asc) == want, (f, asc, "index plan")
                with monkeypatch.context() as m:
                    m.setattr(view, "PROBE_CAP", 0)
                    assert all_pages(f, asc) == want, (f, asc, "walk")
                for cap in (2000, 5):
                    with monkeypatch.context() as m:
                        # A sample small enough to call trigrams common (the probe is a part of
                        # the term), and with a cap of 5 to say a probe would find too many.
                        m.setattr(view, "SAMPLE", 20)
                        m.setattr(view, "COMMON", 0.1)
                        m.setattr(view, "PROBE_CAP", cap)
                        m.setattr(view, "_sample", [float("-inf"), None, 0, {}])
                        assert all_pages(f, asc) == want, (f, asc, "sampled", cap)
    assert used_index >= 15  # the index answered the rare-term queries


def test_probe_leaves_out_common_trigrams():
    common = {"hel", "ell", "llo", "wor", "orl", "rld"}
    trees = eventquery.compile_filters({"subject": '"Hello World 1" OR zzz', "from": "NOT ann"})
    probes = eventquery.index_probe(trees, False, lambda column, trigram: trigram in common)
    assert probes == {"subject": eventquery.Or((eventquery.Term("lo wo"), eventquery.Term("zzz")))}
    assert eventquery.probe_condition(probes, False) == '({subject}:"lo wo" OR {subject}:"zzz")'
    # pg_trgm: no edge that is not a letter or digit, and a word of 3 to narrow by.
    assert eventquery.index_probe(trees, True, lambda column, trigram: trigram in common) == {}
    assert eventquery.index_probe(eventquery.compile_filters({"subject": "[k4321]"}), True) \
        == {"subject": eventquery.Term("k4321")}


def test_purged_events_leave_the_index(store):
    datas = fill(40, seed=6)
    with store.sync():
        setup_domain(datas)
        cutoff = sorted(d["timestamp"] for d in datas)[20]
        assert purge_events_sync(cutoff) == 20
        assert EventText.select().count() == Event.select().count() == 20
        trees = eventquery.compile_filters({"subject": "hello OR news OR invoice OR ärger OR weekly OR istanbul"})
        ids = set(view._candidates(trees, store.is_postgres))
        live = {i for (i,) in Event.select(Event.id).tuples()}
        assert ids and ids <= live
        for f in ({"subject": "hello"}, {"subject": "NOT hello"}):
            assert all_pages(f, False) == [i for i in expected(datas, f, False)
                                           if next(d for d in datas if d["id"] == i)["timestamp"] >= cutoff]


def test_migration_backfills_existing_events(db_url):
    s = storedb.Store(db_url)
    try:
        with s.sync() as db:
            Runner(db, str(storedb.MIGRATIONS_DIR)).up(target="0008_inbound_traced")
        datas = fill(30, seed=7)
        with s.sync():
            Domain.create(id="searchdom", name=DOMAIN, smtp_login=f"postmaster@{DOMAIN}")
            for d in datas:  # rows as they were before event_text existed
                Event.insert(**events._row(DOMAIN, d)).execute()
        assert s.migrate() == ["0009_event_text"]
        with s.sync():
            assert EventText.select().count() == 30
            for f in ({"subject": "hello"}, {"attachment": "invoice"}, {"subject": "NOT news"}):
                found = view._candidates(eventquery.compile_filters(f), s.is_postgres)
                assert (found is None) == ("NOT" in str(f))
                assert all_pages(f, False) == expected(datas, f, False)
    finally:
        s.close()
