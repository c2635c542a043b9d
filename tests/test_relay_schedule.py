"""Relay scheduling against an injected clock: o:deliverytime is honoured, and a temporary
failure past the queue lifetime becomes permanent.  The relay process reads its clock offset
from MAILPLAT_TEST_CLOCK_FILE (a test-only hook: time.time() plus the seconds in the file)."""
from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import dns_sets
from tests.relaytest import bounces, create_domain, db_url_of, events, point_mx, queue_rows, send
from tests.smtpsink import SmtpSink
from tests.support import start_server, wait_for

pytestmark = pytest.mark.timeout(120)
LIFETIME = 3600


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    tmp = tmp_path_factory.mktemp("relay-clock")
    clock = tmp / "clock"
    clock.write_text("0")
    sink = SmtpSink().start()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                   "relay.retry_schedule=0.5", f"relay.max_lifetime_seconds={LIFETIME}"]
    server = start_server(tmp / "data", sets=sets, env={"MAILPLAT_TEST_CLOCK_FILE": str(clock)})
    sender = f"s{uuid.uuid4().hex[:8]}.example.test"
    create_domain(server, dns_server, sender)
    yield {"server": server, "sink": sink, "clock": clock, "dns": dns_server, "sender": sender,
           "db": db_url_of(server.data_dir)}
    server.stop()
    sink.stop()


def advance(env, seconds: float) -> None:
    offset = float(env["clock"].read_text()) + seconds
    env["clock"].write_text(repr(offset))


@pytest.fixture(autouse=True)
def reset_clock(env):
    """Each test starts with the relay's clock at real time (the send path uses real time)."""
    env["clock"].write_text("0")


def rcpt_domain(env) -> str:
    name = f"r{uuid.uuid4().hex[:8]}.example.test"
    point_mx(env["dns"], name, "127.0.0.1")
    return name


def test_scheduled_mail_is_not_sent_before_its_time(env):
    rdom = rcpt_domain(env)
    later, now_rcpt = f"later@{rdom}", f"now@{rdom}"
    deliver_at = time.time() + 2 * 3600
    send(env["server"], env["sender"], [later], subject="scheduled", deliver_at=deliver_at)
    send(env["server"], env["sender"], [now_rcpt], subject="immediate")
    # The relay is running and delivering: the immediate one arrives, the scheduled one waits.
    wait_for(lambda: env["sink"].to(now_rcpt), timeout=20, what="the immediate message")
    advance(env, 3600)  # one hour on: still an hour early
    wait_for(lambda: queue_rows(env["db"], later)[0]["next_attempt_at"] == pytest.approx(deliver_at),
             timeout=5, what="the scheduled row")
    send(env["server"], env["sender"], [f"probe@{rdom}"], subject="probe")
    wait_for(lambda: env["sink"].to(f"probe@{rdom}"), timeout=20, what="a message sent after the clock moved")
    assert env["sink"].to(later) == []
    row = queue_rows(env["db"], later)[0]
    assert row["state"] == "queued" and row["attempts"] == 0
    advance(env, 3600 + 5)  # past the delivery time
    got = wait_for(lambda: env["sink"].to(later), timeout=20, what="the scheduled message")
    assert len(got) == 1
    delivered = wait_for(lambda: events(env["db"], later, "delivered"), timeout=10, what="delivered event")
    assert delivered[0]["timestamp"] >= deliver_at


def test_temporary_failures_past_the_lifetime_become_permanent(env):
    rdom = rcpt_domain(env)
    rcpt = f"slow@{rdom}"
    env["sink"].rcpt_replies[rcpt] = "452 4.2.2 Mailbox full, try later"
    send(env["server"], env["sender"], [rcpt])
    first = wait_for(lambda: events(env["db"], rcpt, "failed"), timeout=20, what="first failure")[0]
    assert first["severity"] == "temporary"
    advance(env, LIFETIME + 1)
    final = wait_for(lambda: [e for e in events(env["db"], rcpt, "failed") if e["severity"] == "permanent"],
                     timeout=20, what="permanent failure")[0]
    assert final["reason"] == "old"
    assert "queue lifetime" in final["delivery-status"]["description"]
    assert queue_rows(env["db"], rcpt)[0]["state"] == "failed"
    assert all(b["address"] != rcpt for b in bounces(env["db"], env["sender"]))
