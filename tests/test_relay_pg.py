"""Two relay processes sharing one PostgreSQL store deliver 1,000 queued messages, each exactly
once (FOR UPDATE SKIP LOCKED claims with leases; LISTEN/NOTIFY wakes both)."""
from __future__ import annotations

import collections
import uuid

import pytest

from tests.conftest import PG_BASE, dns_sets
from tests.relaytest import create_domain, events, point_mx, queue_rows, send, start_relay
from tests.smtpsink import SmtpSink
from tests.support import pg_database, start_server, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300),
              pytest.mark.skipif(not PG_BASE, reason="MAILPLAT_TEST_PG is not set")]
N = 1000


def notify(db_url: str) -> None:
    from mailplat.store import queue
    from mailplat.store.db import Store
    store = Store(db_url)
    try:
        with store.sync():
            queue.notify_new_sync()
    finally:
        store.close()


def test_two_relays_on_postgres_deliver_each_message_exactly_once(tmp_path, dns_server):
    sink = SmtpSink().start()
    with pg_database(PG_BASE) as db_url:
        sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                       "relay.retry_schedule=0.5", "relay.workers=10"]
        data_dir = tmp_path / "data"
        first = start_server(data_dir, db_url=db_url, sets=sets)
        second = start_relay(data_dir, tmp_path / "relay2.log")
        try:
            sender = f"s{uuid.uuid4().hex[:8]}.example.test"
            create_domain(first, dns_server, sender)
            rdoms = [f"r{i}{uuid.uuid4().hex[:6]}.example.test" for i in range(4)]
            for d in rdoms:
                point_mx(dns_server, d, "127.0.0.1")
            rcpts = [f"user{i}@{rdoms[i % 4]}" for i in range(N)]
            send(first, sender, rcpts, subject="exactly once")
            notify(db_url)
            wait_for(lambda: sink.count() >= N and all(r["state"] == "delivered" for r in queue_rows(db_url)),
                     timeout=240, interval=0.5, what=f"{N} deliveries")
            per_rcpt = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
            assert set(per_rcpt) == set(rcpts)
            assert max(per_rcpt.values()) == 1, [r for r, n in per_rcpt.items() if n > 1][:5]
            assert len(sink.messages) == N
            delivered = events(db_url, kind="delivered")
            assert len(delivered) == N and len({e["recipient"] for e in delivered}) == N
            shares = [first.logs().count("mailplat.relay: delivered"),
                      (tmp_path / "relay2.log").read_text().count("mailplat.relay: delivered")]
            print(f"\ndeliveries per relay process: {shares}")
            assert sum(shares) == N and min(shares) > 0
        finally:
            second.terminate()
            second.wait(30)
            first.stop()
            sink.stop()
