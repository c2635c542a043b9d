"""kill -9 of the relay in the middle of deliveries loses nothing: after a restart every queued
message reaches the remote MX (at least once; duplicates are counted and reported), at once:
the restarted relay releases the dead process's leases instead of waiting them out."""
from __future__ import annotations

import collections
import uuid

import pytest

from tests.conftest import dns_sets
from tests.relaytest import create_domain, db_url_of, point_mx, queue_rows, send
from tests.smtpsink import SmtpSink
from tests.support import serve, start_server, wait_for

pytestmark = pytest.mark.timeout(180)
N = 40


def sender_and_remote(server, dns_server) -> tuple[str, str]:
    """A new sending domain on `server`, and a remote domain whose MX is the loopback sink."""
    sender = f"s{uuid.uuid4().hex[:8]}.example.test"
    create_domain(server, dns_server, sender)
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    point_mx(dns_server, rdom, "127.0.0.1")
    return sender, rdom


def test_kill_9_mid_delivery_then_restart_delivers_everything(tmp_path, dns_server):
    sink = SmtpSink().start()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                   "relay.retry_schedule=0.5", "relay.per_destination=3"]  # lease: 300 s
    server = start_server(tmp_path / "data", sets=sets)
    try:
        sender, rdom = sender_and_remote(server, dns_server)
        rcpts = [f"user{i}@{rdom}" for i in range(N)]
        sink.data_replies = []
        # A few go through, then the remote MX stalls in DATA with deliveries in flight.
        send(server, sender, rcpts[:5], subject="before")
        sink.wait_count(5)
        sink.stall_data()
        send(server, sender, rcpts[5:], subject="during")
        wait_for(lambda: len(sink.stalled_sessions) >= 2, timeout=20, what="deliveries stuck in DATA")
        server.proc.kill()  # SIGKILL: no cleanup, leases left behind
        server.proc.wait(10)
        sink.unstall()  # the stalled sessions complete at the sink (as a real MX might)
        db = db_url_of(server.data_dir)
        assert any(r["lease_owner"] for r in queue_rows(db) if r["state"] == "queued")
        server = serve(server.data_dir, server.key)
        wait_for(lambda: all(sink.to(r) for r in rcpts), timeout=60, interval=0.1,
                 what="every recipient to receive its message after the restart")
        wait_for(lambda: all(r["state"] == "delivered" for r in queue_rows(db)), timeout=20,
                 what="every queue row delivered")
        per_rcpt = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
        assert set(per_rcpt) == set(rcpts)
        duplicates = sum(n - 1 for n in per_rcpt.values())
        print(f"\nkill -9 test: {N} messages, {len(sink.messages)} received, {duplicates} duplicates")
        # At most the deliveries that were in flight when the process died can be duplicated.
        assert duplicates <= len(sink.stalled_sessions)
    finally:
        server.stop()
        sink.stop()


def test_slow_delivery_keeps_its_lease_so_a_second_relay_never_sends_it_too(tmp_path, dns_server):
    """A remote MX that takes longer than the lease: the relay renews the lease of rows it
    holds, so the other relay process sharing the store does not claim and send them again."""
    from tests.relaytest import start_relay
    sink = SmtpSink().start()
    lease = 1.5
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                   "relay.retry_schedule=0.5", f"relay.lease_seconds={lease}"]
    server = start_server(tmp_path / "data", sets=sets)
    second = start_relay(server.data_dir, tmp_path / "relay2.log")
    try:
        sender, rdom = sender_and_remote(server, dns_server)
        rcpts = [f"slow{i}@{rdom}" for i in range(6)]
        sink.stall_data()
        send(server, sender, rcpts)
        wait_for(lambda: len(sink.stalled_sessions) >= 1, timeout=20, what="a delivery stuck in DATA")
        db = db_url_of(server.data_dir)
        first = {r["id"]: r["lease_until"] for r in queue_rows(db) if r["lease_owner"]}
        assert first
        # Wait (on the store, not the clock) until those leases were renewed well past 2 lease periods.
        wait_for(lambda: all((r["lease_until"] or 0) > first[r["id"]] + 2 * lease
                             for r in queue_rows(db) if r["id"] in first and r["state"] == "queued"),
                 timeout=20, interval=0.1, what="lease renewals")
        sink.unstall()
        wait_for(lambda: all(r["state"] == "delivered" for r in queue_rows(db)), timeout=30,
                 what="every row delivered")
        per_rcpt = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
        assert per_rcpt == {r: 1 for r in rcpts}
    finally:
        second.terminate()
        second.wait(30)
        server.stop()
        sink.stop()


