"""Stats, tags, campaigns and the legacy log over real HTTP (requests and the Python SDK):
counters follow real sends and drops, totals come back in Mailgun's shape at hour/day/month
resolution for one domain and for the account, per tag; tags list with paging, get, update,
delete; campaigns create/list/get/delete with stats and events; /log with skip and limit."""
from __future__ import annotations

import email.utils
import time
from urllib.parse import urlparse

import pytest
from mailgun.client import Client

from tests.test_send_api import api_only_server, make_domain


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from api_only_server(tmp_path_factory, "mailplat-stats")


@pytest.fixture(scope="module")
def seeded(server):
    d = make_domain(server, "stats.example.test")
    server.api("POST", f"/v3/{d}/bounces", json=[{"address": "gone@x.test"}])
    server.api("POST", f"/v3/{d}/campaigns", data={"name": "Spring", "id": "spring"})

    def send(to, **extra):
        r = server.api("POST", f"/v3/{d}/messages", data={"from": f"s@{d}", "to": to, "subject": "Hi there",
                                                          "text": "x", "o:testmode": "yes", **extra})
        assert r.status_code == 200, r.text
    send(["a@x.test", "b@x.test"], **{"o:tag": ["news", "weekly"], "o:campaign": "spring"})
    send(["gone@x.test"], **{"o:tag": "news"})
    for i in range(3):
        send(f"t{i}@x.test", **{"o:tag": f"tag{i}"})
    return d


def test_domain_totals_shape_and_counts(server, seeded):
    r = server.api("GET", f"/v3/{seeded}/stats/total", params=[("event", "accepted"), ("event", "failed"),
                                                               ("event", "delivered"), ("duration", "1m")])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resolution"] == "month" and len(body["stats"]) >= 1
    for key in ("start", "end"):
        assert email.utils.parsedate_to_datetime(body[key]) is not None
    last = body["stats"][-1]
    assert email.utils.parsedate_to_datetime(last["time"]) is not None
    assert last["accepted"] == {"incoming": 0, "outgoing": 6, "total": 6}
    assert last["failed"]["permanent"]["suppress-bounce"] == 1 and last["failed"]["permanent"]["total"] == 1
    assert last["failed"]["temporary"]["total"] == 0
    assert last["delivered"]["total"] == 0
    hourly = server.api("GET", f"/v3/{seeded}/stats/total", params={"event": "accepted", "resolution": "hour",
                                                                     "start": str(time.time() - 7200)}).json()
    assert hourly["resolution"] == "hour" and len(hourly["stats"]) in (3, 4)
    assert sum(s["accepted"]["total"] for s in hourly["stats"]) == 6
    account = server.api("GET", "/v3/stats/total", params={"event": "accepted", "duration": "24h"}).json()
    assert sum(s["accepted"]["total"] for s in account["stats"]) >= 6
    assert server.api("GET", f"/v3/{seeded}/stats/total").status_code == 400  # no event
    assert server.api("GET", f"/v3/{seeded}/stats/total", params={"event": "bogus"}).status_code == 400
    assert server.api("GET", f"/v3/{seeded}/stats/total", params={"event": "accepted", "resolution": "week"}).status_code == 400
    assert server.api("GET", f"/v3/{seeded}/stats/total", params={"event": "accepted", "duration": "x"}).status_code == 400
    legacy = server.api("GET", f"/v3/{seeded}/stats", params={"event": "sent", "limit": 5}).json()
    assert legacy["items"][0]["event"] == "accepted" and legacy["items"][0]["total_count"] == 6


def test_python_sdk_stats(server, seeded):
    client = Client(auth=("api", server.key), api_url=server.url)
    r = client.stats_total.get(domain=seeded, filters={"event": ["accepted", "delivered", "failed"], "duration": "1m"})
    assert r.status_code == 200, r.text
    assert r.json()["stats"][-1]["accepted"]["total"] == 6


