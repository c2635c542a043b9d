"""The relay's connections and signing helpers, over real sockets: an idle connection is kept
for the next message to its destination (relay.idle_seconds), gives its slot up when another
destination needs one, is replaced when the remote closed it; DKIM signing runs in a helper
process (relay.signing_processes) that is replaced when it dies, and no message waits for it."""
from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from tests.conftest import dns_sets
from tests.relaytest import create_domain, db_url_of, dkim_verify_perl, events, point_mx, queue_rows, send
from tests.smtpsink import SmtpSink, free_port
from tests.support import spawned_children, start_server, wait_for

pytestmark = pytest.mark.timeout(120)
ONE_GOOD_SIGNATURE = "pass\npass(pass)"  # Mail::DKIM: the verdict, then each signature's
IDLE = 30  # relay.idle_seconds here: far longer than any test waits


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    tmp = tmp_path_factory.mktemp("relayconn")
    port = free_port()
    # One connection in all (relay.workers=1): a second destination must take the slot of an
    # idle connection.
    server = start_server(tmp / "data", sets=dns_sets(dns_server) + [
        "relay.allow_private_mx=true", f"relay.remote_port={port}", "relay.workers=1",
        "relay.per_destination=1", f"relay.idle_seconds={IDLE}", "relay.retry_schedule=0.5"])
    sinks: list[SmtpSink] = []
    addresses = iter(range(40, 250))

    def sink(**kw) -> tuple[SmtpSink, str]:
        """A remote MX on its own loopback address, and a recipient domain whose MX it is."""
        ip = f"127.0.1.{next(addresses)}"
        s = SmtpSink(host=ip, port=port, **kw).start()
        sinks.append(s)
        rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
        point_mx(dns_server, rdom, ip)
        return s, rdom

    sender = f"s{uuid.uuid4().hex[:8]}.example.test"
    create_domain(server, dns_server, sender)
    yield server, sink, sender, dns_server
    server.stop()
    for s in sinks:
        s.stop()


def delivered(server, rcpt: str) -> dict:
    return wait_for(lambda: next(iter(events(db_url_of(server.data_dir), rcpt, "delivered")), None),
                    timeout=20, what=f"delivered event for {rcpt}")


def test_idle_connection_carries_the_next_message(env):
    server, sink, sender, _ = env
    target, rdom = sink()
    send(server, sender, [f"first@{rdom}"])
    first = target.wait_count(1)[0]
    send(server, sender, [f"second@{rdom}"])  # claimed later, alone: the kept connection takes it
    second = target.wait_count(2)[1]
    assert second.connection == first.connection
    assert target.connections == 1 and target.closed == 0


def test_idle_connection_gives_its_slot_to_another_destination(env):
    server, sink, sender, _ = env
    first, rdom1 = sink()
    send(server, sender, [f"one@{rdom1}"])
    first.wait_count(1)
    wait_for(lambda: first.connections == 1, what="the first connection")
    # relay.workers=1: the second destination gets a connection only when the idle one closes,
    # which happens at once rather than after relay.idle_seconds.
    second, rdom2 = sink()
    started = time.monotonic()
    send(server, sender, [f"two@{rdom2}"])
    second.wait_count(1, timeout=IDLE / 2)
    assert time.monotonic() - started < IDLE / 2
    wait_for(lambda: first.closed == 1, what="the idle connection to close")


def test_connection_falling_idle_while_another_destination_waits_closes_at_once(env):
    server, sink, sender, _ = env
    busy, rdom1 = sink()
    busy.stall_data()  # the one connection is busy, not idle, when the second destination asks
    send(server, sender, [f"first@{rdom1}"])
    wait_for(lambda: busy.stalled_sessions, what="the first delivery in DATA")
    waiting, rdom2 = sink()
    send(server, sender, [f"second@{rdom2}"])
    # Leased: the relay took the row, and its destination task waits for the slot.
    wait_for(lambda: any(r["lease_owner"] for r in queue_rows(db_url_of(server.data_dir), f"second@{rdom2}")),
             what="the second message claimed")
    started = time.monotonic()
    busy.unstall()
    busy.wait_count(1)
    waiting.wait_count(1, timeout=IDLE / 2)  # not after relay.idle_seconds of lingering
    assert time.monotonic() - started < IDLE / 2
    wait_for(lambda: busy.closed == 1, what="the first connection to close")


def test_connection_the_remote_closed_is_replaced(env):
    server, sink, sender, _ = env
    target, rdom = sink(idle_timeout=0.3)  # the remote drops a connection idle for 0.3 s
    send(server, sender, [f"early@{rdom}"])
    target.wait_count(1)
    wait_for(lambda: target.closed == 1, what="the remote to close the idle connection")
    rcpt = f"late@{rdom}"
    send(server, sender, [rcpt])
    got = target.wait_count(2)
    assert got[1].connection != got[0].connection
    assert delivered(server, rcpt)["delivery-status"]["attempt-no"] == 1
    assert not events(db_url_of(server.data_dir), rcpt, "failed")


