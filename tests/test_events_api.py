"""Events API over real HTTP: filters, time ranges, both directions, and paging the way each
client pages — following `paging` URLs directly (requests, the Python SDK's users) and taking
their last path segment to GET /v3/<domain>/events/<token> (mailgun.js) — plus the query Ghost
polls with.  Events come from real sends through the API."""
from __future__ import annotations

import time
from urllib.parse import urlparse

import pytest
import requests

from tests.support import start_server, wait_for
from tests.test_send_api import api_only_server, make_domain

N = 7


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from api_only_server(tmp_path_factory, "mailplat-events")


def send(server, domain, rcpt, **extra):
    r = server.api("POST", f"/v3/{domain}/messages",
                   data={"from": f"Sender <s@{domain}>", "to": rcpt, "subject": "s", "text": "x",
                         "o:testmode": "yes", **extra})
    assert r.status_code == 200, r.text
    return r.json()["id"].strip("<>")


@pytest.fixture(scope="module")
def seeded(server):
    """A domain with N accepted events, oldest first: r0 .. r6 (tags alternate)."""
    domain = make_domain(server, "events.example.test")
    t0 = time.time()
    ids = []
    for i in range(N):
        ids.append(send(server, domain, f"r{i}@x.test", **{"o:tag": ["all", "even" if i % 2 == 0 else "odd"]}))
    t1 = time.time()
    # Ascending walks only show events settled for a moment (so late commits are never skipped).
    wait_for(lambda: len(get(server, f"/v3/{domain}/events", begin=repr(t0 - 1), ascending="yes")["items"]) == N,
             timeout=10, what="events to settle")
    return {"domain": domain, "ids": ids, "t0": t0, "t1": t1}


def get(server, url_or_path, **params):
    url = url_or_path if url_or_path.startswith("http") else server.url + url_or_path
    r = requests.get(url, params=params or None, auth=("api", server.key), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["paging"]) == {"first", "last", "next", "previous"}
    for link in body["paging"].values():
        assert link.startswith(server.url + "/v3/"), link  # absolute, on this server
    return body


def rcpts(body) -> list[str]:
    return [i["recipient"] for i in body["items"]]


def token_path(server, domain, link: str) -> str:
    """What mailgun.js does with a paging URL: keep only its last path segment."""
    return f"/v3/{domain}/events/{urlparse(link).path.rsplit('/', 1)[1]}"


def test_descending_pages_by_following_urls(server, seeded):
    d = seeded["domain"]
    page = get(server, f"/v3/{d}/events", limit=3)
    assert rcpts(page) == ["r6@x.test", "r5@x.test", "r4@x.test"]
    assert all(i["event"] == "accepted" and isinstance(i["timestamp"], float) for i in page["items"])
    first_url = page["paging"]["first"]
    page2 = get(server, page["paging"]["next"])
    assert rcpts(page2) == ["r3@x.test", "r2@x.test", "r1@x.test"]
    page3 = get(server, page2["paging"]["next"])
    assert rcpts(page3) == ["r0@x.test"]
    end = get(server, page3["paging"]["next"])
    assert end["items"] == [] and end["paging"]["next"]  # the empty last page still pages
    again = get(server, end["paging"]["next"])
    assert again["items"] == []
    back = get(server, page2["paging"]["previous"])
    assert rcpts(back) == ["r6@x.test", "r5@x.test", "r4@x.test"]
    back2 = get(server, page3["paging"]["previous"])
    assert rcpts(back2) == ["r3@x.test", "r2@x.test", "r1@x.test"]
    assert rcpts(get(server, first_url)) == rcpts(page)
    assert rcpts(get(server, page["paging"]["last"])) == ["r2@x.test", "r1@x.test", "r0@x.test"]


def test_mailgun_js_style_last_segment_with_original_query(server, seeded):
    d = seeded["domain"]
    query = {"limit": "2", "event": "accepted"}
    page = get(server, f"/v3/{d}/events", **query)
    seen = rcpts(page)
    for _ in range(10):
        page = get(server, token_path(server, d, page["paging"]["next"]), **query)
        if not page["items"]:
            break
        seen += rcpts(page)
    assert seen == [f"r{i}@x.test" for i in reversed(range(N))]


def test_ascending_walk_and_previous(server, seeded):
    d = seeded["domain"]
    begin = seeded["t0"] - 0.001
    page = get(server, f"/v3/{d}/events", begin=str(begin), ascending="yes", limit=4)
    assert rcpts(page) == [f"r{i}@x.test" for i in range(4)]
    page2 = get(server, page["paging"]["next"])
    assert rcpts(page2) == [f"r{i}@x.test" for i in range(4, N)]
    prev = get(server, page2["paging"]["previous"])
    assert rcpts(prev) == [f"r{i}@x.test" for i in range(4)]
    assert get(server, page2["paging"]["next"])["items"] == []


def test_begin_end_range_and_direction(server, seeded):
    d = seeded["domain"]
    all_desc = get(server, f"/v3/{d}/events", limit=300)["items"]
    ts = {i["recipient"]: i["timestamp"] for i in all_desc}
    lo, hi = ts["r2@x.test"], ts["r4@x.test"]
    asc = get(server, f"/v3/{d}/events", begin=repr(lo), end=repr(hi))  # begin < end: ascending
    assert rcpts(asc) == ["r2@x.test", "r3@x.test", "r4@x.test"]
    desc = get(server, f"/v3/{d}/events", begin=repr(hi), end=repr(lo))  # begin > end: descending
    assert rcpts(desc) == ["r4@x.test", "r3@x.test", "r2@x.test"]
    rfc = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(int(hi) + 1))
    older = get(server, f"/v3/{d}/events", begin=rfc, ascending="no")
    assert "r4@x.test" in rcpts(older)


