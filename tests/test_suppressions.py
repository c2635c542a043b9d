"""Suppressions API over real HTTP with requests and the Mailgun Python SDK: bounces,
unsubscribes, complaints and whitelists; JSON arrays/objects, forms, CSV import; 404s Ghost
relies on; paging both ways through query-string state; and the send path dropping suppressed
recipients with the reason and code Ghost reads (605/606/607), allowlisted addresses not
bounce-suppressed."""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
import requests
from mailgun.client import Client

from tests.support import wait_for
from tests.test_send_api import api_only_server, make_domain


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from api_only_server(tmp_path_factory, "mailplat-suppr")


@pytest.fixture(scope="module")
def domain(server):
    return make_domain(server, "suppr.example.test")


def test_bounces_crud_shapes_and_404(server, domain):
    r = server.api("POST", f"/v3/{domain}/bounces", data={"address": "Bad@X.test", "code": "550", "error": "No such user"})
    assert r.status_code == 200 and r.json() == {"message": "Address has been added to the bounces table",
                                                 "address": "bad@x.test"}
    r = server.api("POST", f"/v3/{domain}/bounces", json=[{"address": "b2@x.test"}, {"address": "b3@x.test", "code": "551"}])
    assert r.status_code == 200 and r.json()["message"] == "2 addresses have been added to the bounces table"
    got = server.api("GET", f"/v3/{domain}/bounces/bad%40x.test").json()
    assert got["address"] == "bad@x.test" and got["code"] == "550" and got["error"] == "No such user"
    assert got["created_at"].endswith("GMT")
    assert server.api("GET", f"/v3/{domain}/bounces/b3@x.test").json()["code"] == "551"
    r = server.api("DELETE", f"/v3/{domain}/bounces/bad%40x.test")
    assert r.status_code == 200 and r.json()["address"] == "bad@x.test"
    for path in ("bounces", "unsubscribes", "complaints", "whitelists"):
        r = server.api("DELETE", f"/v3/{domain}/{path}/nobody%40x.test")
        assert r.status_code == 404 and "message" in r.json(), path
        assert server.api("GET", f"/v3/{domain}/{path}/nobody@x.test").status_code == 404
    assert server.api("GET", "/v3/nosuch.example.test/bounces").status_code == 404
    r = server.api("POST", f"/v3/{domain}/bounces", json=[{"address": f"x{i}@x.test"} for i in range(1000)])
    assert r.status_code == 400
    assert server.api("POST", f"/v3/{domain}/bounces", data={"address": "not an address"}).status_code == 400
    assert server.api("POST", f"/v3/{domain}/bounces", data={"code": "550"}).status_code == 400
    r = server.api("DELETE", f"/v3/{domain}/bounces")
    assert r.status_code == 200 and server.api("GET", f"/v3/{domain}/bounces").json()["items"] == []


def test_unsubscribes_complaints_whitelists(server, domain):
    r = server.api("POST", f"/v3/{domain}/unsubscribes", files={"address": (None, "u@x.test"), "tag": (None, "*")})
    assert r.status_code == 200 and r.json()["address"] == "u@x.test"
    r = server.api("POST", f"/v3/{domain}/unsubscribes", json=[{"address": "u2@x.test", "tags": ["news"]}])
    assert r.status_code == 200
    assert server.api("GET", f"/v3/{domain}/unsubscribes/u2%40x.test").json()["tags"] == ["news"]
    assert server.api("GET", f"/v3/{domain}/unsubscribes/u@x.test").json()["tags"] == ["*"]
    r = server.api("POST", f"/v3/{domain}/complaints", json={"address": "cp@x.test"})
    assert r.status_code == 200 and r.json()["address"] == "cp@x.test"
    c = server.api("GET", f"/v3/{domain}/complaints/cp%40x.test").json()
    assert c["address"] == "cp@x.test" and c["count"] == 1
    r = server.api("POST", f"/v3/{domain}/whitelists", data={"domain": "friends.test"})
    assert r.status_code == 200 and r.json()["type"] == "domain" and r.json()["value"] == "friends.test"
    r = server.api("POST", f"/v3/{domain}/whitelists", data={"address": "vip@x.test"})
    assert r.json()["type"] == "address"
    assert server.api("GET", f"/v3/{domain}/whitelists/vip%40x.test").json()["value"] == "vip@x.test"
    csv = b"address,code,error\ncsv1@x.test,550,gone\ncsv2@x.test,,\n"
    r = server.api("POST", f"/v3/{domain}/bounces/import", files={"file": ("b.csv", csv, "text/csv")})
    assert r.status_code == 200, r.text
    assert server.api("GET", f"/v3/{domain}/bounces/csv1@x.test").json()["error"] == "gone"
    bad = server.api("POST", f"/v3/{domain}/bounces/import", files={"file": ("b.csv", b"nope\n1\n", "text/csv")})
    assert bad.status_code == 400


