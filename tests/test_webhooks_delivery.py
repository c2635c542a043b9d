"""Webhook delivery through the hooks outbox, on SQLite and PostgreSQL, with an injected clock:
the outbox row is written in the transaction that records the event; the JSON post carries
Mailgun's signature and our whole-body HMAC header; userinfo URLs get Basic auth; retries
follow the seed's schedule (three 10-minute waits, then four 30-minute ones) and then stop;
406 stops at once; a delivered event is posted once; legacy ids get form posts; failed posts
can be replayed."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from urllib.parse import parse_qs

import pytest

from mailplat import config as mconfig
from mailplat.core import egress, events, signing, webhooks
from mailplat.core.context import Context
from mailplat.hooks import outbox
from mailplat.store import db as storedb
from mailplat.store.models import Domain
from mailplat.store.route_models import OutboxItem
from mailplat.store.tracking_models import Webhook
from tests.webhookrecv import HookReceiver


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def env(db_url, tmp_path):
    cfg = mconfig.from_raw({"hooks": {"allow_private_targets": True, "timeout": 5.0}}, tmp_path, check_files=False)
    clock = Clock()
    ctx = Context(config=cfg, store=storedb.open_store(db_url), clock=clock)
    rec = HookReceiver()
    webhooks.invalidate()
    yield ctx, clock, rec
    rec.close()
    ctx.store.close()
    webhooks.invalidate()


def run(coro):
    return asyncio.run(coro)


def deliver(ctx):
    async def go():
        async with egress.session(True, 5.0) as session:
            return await outbox.deliver_due(ctx, session)
    return run(go())


def setup_domain(ctx, hooks: dict[str, list[str]]):
    def write():
        Domain.create(id="d1", name="hooks.test", smtp_login="postmaster@hooks.test")
        for kind, urls in hooks.items():
            Webhook.create(domain="hooks.test", kind=kind, urls=urls)
    run(ctx.store.write(write))


def record(ctx, kind, **kw):
    data = events.build(kind, None, "rcpt@x.test", timestamp=ctx.clock(), **kw)

    def write():
        events.record_sync("hooks.test", data)
        # Same transaction: the outbox rows are already there before the commit.
        return OutboxItem.select().where(OutboxItem.domain == "hooks.test").count()
    return data, run(ctx.store.write(write))


def rows(ctx):
    return run(ctx.store.read(lambda: [(r.kind, r.state, r.attempts, r.next_attempt_at, r.last_status)
                                       for r in OutboxItem.select().order_by(OutboxItem.id)]))


def test_json_post_signature_body_hmac_and_basic_auth(env):
    ctx, clock, rec = env
    setup_domain(ctx, {"permanent_fail": [rec.url("/pf", "user:p%40ss")], "temporary_fail": [rec.url("/tf")]})
    data, n = record(ctx, "failed", severity="permanent", reason="bounce",
                     delivery_status={"code": 550, "message": "no such user"})
    assert n == 1  # permanent_fail only; nothing for temporary_fail
    assert deliver(ctx) == 1
    post = rec.to("/pf")[0]
    key = run(signing.get_key(ctx))
    body = json.loads(post["body"])
    sig = body["signature"]
    assert sig["signature"] == hmac.new(key.encode(), (sig["timestamp"] + sig["token"]).encode(),
                                        hashlib.sha256).hexdigest()
    assert len(sig["token"]) == 50 and sig["timestamp"] == str(int(clock.t))
    assert body["event-data"]["id"] == data["id"] and body["event-data"]["severity"] == "permanent"
    expected = "sha256=" + hmac.new(key.encode(), post["body"], hashlib.sha256).hexdigest()
    assert post["headers"]["X-Mailplat-Signature"] == expected
    assert post["headers"]["Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert post["headers"]["Content-Type"] == "application/json"
    assert [r[1] for r in rows(ctx)] == ["delivered"]


def test_retry_schedule_then_give_up(env):
    ctx, clock, rec = env
    rec.status["/down"] = [500]
    setup_domain(ctx, {"opened": [rec.url("/down")]})
    record(ctx, "opened")
    waits = []
    for _ in range(12):
        deliver(ctx)
        kind, state, attempts, next_at, status = rows(ctx)[0]
        if state != "queued":
            break
        waits.append(round(next_at - clock.t))
        # Not due a second early.
        clock.t = next_at - 1
        assert deliver(ctx) == 0
        clock.t = next_at
    assert waits == [600, 600, 600, 1800, 1800, 1800, 1800]
    assert rows(ctx)[0][1:3] == ("failed", 8)
    assert len(rec.to("/down")) == 8
    # The CLI's replay puts failed webhook posts back in the queue.
    rec.status["/down"] = [200]
    assert run(ctx.store.write(webhooks.replay_failed_sync, "hooks.test", None, clock.t)) == 1
    deliver(ctx)
    assert rows(ctx)[0][1] == "delivered"


def test_406_stops_and_delivered_is_posted_once(env):
    ctx, clock, rec = env
    rec.status["/reject"] = [406]
    rec.status["/dl"] = [503]
    setup_domain(ctx, {"clicked": [rec.url("/reject")], "delivered": [rec.url("/dl")]})
    record(ctx, "clicked", extra={"url": "https://x.test/"})
    record(ctx, "delivered")
    deliver(ctx)
    clock.t += 7200
    deliver(ctx)
    got = {r[0]: r for r in rows(ctx)}
    assert got["webhook"][1:3] == ("rejected", 1)
    assert got["webhook-once"][1:3] == ("failed", 1)
    assert len(rec.to("/reject")) == 1 and len(rec.to("/dl")) == 1


def test_legacy_form_posts(env):
    ctx, clock, rec = env
    setup_domain(ctx, {"drop": [rec.url("/drop")], "bounce": [rec.url("/bounce")], "deliver": [rec.url("/deliver")]})
    record(ctx, "failed", severity="permanent", reason="suppress-bounce",
           delivery_status={"code": 605, "message": "Not delivering to previously bounced address"})
    record(ctx, "failed", severity="permanent", reason="bounce",
           delivery_status={"code": 550, "message": "5.1.1 no such user"})
    deliver(ctx)
    key = run(signing.get_key(ctx))
    drop = parse_qs(rec.to("/drop")[0]["body"].decode())
    assert drop["event"] == ["dropped"] and drop["reason"] == ["hardfail"] and drop["recipient"] == ["rcpt@x.test"]
    assert signing.verify(key, drop["timestamp"][0], drop["token"][0], drop["signature"][0])
    bounce = parse_qs(rec.to("/bounce")[0]["body"].decode())
    assert bounce["event"] == ["bounced"] and bounce["code"] == ["550"] and "no such user" in bounce["error"][0]
    assert rec.to("/bounce")[0]["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert rec.to("/deliver") == []