def test_kept_connection_closed_as_a_message_goes_out_is_retried_at_once(env):
    server, sink, sender, _ = env
    target, rdom = sink()
    target.drop_on_mail_after = 1  # the remote hangs up at MAIL on a connection that carried one
    rcpts = [f"hang{i}@{rdom}" for i in range(3)]
    for i, rcpt in enumerate(rcpts):
        send(server, sender, [rcpt])
        target.wait_count(i + 1)  # one at a time: each later one meets a kept connection
    for rcpt in rcpts:
        assert delivered(server, rcpt)["delivery-status"]["attempt-no"] == 1
        assert not events(db_url_of(server.data_dir), rcpt, "failed")
    assert len({m.connection for m in target.messages}) == 3


def signers(server) -> list[int]:
    return spawned_children(server.proc.pid, b"mailplat.relay.signer")


def test_signing_helper_that_dies_is_replaced_and_no_message_waits(env):
    server, sink, sender, dns = env
    helpers = wait_for(lambda: signers(server), what="the DKIM signing process")
    assert len(helpers) == 1  # relay.signing_processes default
    target, rdom = sink()
    send(server, sender, [f"before@{rdom}"])
    target.wait_count(1)
    os.kill(helpers[0], signal.SIGKILL)
    wait_for(lambda: helpers[0] not in signers(server), what="the helper to be gone")
    rcpts = [f"after{i}@{rdom}" for i in range(5)]
    send(server, sender, rcpts)
    got = target.wait_count(6)
    for m in got:
        assert dkim_verify_perl(m.data, dns.port) == ONE_GOOD_SIGNATURE
    for rcpt in rcpts:
        assert delivered(server, rcpt)["delivery-status"]["attempt-no"] == 1
    replaced = wait_for(lambda: [p for p in signers(server) if p != helpers[0]], what="a new helper")
    assert len(replaced) == 1
    # The new helper signs: a message sent now is signed without the relay's own threads.
    send(server, sender, [f"later@{rdom}"])
    assert dkim_verify_perl(target.wait_count(7)[6].data, dns.port) == ONE_GOOD_SIGNATURE


def test_a_large_message_is_prepared_off_the_event_loop_and_arrives_intact(env):
    """Over client.INLINE_BYTES, the checks, line endings and dot-stuffing run in threads: the
    copy must still arrive byte-identical in its body and carry one good signature."""
    from mailplat.relay import client

    server, sink, sender, dns = env
    target, rdom = sink()
    line = "." + "x" * 70 + "\n"  # every line starts with a dot: all of them are stuffed
    text = line * (2 * client.INLINE_BYTES // len(line))
    send(server, sender, [f"big@{rdom}"], text=text)
    got = target.wait_count(1)[0]
    assert len(got.data) > 2 * client.INLINE_BYTES
    assert got.data.split(b"\r\n").count(b"." + b"x" * 70) == text.count("\n")
    assert dkim_verify_perl(got.data, dns.port) == ONE_GOOD_SIGNATURE


def test_lines_starting_with_a_dot_arrive_intact(env):
    server, sink, sender, dns = env
    target, rdom = sink()
    text = ".hidden line\n.\n..two dots\nlast line\n"
    send(server, sender, [f"dots@{rdom}"], text=text)
    got = target.wait_count(1)[0]
    # The lines went out dot-stuffed and the remote took the dots off again.
    assert b"\r\n.hidden line\r\n.\r\n..two dots\r\n" in got.data
    assert dkim_verify_perl(got.data, dns.port) == ONE_GOOD_SIGNATURE


@pytest.mark.parametrize("pipelining", [True, False])
def test_refusals_leave_the_connection_fit_for_the_next_message(env, pipelining):
    """MAIL, RCPT and DATA go out in one write to a server offering PIPELINING, one by one to
    one that does not; a refused recipient or message is reset and the next one still goes."""
    server, sink, sender, _ = env
    target, rdom = sink(pipelining=pipelining)
    target.rcpt_replies[f"gone@{rdom}"] = "550 5.1.1 No such user"
    target.data_replies = [None, "554 5.6.0 Content refused"]  # the first DATA passes
    rcpts = [f"ok1@{rdom}", f"gone@{rdom}", f"refused@{rdom}", f"ok2@{rdom}"]
    for rcpt in rcpts:
        send(server, sender, [rcpt])
    db = db_url_of(server.data_dir)
    failed = {r: wait_for(lambda r=r: next(iter(events(db, r, "failed")), None), timeout=20,
                          what=f"failed event for {r}") for r in rcpts[1:3]}
    assert failed[f"gone@{rdom}"]["delivery-status"]["code"] == 550
    assert failed[f"refused@{rdom}"]["delivery-status"]["code"] == 554
    got = target.wait_count(2)
    assert sorted(r for m in got for r in m.rcpt_tos) == [f"ok1@{rdom}", f"ok2@{rdom}"]
    assert len({m.connection for m in got}) == 1 and target.connections == 1