def test_sigterm_releases_waiting_rows_and_finishes_the_one_in_flight(tmp_path, dns_server):
    sink = SmtpSink().start()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                   "relay.per_destination=1"]  # default lease (300 s)
    server = start_server(tmp_path / "data", sets=sets)
    try:
        sender, rdom = sender_and_remote(server, dns_server)
        rcpts = [f"t{i}@{rdom}" for i in range(10)]
        sink.stall_data()
        send(server, sender, rcpts)
        db = db_url_of(server.data_dir)
        wait_for(lambda: len(sink.stalled_sessions) == 1, timeout=20, what="a delivery stuck in DATA")
        wait_for(lambda: sum(1 for r in queue_rows(db) if r["lease_owner"]) == 10, timeout=10,
                 what="all rows leased")
        server.proc.terminate()  # SIGTERM: stop claiming, release what has not started
        # Rows not started get their leases back at once (no 300 s wait for another relay);
        # the one on the wire, and the next one already being signed, are still in hand.
        wait_for(lambda: sum(1 for r in queue_rows(db) if r["lease_owner"]) <= 2, timeout=10,
                 what="leases released")
        assert server.proc.poll() is None  # still finishing the delivery in flight
        sink.unstall()
        assert server.proc.wait(30) == 0
        rows = queue_rows(db)
        assert sum(1 for r in rows if r["state"] == "delivered") >= 1
        assert all(r["lease_owner"] is None for r in rows if r["state"] == "queued")
        server = serve(server.data_dir, server.key)
        wait_for(lambda: all(sink.to(r) for r in rcpts), timeout=30, what="the rest after restart")
        assert collections.Counter(r for m in sink.messages for r in m.rcpt_tos) == {r: 1 for r in rcpts}
    finally:
        server.stop()
        sink.stop()


def test_a_remote_silent_past_command_timeout_is_a_temporary_failure_then_retried(tmp_path, dns_server):
    sink = SmtpSink().start()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                   "relay.retry_schedule=0.5", "relay.command_timeout=1"]
    server = start_server(tmp_path / "data", sets=sets, services=["api", "relay"])
    try:
        sender, rdom = sender_and_remote(server, dns_server)
        rcpt = f"slow@{rdom}"
        db = db_url_of(server.data_dir)
        sink.stall_data()  # no reply to the end of DATA
        send(server, sender, [rcpt])
        row = wait_for(lambda: next((r for r in queue_rows(db) if r["attempts"] >= 1), None), timeout=20,
                       what="the attempt to time out")
        assert row["state"] == "queued" and "during DATA" in row["last_error"], row
        sink.unstall()
        wait_for(lambda: queue_rows(db)[0]["state"] == "delivered", timeout=20, what="the retry to deliver")
    finally:
        server.stop()
        sink.stop()


def test_mail_claimed_while_a_destination_closes_its_session_is_still_sent(tmp_path, dns_server):
    """A row claimed for a destination whose only task is closing its session (waiting for the
    reply to QUIT) gets a task of its own once that one ends, instead of waiting forever."""
    sink = SmtpSink().start()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                   "relay.retry_schedule=0.5"]
    server = start_server(tmp_path / "data", sets=sets)
    try:
        sender, rdom = sender_and_remote(server, dns_server)
        sink.stall_quit()
        send(server, sender, [f"first@{rdom}"])
        wait_for(lambda: sink.quitting, timeout=20, what="the relay closing its session")
        send(server, sender, [f"second@{rdom}"])
        db = db_url_of(server.data_dir)
        wait_for(lambda: [r for r in queue_rows(db) if r["recipient"] == f"second@{rdom}" and r["lease_owner"]],
                 timeout=20, what="the second row claimed while the first session closes")
        sink.unstall()
        wait_for(lambda: sink.to(f"second@{rdom}"), timeout=20, what="the second message delivered")
    finally:
        server.stop()
        sink.stop()
