"""Operator commands on a real server: `mailplat webhooks failed|replay` lists webhook posts that
gave up and queues them again (the hooks service then delivers them), and event retention:
events older than tracking.events_retention_days are hidden from the events API and removed by
`mailplat events purge`."""
from __future__ import annotations

import time

import pytest

from tests.relaytest import _with_store, db_url_of
from tests.support import start_server, wait_for
from tests.test_send_api import make_domain
from tests.webhookrecv import HookReceiver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("mailplat-whcli"), services=["api", "hooks"],
                       sets=["hooks.allow_private_targets=true", "tracking.webhook_retry_schedule=0.05",
                             "tracking.webhook_max_attempts=2", "tracking.events_retention_days=1"])
    yield srv
    srv.stop()


def test_failed_posts_listed_and_replayed(server):
    rec = HookReceiver()
    try:
        rec.status["/acc"] = [500]
        d = make_domain(server, "whcli.example.test")
        assert server.api("POST", f"/v3/domains/{d}/webhooks", data={"id": "accepted", "url": rec.url("/acc")}).status_code == 200
        r = server.api("POST", f"/v3/{d}/messages", data={"from": f"s@{d}", "to": "a@x.test", "subject": "s",
                                                          "text": "x", "o:testmode": "yes"})
        assert r.status_code == 200
        wait_for(lambda: d in server.cli("webhooks", "failed").stdout, timeout=20, what="post to give up")
        assert len(rec.to("/acc")) == 2
        rec.status["/acc"] = [200]
        out = server.cli("webhooks", "replay", "--domain", d).stdout
        assert "replayed 1" in out
        wait_for(lambda: len(rec.to("/acc")) == 3, timeout=20, what="replayed post")
        wait_for(lambda: d not in server.cli("webhooks", "failed").stdout, timeout=10, what="row delivered")
    finally:
        rec.close()


def test_retention_hides_and_purges_old_events(server):
    d = make_domain(server, "retention.example.test")
    r = server.api("POST", f"/v3/{d}/messages", data={"from": f"s@{d}", "to": "new@x.test", "subject": "s",
                                                      "text": "x", "o:testmode": "yes"})
    assert r.status_code == 200
    url = db_url_of(server.data_dir)

    def add_old():
        from mailplat.core import events
        for i in range(3):
            data = events.build("accepted", None, f"old{i}@x.test", timestamp=time.time() - 3 * 86400)
            events.record_sync(d, data)
    _with_store(url, add_old)
    seen = server.api("GET", f"/v3/{d}/events", params={"begin": str(time.time() + 1),
                                                        "end": str(time.time() - 10 * 86400)}).json()["items"]
    assert [e["recipient"] for e in seen] == ["new@x.test"]
    assert "purged 3" in server.cli("events", "purge").stdout

    def count():
        from mailplat.store.models import Event
        return Event.select().where(Event.domain == d).count()
    assert _with_store(url, count) == 1
