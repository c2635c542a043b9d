"""Webhooks API and the HTTP signing key over real HTTP, with requests and the Mailgun Python
SDK: create/list/get/update/delete, the `unsubscribe` spelling, three URLs at most, the v4
url+event_types form, 404s, SSRF-looking URLs refused at save time, and the test post."""
from __future__ import annotations

import json

import pytest
from mailgun.client import Client

from mailplat.core import signing
from tests.support import start_server
from tests.test_send_api import make_domain
from tests.webhookrecv import HookReceiver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("mailplat-wh"), services=["api"],
                       sets=["hooks.allow_private_targets=true"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("mailplat-wh-strict"), services=["api"])
    yield srv
    srv.stop()


def test_crud_and_shapes(server):
    d = make_domain(server, "wh.example.test")
    base = f"/v3/domains/{d}/webhooks"
    r = server.api("POST", base, data={"id": "delivered", "url": "http://127.0.0.1:9/a"})
    assert r.status_code == 200 and r.json() == {"message": "Webhook has been created",
                                                 "webhook": {"urls": ["http://127.0.0.1:9/a"]}}
    assert server.api("POST", base, data={"id": "delivered", "url": "http://127.0.0.1:9/a"}).status_code == 400
    r = server.api("POST", base, files={"id": (None, "unsubscribe"), "url": (None, "http://127.0.0.1:9/u")})
    assert r.status_code == 200
    assert server.api("GET", f"{base}/unsubscribed").json() == {"webhook": {"urls": ["http://127.0.0.1:9/u"]}}
    assert server.api("GET", f"{base}/unsubscribe").status_code == 200
    listed = server.api("GET", base).json()["webhooks"]
    assert listed == {"delivered": {"urls": ["http://127.0.0.1:9/a"]}, "unsubscribed": {"urls": ["http://127.0.0.1:9/u"]}}
    urls = [f"http://127.0.0.1:9/{i}" for i in range(3)]
    r = server.api("PUT", f"{base}/delivered", data={"url": urls})
    assert r.status_code == 200 and r.json()["webhook"]["urls"] == urls
    assert server.api("PUT", f"{base}/delivered", data={"url": urls + ["http://127.0.0.1:9/4"]}).status_code == 400
    r = server.api("DELETE", f"{base}/delivered")
    assert r.status_code == 200 and r.json()["message"] == "Webhook has been deleted"
    assert server.api("GET", f"{base}/delivered").status_code == 404
    assert server.api("DELETE", f"{base}/delivered").status_code == 404
    assert server.api("POST", base, data={"id": "nonsense", "url": "http://127.0.0.1:9/"}).status_code == 400
    assert server.api("POST", base, data={"id": "opened"}).status_code == 400
    assert server.api("GET", "/v3/domains/nosuch.example.test/webhooks").status_code == 404


def test_python_sdk_and_v4_form(server):
    d = make_domain(server, "wh-sdk.example.test")
    client = Client(auth=("api", server.key), api_url=server.url)
    r = client.domains_webhooks.create(domain=d, data={"id": "clicked", "url": "http://127.0.0.1:9/c"})
    assert r.status_code == 200, r.text
    assert client.domains_webhooks_clicked.get(domain=d).json()["webhook"]["urls"] == ["http://127.0.0.1:9/c"]
    # What the SDK's event_types call really sends: url + event_types on the v3 URL.
    r = server.api("POST", f"/v3/domains/{d}/webhooks", data={"url": "http://127.0.0.1:9/t/",
                                                               "event_types": ["delivered", "opened"]})
    assert r.status_code == 200, r.text
    hooks = server.api("GET", f"/v3/domains/{d}/webhooks").json()["webhooks"]
    assert hooks["delivered"]["urls"] == ["http://127.0.0.1:9/t/"] and hooks["opened"]["urls"] == ["http://127.0.0.1:9/t/"]
    r = server.api("DELETE", f"/v3/domains/{d}/webhooks?url=http://127.0.0.1:9/t/")
    assert r.status_code == 200
    assert set(server.api("GET", f"/v3/domains/{d}/webhooks").json()["webhooks"]) == {"clicked"}


def test_private_urls_refused_without_the_flag(strict):
    d = make_domain(strict, "wh-strict.example.test")
    for url in ("http://127.0.0.1/x", "http://169.254.169.254/latest", "http://localhost/x", "ftp://x.test/"):
        r = strict.api("POST", f"/v3/domains/{d}/webhooks", data={"id": "opened", "url": url})
        assert r.status_code == 400, url


def test_signing_key_and_test_post(server):
    k1 = server.api("GET", "/v5/accounts/http_signing_key").json()["http_signing_key"]
    assert k1 == server.api("GET", "/v5/accounts/http_signing_key").json()["http_signing_key"]
    r = server.api("POST", "/v5/accounts/http_signing_key")
    k2 = r.json()["http_signing_key"]
    assert r.status_code == 200 and k2 != k1
    assert server.api("GET", "/v5/accounts/http_signing_key").json()["http_signing_key"] == k2
    assert server.api("GET", "/v5/accounts/http_signing_key", key="key-wrong").status_code == 401
    d = make_domain(server, "wh-test.example.test")
    rec = HookReceiver()
    try:
        rec.status["/t"] = [202]
        r = server.api("PUT", f"/v3/domains/{d}/webhooks/opened/test", data={"url": rec.url("/t")})
        assert r.status_code == 200 and r.json()["code"] == 202
        body = json.loads(rec.to("/t")[0]["body"])
        s = body["signature"]
        assert signing.verify(k2, s["timestamp"], s["token"], s["signature"])
        assert body["event-data"]["event"] == "opened"
    finally:
        rec.close()
