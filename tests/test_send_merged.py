"""Sends that meet in one write group are stored by one shared call (core.send via
store.write_merged), on SQLite and PostgreSQL: each still gets its own outcome (a missing or
disabled domain refuses only its send, a list recipient is expanded, a suppressed recipient
gets its failed event and no queue row), and every row lands with its own message (events,
their search text and queue rows are matched by the ids the shared INSERTs return)."""
from __future__ import annotations

import asyncio
import threading
import uuid

from mailplat import config as mconfig
from mailplat.core import lists, send
from mailplat.core.context import Context
from mailplat.errors import ForbiddenError, NotFound
from mailplat.store import db as storedb
from mailplat.store.models import Bounce, Domain, Event, EventText, Message, QueueItem


def _ctx(db_url, tmp_path) -> Context:
    cfg = mconfig.from_raw({"server": {"hostname": "mx.example.test"}}, tmp_path, check_files=False)
    return Context(config=cfg, store=storedb.open_store(db_url))


def _hold(started: threading.Event, gate: threading.Event) -> None:
    started.set()
    assert gate.wait(30)


def _mime(sender: str, to: str, subject: str) -> bytes:
    return f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


def test_sends_of_one_group_share_the_write_and_keep_their_own_outcomes(db_url, tmp_path, monkeypatch):
    ctx = _ctx(db_url, tmp_path)
    calls = []
    store_many = send._store_many

    def counted(jobs):
        calls.append(len(jobs))
        return store_many(jobs)

    monkeypatch.setattr(send, "_store_many", counted)
    ours, off = f"o{uuid.uuid4().hex[:8]}.test", f"d{uuid.uuid4().hex[:8]}.test"

    def setup():
        for name, disabled in ((ours, False), (off, True)):
            Domain.create(id=uuid.uuid4().hex[:24], name=name, smtp_login=f"postmaster@{name}",
                          is_disabled=disabled)
        Bounce.create(domain=ours, address="gone@remote.test", code="550", error="no such user")

    async def scenario():
        await ctx.store.write(setup)
        await lists.create_list(ctx, {"address": f"team@{ours}"})
        for member in ("m1@remote.test", "m2@remote.test"):
            await lists.add_member(ctx, f"team@{ours}", {"address": member})

        def request(domain: str, n: int, rcpts: list[str]) -> send.SendRequest:
            return send.SendRequest(domain=domain, source="smtp", mime=_mime(f"app@{domain}", rcpts[0], f"m{n}"),
                                    recipients=rcpts, sender=f"app@{domain}")

        reqs = [request(ours, 0, ["a@remote.test", "b@remote.test"]),
                request(f"missing-{ours}", 1, ["a@remote.test"]),
                request(ours, 2, ["gone@remote.test", "c@remote.test"]),
                request(off, 3, ["a@remote.test"]),
                request(ours, 4, [f"team@{ours}"])]
        reqs += [request(ours, n, [f"x{n}@remote.test"]) for n in range(5, 25)]
        started, gate = threading.Event(), threading.Event()
        blocker = asyncio.ensure_future(ctx.store.write(_hold, started, gate))
        assert await asyncio.to_thread(started.wait, 30)
        sends = [asyncio.ensure_future(send.submit(ctx, r)) for r in reqs]
        await asyncio.sleep(0)
        gate.set()
        await blocker
        return await asyncio.gather(*sends, return_exceptions=True)

    results = asyncio.run(scenario())
    assert isinstance(results[1], NotFound)
    assert isinstance(results[3], ForbiddenError)
    assert all(isinstance(r, send.SendResult) for i, r in enumerate(results) if i not in (1, 3)), results
    # All 25 sends share one call; the list send is stored again alone after its expansion.
    assert calls == [25, 1], calls

    def rows():
        msgs = {m.message_id: m for m in Message.select().where(Message.domain == ours)}
        queue = {}
        for q in QueueItem.select():
            queue.setdefault(q.message_id, []).append(q.recipient)
        evs = [(e.data, t.subject) for e, t in
               ((e, EventText.get(EventText.event == e.id)) for e in Event.select().where(Event.domain == ours))]
        return msgs, queue, evs

    with ctx.store.sync():
        msgs, queue, evs = rows()
    by_subject = {m.subject: m for m in msgs.values()}
    assert set(by_subject) == {f"m{n}" for n in (0, 2, 4, *range(5, 25))}
    for n in range(5, 25):
        assert queue[by_subject[f"m{n}"].id] == [f"x{n}@remote.test"]
    assert sorted(queue[by_subject["m0"].id]) == ["a@remote.test", "b@remote.test"]
    assert queue[by_subject["m2"].id] == ["c@remote.test"]  # gone@ is bounced: not queued
    assert sorted(queue[by_subject["m4"].id]) == ["m1@remote.test", "m2@remote.test"]
    # Every event belongs to its message, and its search text is its own.
    for data, text_subject in evs:
        assert data["message"]["headers"]["subject"].lower() == text_subject
        message = msgs[data["message"]["headers"]["message-id"]]
        if data["event"] == "failed":
            assert (data["recipient"], data["reason"], message.subject) == ("gone@remote.test", "suppress-bounce", "m2")
        else:
            assert data["event"] == "accepted"
            assert data["recipient"] in queue[message.id] + ["gone@remote.test"]
    assert len([e for e, _ in evs if e["event"] == "accepted"]) == 2 + 2 + 2 + 20
    ctx.store.close()