def test_tags(server, seeded):
    page = server.api("GET", f"/v3/{seeded}/tags", params={"limit": 2}).json()
    assert [t["tag"] for t in page["items"]] == ["news", "tag0"]
    names = [t["tag"] for t in page["items"]]
    nxt = page["paging"]["next"]
    while True:
        body = server.api("GET", f"/v3/{seeded}/tags?{urlparse(nxt).query}").json()
        if not body["items"]:
            break
        names += [t["tag"] for t in body["items"]]
        nxt = body["paging"]["next"]
    assert names == ["news", "tag0", "tag1", "tag2", "weekly"]
    prev = server.api("GET", f"/v3/{seeded}/tags?{urlparse(page['paging']['last']).query}").json()
    assert [t["tag"] for t in prev["items"]] == ["tag2", "weekly"]
    one = server.api("GET", f"/v3/{seeded}/tags/news").json()
    assert one["tag"] == "news" and one["description"] == "" and "first-seen" in one and "last-seen" in one
    r = server.api("PUT", f"/v3/{seeded}/tags/news", data={"description": "News"})
    assert r.status_code == 200 and r.json()["message"] == "Tag updated"
    st = server.api("GET", f"/v3/{seeded}/tags/news/stats", params={"event": "accepted", "duration": "1d"}).json()
    assert st["tag"] == "news" and st["description"] == "News"
    assert sum(s["accepted"]["total"] for s in st["stats"]) == 3
    st = server.api("GET", f"/v3/{seeded}/tags/weekly/stats", params={"event": "failed"}).json()
    assert sum(s["failed"]["permanent"]["total"] for s in st["stats"]) == 0
    assert server.api("DELETE", f"/v3/{seeded}/tags/tag0").json()["message"] == "Tag deleted"
    assert server.api("GET", f"/v3/{seeded}/tags/tag0").status_code == 404
    assert server.api("GET", f"/v3/{seeded}/tags/nosuch/stats", params={"event": "accepted"}).status_code == 404


def test_campaigns(server, seeded):
    r = server.api("POST", f"/v3/{seeded}/campaigns", data={"name": "Generated"})
    assert r.status_code == 200 and len(r.json()["campaign"]["id"]) == 8
    assert server.api("POST", f"/v3/{seeded}/campaigns", data={"name": "dup", "id": "spring"}).status_code == 400
    listing = server.api("GET", f"/v3/{seeded}/campaigns").json()
    assert listing["total_count"] == 2
    spring = server.api("GET", f"/v3/{seeded}/campaigns/spring").json()
    assert spring["name"] == "Spring" and spring["submitted_count"] == 2
    st = server.api("GET", f"/v3/{seeded}/campaigns/spring/stats").json()
    assert st["total"]["delivered"] == 0 and st["unique"]["opened"] == {"recipient": 0}  # test mode
    hourly = server.api("GET", f"/v3/{seeded}/campaigns/spring/stats", params={"groupby": "daily_hour"}).json()
    assert len(hourly) in (1, 2) and all(0 <= h["daily_hour"] <= 23 and not any(h["total"].values()) for h in hourly)
    evs = server.api("GET", f"/v3/{seeded}/campaigns/spring/events", params={"recipient": "a@x.test"}).json()
    assert [e["recipient"] for e in evs] == ["a@x.test"] and evs[0]["event"] == "accepted"
    gen = r.json()["campaign"]["id"]
    assert server.api("DELETE", f"/v3/{seeded}/campaigns/{gen}").json() == {"message": "Campaign deleted", "id": gen}
    assert server.api("GET", f"/v3/{seeded}/campaigns/{gen}").status_code == 404


def test_legacy_log(server, seeded):
    body = server.api("GET", f"/v3/{seeded}/log", params={"skip": 0, "limit": 2}).json()
    assert body["total_count"] == 7 and len(body["items"]) == 2  # 6 accepted + 1 failed
    item = body["items"][0]
    assert set(item) == {"hap", "created_at", "message", "type", "message_id"}
    rest = server.api("GET", f"/v3/{seeded}/log", params={"skip": 2, "limit": 100}).json()["items"]
    assert len(rest) == 5
    failed = [i for i in body["items"] + rest if i["hap"] == "failed"]
    assert len(failed) == 1 and failed[0]["type"] == "error" and "gone@x.test" in failed[0]["message"]