def test_paging_both_ways_query_string_state(server):
    d = make_domain(server, "paging-suppr.example.test")
    addrs = sorted(f"p{i:02d}@x.test" for i in range(7))
    assert server.api("POST", f"/v3/{d}/bounces", json=[{"address": a} for a in addrs]).status_code == 200
    page = server.api("GET", f"/v3/{d}/bounces", params={"limit": 3}).json()
    assert [i["address"] for i in page["items"]] == addrs[:3]
    seen = list(addrs[:3])
    nxt = page["paging"]["next"]
    while True:
        # mailgun.js: append the query string of paging.next to the list URL.
        qs = urlparse(nxt).query
        assert nxt.startswith(server.url) and parse_qs(qs)["page"] == ["next"]
        body = server.api("GET", f"/v3/{d}/bounces?{qs}").json()
        if not body["items"]:
            break
        seen += [i["address"] for i in body["items"]]
        nxt = body["paging"]["next"]
    assert seen == addrs
    prev = server.api("GET", f"/v3/{d}/bounces?{urlparse(body['paging']['previous']).query}").json()
    assert [i["address"] for i in prev["items"]] == addrs[-3:]
    last = requests.get(page["paging"]["last"], auth=("api", server.key), timeout=10).json()
    assert [i["address"] for i in last["items"]] == addrs[-3:]


def test_python_sdk(server):
    d = make_domain(server, "sdk-suppr.example.test")
    client = Client(auth=("api", server.key), api_url=server.url)
    r = client.bounces.create(data={"address": "sdk@x.test", "code": 550, "error": "x"}, domain=d)
    assert r.status_code == 200, r.text
    r = client.bounces.create(data={"address": "sdk2@x.test", "code": "550"}, domain=d,
                              headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert client.bounces.get(domain=d, bounce_address="sdk@x.test").json()["address"] == "sdk@x.test"
    items = client.bounces.get(domain=d, filters={"limit": 1}).json()
    assert len(items["items"]) == 1 and "page=next" in items["paging"]["next"]
    assert client.unsubscribes.create(data={"address": "su@x.test", "tag": "*"}, domain=d).status_code == 200
    assert client.complaints.create(data={"address": "sc@x.test"}, domain=d).status_code == 200
    assert client.bounces.delete(domain=d, bounce_address="sdk@x.test").status_code == 200
    assert client.bounces.delete(domain=d, bounce_address="sdk@x.test").status_code == 404


def _send(server, d, to, **extra):
    r = server.api("POST", f"/v3/{d}/messages", data={"from": f"s@{d}", "to": to, "subject": "s", "text": "x", **extra})
    assert r.status_code == 200, r.text
    return r.json()["id"].strip("<>")


def _failed(server, d, mid):
    def found():
        body = server.api("GET", f"/v3/{d}/events", params={"event": "failed", "message-id": mid}).json()
        return {i["recipient"]: i for i in body["items"]} or None
    return wait_for(found, timeout=10, what="failed events")


def test_drops_with_reasons_and_codes(server):
    d = make_domain(server, "drops.example.test")
    server.api("POST", f"/v3/{d}/bounces", json=[{"address": "hard@x.test"}, {"address": "vip@ok.test"},
                                                 {"address": "any@friend.test"}])
    server.api("POST", f"/v3/{d}/unsubscribes", json=[{"address": "all@x.test", "tags": ["*"]},
                                                      {"address": "news@x.test", "tags": ["news"]}])
    server.api("POST", f"/v3/{d}/complaints", json=[{"address": "spam@x.test"}])
    server.api("POST", f"/v3/{d}/whitelists", data={"address": "vip@ok.test"})
    server.api("POST", f"/v3/{d}/whitelists", data={"domain": "friend.test"})
    rcpts = ["hard@x.test", "all@x.test", "news@x.test", "spam@x.test", "vip@ok.test", "any@friend.test",
             "fine@x.test"]
    mid = _send(server, d, rcpts, **{"o:tag": "news", "o:testmode": "yes"})
    failed = _failed(server, d, mid)
    assert failed["hard@x.test"]["reason"] == "suppress-bounce"
    assert failed["hard@x.test"]["delivery-status"]["code"] == 605
    assert failed["all@x.test"]["reason"] == "suppress-unsubscribe"
    assert failed["news@x.test"]["delivery-status"]["code"] == 606
    assert failed["spam@x.test"]["reason"] == "suppress-complaint"
    assert failed["spam@x.test"]["delivery-status"]["code"] == 607
    assert all(f["severity"] == "permanent" for f in failed.values())
    assert set(failed) == {"hard@x.test", "all@x.test", "news@x.test", "spam@x.test"}
    # Without the tag, the tag-level unsubscribe does not apply.
    mid2 = _send(server, d, ["news@x.test", "all@x.test"], **{"o:tag": "other", "o:testmode": "yes"})
    assert set(_failed(server, d, mid2)) == {"all@x.test"}


def test_python_sdk_stream_walks_every_page(server):
    d = make_domain(server, "stream-suppr.example.test")
    addrs = sorted(f"s{i:02d}@x.test" for i in range(11))
    assert server.api("POST", f"/v3/{d}/unsubscribes", json=[{"address": a} for a in addrs]).status_code == 200
    client = Client(auth=("api", server.key), api_url=server.url)
    got = [item["address"] for item in client.unsubscribes.stream(filters={"limit": 4}, domain=d)]
    assert got == addrs