def test_filters(server, seeded):
    d = seeded["domain"]
    assert rcpts(get(server, f"/v3/{d}/events", recipient="r3@x.test")) == ["r3@x.test"]
    mid = seeded["ids"][5]
    assert rcpts(get(server, f"/v3/{d}/events", **{"message-id": mid})) == ["r5@x.test"]
    assert rcpts(get(server, f"/v3/{d}/events", **{"message-id": f"<{mid}>"})) == ["r5@x.test"]
    assert rcpts(get(server, f"/v3/{d}/events", tags="odd")) == ["r5@x.test", "r3@x.test", "r1@x.test"]
    assert rcpts(get(server, f"/v3/{d}/events", tags="all AND even", limit=2)) == ["r6@x.test", "r4@x.test"]
    assert get(server, f"/v3/{d}/events", tags="odd AND even")["items"] == []
    assert len(get(server, f"/v3/{d}/events", event="accepted OR delivered")["items"]) == N
    assert get(server, f"/v3/{d}/events", event="delivered")["items"] == []
    assert len(get(server, f"/v3/{d}/events", **{"from": f"s@{d}"})["items"]) == N
    assert get(server, f"/v3/{d}/events", **{"from": "someone@else.test"})["items"] == []
    paged = get(server, f"/v3/{d}/events", tags="even", limit=2)
    assert rcpts(paged) == ["r6@x.test", "r4@x.test"]
    assert rcpts(get(server, paged["paging"]["next"])) == ["r2@x.test", "r0@x.test"]


def test_new_events_do_not_disturb_a_descending_walk(server, seeded):
    d = make_domain(server, "events-live.example.test")
    for i in range(4):
        send(server, d, f"old{i}@x.test")
    page = get(server, f"/v3/{d}/events", limit=2)
    assert rcpts(page) == ["old3@x.test", "old2@x.test"]
    send(server, d, "new@x.test")
    assert rcpts(get(server, page["paging"]["next"])) == ["old1@x.test", "old0@x.test"]
    assert rcpts(get(server, f"/v3/{d}/events", limit=1)) == ["new@x.test"]


def test_ghost_style_polling(server):
    """Ghost: limit=300, event joined with ' OR ', tags with ' AND ', float epoch begin/end,
    ascending=yes; follows paging.next until an empty page; reads message-id and user-variables."""
    d = make_domain(server, "ghost.example.test")
    begin = time.time() - 1
    sent = {}
    for i in range(5):
        sent[f"m{i}@x.test"] = send(server, d, f"m{i}@x.test", **{"o:tag": ["bulk-email", "bulk-email-site1"],
                                                                  "v:email-id": f"e{i}"})
    send(server, d, "other@x.test", **{"o:tag": "bulk-email"})
    end = time.time() + 1
    query = {"event": "delivered OR failed OR accepted", "tags": "bulk-email AND bulk-email-site1",
             "begin": repr(begin), "end": repr(end), "ascending": "yes", "limit": "300"}
    wait_for(lambda: len(get(server, f"/v3/{d}/events", **query)["items"]) == 5, timeout=10,
             what="events to settle")
    page = get(server, f"/v3/{d}/events", **query)
    got = []
    pages = 0
    while True:
        pages += 1
        assert "paging" in page
        if not page["items"]:
            break
        got += page["items"]
        page = get(server, token_path(server, d, page["paging"]["next"]), **query)
        assert pages < 5
    assert [i["recipient"] for i in got] == [f"m{i}@x.test" for i in range(5)]
    stamps = [i["timestamp"] for i in got]
    assert stamps == sorted(stamps)
    for item in got:
        assert item["message"]["headers"]["message-id"] == sent[item["recipient"]]
        assert item["user-variables"]["email-id"] == "e" + item["recipient"][1]


def test_bad_queries(server, seeded):
    d = seeded["domain"]
    for params, words in (({"limit": "301"}, "at most 300"), ({"limit": "zero"}, "integer"),
                          ({"begin": "yesterday-ish"}, "not a valid date"), ({"ascending": "maybe"}, "yes or no")):
        r = server.api("GET", f"/v3/{d}/events", params=params)
        assert r.status_code == 400 and words in r.json()["message"], (params, r.text)
    for token in ("not-a-token", "eyJ4IjoxfQ", "!!!"):
        r = server.api("GET", f"/v3/{d}/events/{token}")
        assert r.status_code == 400 and r.json()["message"] == "Invalid page token"
    r = server.api("GET", "/v3/unknown.example.test/events")
    assert r.status_code == 404 and r.json()["message"] == "Domain not found"


def test_paging_uses_public_url(tmp_path):
    srv = start_server(tmp_path, sets=["api.public_url=https://mail.example.test/"], services=["api"])
    try:
        make_domain(srv, "pub.example.test")
        r = srv.api("GET", "/v3/pub.example.test/events")
        assert r.status_code == 200
        assert r.json()["paging"]["next"].startswith("https://mail.example.test/v3/pub.example.test/events/")
    finally:
        srv.stop()
