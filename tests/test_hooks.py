"""The hooks outbox and the egress guard on a real socket (store on SQLite and PostgreSQL): a
post to a loopback receiver is refused at connect time unless private targets are allowed
(also through a host name resolving to loopback), allowed posts are delivered once with their
body and content type, and a 406 is final while other failures are retried on schedule."""
from __future__ import annotations

import asyncio

from mailplat import config as mconfig
from mailplat.core import egress
from mailplat.core.context import Context
from mailplat.core.routejobs import enqueue_post_sync
from mailplat.hooks import outbox
from mailplat.store import db as storedb
from mailplat.store.route_models import OutboxItem
from tests.test_routes import Receiver


def _ctx(db_url, tmp_path, allow: bool) -> Context:
    cfg = mconfig.from_raw({"hooks": {"allow_private_targets": allow, "retry_schedule": [0.01],
                                      "max_attempts": 2, "timeout": 5.0}}, tmp_path, check_files=False)
    return Context(config=cfg, store=storedb.open_store(db_url))


def _run(ctx, allow: bool, rounds: int = 1):
    async def go():
        async with egress.session(allow, 5.0) as session:
            for _ in range(rounds):
                await outbox.deliver_due(ctx, session)
                await asyncio.sleep(0.02)  # let the 10 ms retry come due (the injected schedule)
    asyncio.run(go())


def _rows(ctx):
    async def read():
        return await ctx.store.read(lambda: [(r.url, r.state, r.attempts, r.last_status, r.last_error)
                                             for r in OutboxItem.select().order_by(OutboxItem.id)])
    return asyncio.run(read())


def _enqueue(ctx, url, body=b"a=1", ctype="application/x-www-form-urlencoded"):
    async def write():
        await ctx.store.write(enqueue_post_sync, "route", url, body, ctype, "d.test", ctx.clock())
    asyncio.run(write())


def test_egress_guard_refuses_loopback_on_connect(db_url, tmp_path):
    rec = Receiver()
    ctx = _ctx(db_url, tmp_path, allow=False)
    try:
        _enqueue(ctx, rec.url("/a"))
        _enqueue(ctx, f"http://localhost:{rec.port}/b")  # a name that resolves inside
        _run(ctx, allow=False, rounds=3)
        rows = _rows(ctx)
        assert [(r[1], r[2], r[3]) for r in rows] == [("failed", 2, None), ("failed", 2, None)]
        assert all("may not call" in r[4] for r in rows)
        assert rec.posts == []
    finally:
        rec.close()
        ctx.store.close()


def test_allowed_posts_are_delivered_and_406_is_final(db_url, tmp_path):
    rec = Receiver()
    rec.status["/no"] = [406]
    ctx = _ctx(db_url, tmp_path, allow=True)
    try:
        _enqueue(ctx, rec.url("/ok"), b"x=\xc3\xa9", "application/x-www-form-urlencoded; charset=utf-8")
        _enqueue(ctx, rec.url("/no"))
        _run(ctx, allow=True, rounds=3)
        assert [(r[1], r[2], r[3]) for r in _rows(ctx)] == [("delivered", 1, 200), ("rejected", 1, 406)]
        ok = rec.to("/ok")
        assert len(ok) == 1 and ok[0]["body"] == b"x=\xc3\xa9"
        assert ok[0]["ctype"] == "application/x-www-form-urlencoded; charset=utf-8"
        assert len(rec.to("/no")) == 1
    finally:
        rec.close()
        ctx.store.close()
