"""The relay's attempt limit over real sockets: a recipient whose MX keeps answering 4xx fails
permanently with reason "maxfails" on the attempt that reaches relay.max_attempts (no bounce
added), and the legacy `drop` webhook posts it as dropped, reason maxfails; a 5xx hard bounce
is dropped as hardfail.  The lifetime's reason "old" is tested in test_relay_schedule."""
from __future__ import annotations

import uuid
from urllib.parse import parse_qs

import pytest

from tests.conftest import dns_sets
from tests.relaytest import bounces, create_domain, db_url_of, events, point_mx, queue_rows, send
from tests.smtpsink import SmtpSink
from tests.support import start_server, wait_for
from tests.webhookrecv import HookReceiver

pytestmark = pytest.mark.timeout(120)
MAX_ATTEMPTS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    sink = SmtpSink().start()
    rec = HookReceiver()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}",
                                   "relay.retry_schedule=0.2", f"relay.max_attempts={MAX_ATTEMPTS}",
                                   "hooks.allow_private_targets=true"]
    server = start_server(tmp_path_factory.mktemp("relay-maxfails") / "data", sets=sets)
    sender = f"s{uuid.uuid4().hex[:8]}.example.test"
    create_domain(server, dns_server, sender)
    r = server.api("POST", f"/v3/domains/{sender}/webhooks", data={"id": "drop", "url": rec.url("/drop")})
    assert r.status_code == 200, r.text
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    point_mx(dns_server, rdom, "127.0.0.1")
    yield {"server": server, "sink": sink, "rec": rec, "sender": sender, "rdom": rdom,
           "db": db_url_of(server.data_dir)}
    server.stop()
    sink.stop()
    rec.close()


def drops_for(env, rcpt: str) -> list[dict]:
    posts = [parse_qs(p["body"].decode()) for p in env["rec"].to("/drop")]
    return [p for p in posts if p["recipient"] == [rcpt]]


def test_temporary_failures_up_to_max_attempts_become_maxfails(env):
    rcpt = f"full@{env['rdom']}"
    env["sink"].rcpt_replies[rcpt] = "452 4.2.2 Mailbox full, try later"
    send(env["server"], env["sender"], [rcpt])
    final = wait_for(lambda: [e for e in events(env["db"], rcpt, "failed") if e["severity"] == "permanent"],
                     timeout=30, what="permanent failure")[0]
    assert final["reason"] == "maxfails"
    assert final["delivery-status"]["attempt-no"] == MAX_ATTEMPTS
    assert final["delivery-status"]["code"] == 452
    assert f"after {MAX_ATTEMPTS} attempts" in final["delivery-status"]["description"]
    temporary = [e for e in events(env["db"], rcpt, "failed") if e["severity"] == "temporary"]
    assert [e["delivery-status"]["attempt-no"] for e in sorted(temporary, key=lambda e: e["timestamp"])] \
        == list(range(1, MAX_ATTEMPTS))
    row = queue_rows(env["db"], rcpt)[0]
    assert row["state"] == "failed" and row["attempts"] == MAX_ATTEMPTS
    assert all(b["address"] != rcpt for b in bounces(env["db"], env["sender"]))
    drop = wait_for(lambda: drops_for(env, rcpt), timeout=20, what="the legacy drop post")[0]
    assert drop["event"] == ["dropped"] and drop["reason"] == ["maxfails"] and drop["code"] == ["452"]


def test_a_bounced_address_is_dropped_as_hardfail(env):
    """A hard bounce is a `bounce` post (not registered here); mail to the address afterwards is
    dropped, reason hardfail."""
    rcpt = f"gone@{env['rdom']}"
    env["sink"].rcpt_replies[rcpt] = "550 5.1.1 No such user"
    send(env["server"], env["sender"], [rcpt])
    first = wait_for(lambda: events(env["db"], rcpt, "failed"), timeout=20, what="the bounce")[0]
    assert first["severity"] == "permanent" and first["reason"] == "bounce"
    assert first["delivery-status"]["attempt-no"] == 1
    wait_for(lambda: [b for b in bounces(env["db"], env["sender"]) if b["address"] == rcpt],
             timeout=10, what="the bounce entry")
    send(env["server"], env["sender"], [rcpt])
    drop = wait_for(lambda: drops_for(env, rcpt), timeout=20, what="the legacy drop post")[0]
    assert drop["event"] == ["dropped"] and drop["reason"] == ["hardfail"]
    assert len(drops_for(env, rcpt)) == 1
