"""relay.processes = 2: `serve relay` runs a second relay process on the same store; both deliver,
each message exactly once, the connection limits are divided between them, a process killed
with -9 is started again, and none (nor their DKIM signing helpers) outlives the service."""
from __future__ import annotations

import collections
import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.conftest import dns_sets
from tests.relaytest import create_domain, db_url_of, point_mx, queue_rows, send
from tests.smtpsink import SmtpSink
from tests.support import spawned_children as relay_children, start_server, wait_for

pytestmark = pytest.mark.timeout(180)


def test_two_relay_processes_share_the_queue_and_restart(tmp_path, dns_server, db_url):
    sink = SmtpSink().start()
    # workers and per_destination are totals: one connection for each of the two processes.
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                   "relay.retry_schedule=0.5", "relay.lease_seconds=3",
                                   "relay.processes=2", "relay.workers=2", "relay.per_destination=2"]
    server = start_server(tmp_path / "data", db_url=db_url, sets=sets, services=["api", "relay"])
    try:
        wait_for(lambda: len(relay_children(server.proc.pid)) == 1, timeout=30, what="the second relay process")
        [child] = relay_children(server.proc.pid)
        sender = f"s{uuid.uuid4().hex[:8]}.example.test"
        create_domain(server, dns_server, sender)
        rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
        point_mx(dns_server, rdom, "127.0.0.1")
        rcpts = [f"user{i}@{rdom}" for i in range(30)]

        # Two deliveries stuck in DATA at once: with one connection per process, both are sending.
        sink.stall_data()
        for r in rcpts[:10]:
            send(server, sender, [r])
        wait_for(lambda: len(sink.stalled_sessions) == 2, timeout=30, what="a delivery from each process")
        sink.unstall()
        db = db_url_of(server.data_dir)
        wait_for(lambda: [r["state"] for r in queue_rows(db)] == ["delivered"] * 10, timeout=30,
                 what="the first ten delivered and recorded")
        assert len(sink.stalled_sessions) == 2  # never more connections than the total allows

        # kill -9 of the second process: it is started again and the queue still drains.
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: relay_children(server.proc.pid) not in ([], [child]), timeout=30,
                 what="a new second relay process")
        for r in rcpts[10:]:
            send(server, sender, [r])
        wait_for(lambda: all(r["state"] == "delivered" for r in queue_rows(db)), timeout=60,
                 what="every queue row delivered")
        per_rcpt = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
        assert per_rcpt == {r: 1 for r in rcpts}  # nothing was in flight at the kill: no duplicate
        children = relay_children(server.proc.pid)
        # Each relay process has its DKIM signing helper (relay.signing_processes = 1); the
        # new second process may still be starting.
        def helpers_now():
            found = [h for pid in [server.proc.pid, *children] for h in relay_children(pid, b"mailplat.relay.signer")]
            return found if len(found) == 2 else None
        helpers = wait_for(helpers_now, timeout=30, what="a DKIM signing helper in each relay process")
    finally:
        assert server.stop() == 0
        sink.stop()
    assert not [pid for pid in children + helpers if Path(f"/proc/{pid}").exists()]
