"""The store, on SQLite and on PostgreSQL (`db_url` is parametrised over both): migrations build
exactly the schema the models describe, SQLite runs in WAL with synchronous=FULL, writes are
group-committed yet each job fails alone, unique indexes hold under races, and no database
call runs on the event loop thread."""
from __future__ import annotations

import asyncio
import importlib
import pkgutil
import sqlite3
import subprocess
import sys
import threading
import uuid

import peewee
import pytest
from playhouse.schema_diff import diff_models

import mailplat.store
from mailplat.store import db as storedb
from mailplat.store import models
from tests.support import ROOT


@pytest.fixture
def store(db_url):
    s = storedb.open_store(db_url)
    yield s
    s.close()


def _all_models() -> list[type]:
    """Every table model defined anywhere in mailplat.store (not just the ones listed)."""
    for info in pkgutil.iter_modules(mailplat.store.__path__, "mailplat.store."):
        importlib.import_module(info.name)
    found, stack = [], list(models.BaseModel.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls._meta.fields and not getattr(cls._meta, "extension_module", None):
            found.append(cls)
    return found


def _bounce(domain: str, address: str):
    return models.Bounce.create(domain=domain, address=address)


# -- migrations -------------------------------------------------------------------------------
def test_every_model_is_listed():
    assert set(_all_models()) == set(models.ALL_MODELS)


def test_migrations_build_the_models_schema(db_url):
    s = storedb.Store(db_url)
    try:
        assert s.pending_migrations(), "a fresh store has migrations to apply"
        applied = s.migrate()
        assert applied and applied == sorted(applied)
        assert s.migrate() == [] and s.pending_migrations() == []
        with s.sync() as db:
            diff = diff_models(db, _all_models())
            # The substring index models cannot describe (models.EXTRA_INDEXES) is there, and
            # is the only difference.
            extra = models.EXTRA_INDEXES["postgres" if s.is_postgres else "sqlite"]
            assert {i.name for i in diff.drop_indexes} == extra
            diff = diff._replace(drop_indexes=[])
            assert not diff, f"models differ from the migrated schema:\n{diff}"
            # diff_models compares names and indexes; nullability and primary keys too:
            for model in _all_models():
                columns = {c.name: c for c in db.get_columns(model._meta.table_name)}
                for f in model._meta.sorted_fields:
                    col = columns[f.column_name]
                    assert col.primary_key == f.primary_key, (model.__name__, f.name)
                    if not f.primary_key:
                        assert col.null == f.null, (model.__name__, f.name, "nullability")
    finally:
        s.close()


def test_schema_check_detects_a_difference(db_url):
    """The comparison above can fail: a model with an extra column is reported."""
    s = storedb.open_store(db_url)
    try:
        class Bounce(models.Bounce):
            extra = peewee.IntegerField(null=True)

            class Meta:
                table_name = models.Bounce._meta.table_name

        with s.sync() as db:
            diff = diff_models(db, [Bounce])
        assert diff and "extra" in str(diff)
    finally:
        s.close()


def test_concurrent_migrations_from_separate_processes(db_url):
    """Several services starting at once on a fresh store all migrate it without error."""
    code = ("import sys; from mailplat.store.db import open_store; "
            "s = open_store(sys.argv[1]); s.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [(p.wait(120), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in errors), errors
    s = storedb.Store(db_url)
    try:
        assert s.pending_migrations() == []
    finally:
        s.close()


# -- SQLite durability ------------------------------------------------------------------------
@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_sqlite_wal_and_synchronous_full(store, db_url):
    def pragmas():
        db = models.database.obj
        return {name: db.execute_sql(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys")}

    async def both():
        return await store.read(pragmas), await store.write(pragmas)

    for seen in asyncio.run(both()):  # the read threads' and the writer's connections
        assert seen == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}
    raw = sqlite3.connect(db_url[len("sqlite:///"):])
    try:  # WAL is a property of the file, seen by any other process too
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


# -- group commit -----------------------------------------------------------------------------
def test_group_commit_200_concurrent_writes(store):
    domain = f"g{uuid.uuid4().hex[:8]}.test"

    async def go():
        before = store.commits
        rows = await asyncio.gather(*(store.write(_bounce, domain, f"u{i}@x.test") for i in range(200)))
        return rows, store.commits - before

    rows, commits = asyncio.run(go())
    assert len({r.id for r in rows}) == 200
    assert commits <= 20, f"{commits} commits for 200 writes: not grouped"
    with store.sync():
        count = models.Bounce.select().where(models.Bounce.domain == domain).count()
    assert count == 200


def _hold(started: threading.Event, gate: threading.Event):
    started.set()
    assert gate.wait(30)


def test_failing_job_rolls_back_only_itself(store):
    """Jobs queued while the writer is busy share one transaction; one failing leaves the rest."""
    domain = f"f{uuid.uuid4().hex[:8]}.test"

    def insert_then_fail():
        _bounce(domain, "bad@x.test")
        raise ValueError("job failed after writing")

    async def go():
        started, gate = threading.Event(), threading.Event()
        before = store.commits
        blocker = asyncio.ensure_future(store.write(_hold, started, gate))
        assert await asyncio.to_thread(started.wait, 30)  # the writer is busy with the blocker
        jobs = [asyncio.ensure_future(store.write(_bounce, domain, "a@x.test")),
                asyncio.ensure_future(store.write(insert_then_fail)),
                asyncio.ensure_future(store.write(_bounce, domain, "a@x.test")),  # duplicate
                asyncio.ensure_future(store.write(_bounce, domain, "c@x.test"))]
        await asyncio.sleep(0)  # the jobs' coroutines run and queue their work
        gate.set()
        await blocker
        results = await asyncio.gather(*jobs, return_exceptions=True)
        return results, store.commits - before

    results, commits = asyncio.run(go())
    assert isinstance(results[0], models.Bounce)
    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], storedb.IntegrityError)
    assert isinstance(results[3], models.Bounce)
    assert commits == 2, "the four jobs behind the blocker should share one commit"
    with store.sync():
        got = sorted(b.address for b in models.Bounce.select().where(models.Bounce.domain == domain))
    assert got == ["a@x.test", "c@x.test"]


def _bounces_merged(items: list) -> list:
    """A write_merged function: refuses addresses starting with "no" (writing nothing for
    them), inserts the rest in one statement, and calls how many it was given."""
    calls.append(len(items))
    out = [ValueError(f"refused {a}") if a.startswith("no") else None for _, a in items]
    keep = [(d, a) for (d, a), o in zip(items, out) if o is None]
    if keep:
        models.Bounce.insert_many([{"domain": d, "address": a} for d, a in keep]).execute()
    return [o if o is not None else a for (_, a), o in zip(items, out)]


calls: list[int] = []


def test_merged_jobs_share_one_call_and_fail_alone(store):
    """write_merged jobs queued behind a busy writer run as ONE call; an item the call refuses
    fails alone; a call that raises (a duplicate key) is rolled back and its jobs run one by one,
    so only the duplicate fails."""
    domain = f"m{uuid.uuid4().hex[:8]}.test"

    async def go(addresses):
        started, gate = threading.Event(), threading.Event()
        blocker = asyncio.ensure_future(store.write(_hold, started, gate))
        assert await asyncio.to_thread(started.wait, 30)
        jobs = [asyncio.ensure_future(store.write_merged(_bounces_merged, (domain, a))) for a in addresses]
        await asyncio.sleep(0)
        gate.set()
        await blocker
        return await asyncio.gather(*jobs, return_exceptions=True)

    calls.clear()
    results = asyncio.run(go(["a@x.test", "no@x.test", "b@x.test"]))
    assert results[0] == "a@x.test" and results[2] == "b@x.test"
    assert isinstance(results[1], ValueError) and "no@x.test" in str(results[1])
    assert calls == [3]

    calls.clear()
    results = asyncio.run(go(["c@x.test", "a@x.test", "d@x.test"]))  # a@ exists: the call raises
    assert results[0] == "c@x.test" and results[2] == "d@x.test"
    assert isinstance(results[1], storedb.IntegrityError)
    assert calls == [3, 1, 1, 1]
    with store.sync():
        got = sorted(b.address for b in models.Bounce.select().where(models.Bounce.domain == domain))
    assert got == ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]


def test_insert_rows_returns_ids_in_row_order(store):
    domain = f"i{uuid.uuid4().hex[:8]}.test"

    def insert():
        rows = [{"domain": domain, "address": f"u{i}@x.test"} for i in (3, 1, 2)]
        ids = storedb.insert_rows(models.Bounce, rows, returning_ids=True)
        return [(i, models.Bounce.get_by_id(i).address) for i in ids]

    got = asyncio.run(store.write(insert))
    assert [a for _, a in got] == ["u3@x.test", "u1@x.test", "u2@x.test"]


def test_unique_index_race_exactly_one_wins(store):
    domain = f"r{uuid.uuid4().hex[:8]}.test"

    async def go():
        return await asyncio.gather(*(store.write(_bounce, domain, "same@x.test") for _ in range(2)),
                                    return_exceptions=True)

    results = asyncio.run(go())
    assert sum(isinstance(r, models.Bounce) for r in results) == 1
    assert sum(isinstance(r, storedb.IntegrityError) for r in results) == 1


def test_unique_index_race_across_processes(db_url):
    """Two processes (two stores) insert the same unique row: one wins, one gets IntegrityError."""
    storedb.open_store(db_url).close()
    code = (
        "import sys, asyncio, time\n"
        "from mailplat.store.db import open_store, IntegrityError\n"
        "from mailplat.store.models import Bounce\n"
        "s = open_store(sys.argv[1], migrate=False)\n"
        "sys.stdin.readline()\n"  # both start together
        "try:\n"
        "    s.write_blocking(lambda: Bounce.create(domain='race.test', address='x@race.test'))\n"
        "    print('won')\n"
        "except IntegrityError:\n"
        "    print('integrity')\n"
        "s.close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120) for p in procs]
    assert sorted(o.strip() for o, _ in outs) == ["integrity", "won"], outs


# -- nothing on the event loop ----------------------------------------------------------------
def test_reads_and_writes_leave_the_event_loop(store):
    def where():
        return threading.current_thread().name, models.ApiKey.select().count()

    async def go():
        loop_thread = threading.current_thread().name
        return loop_thread, await store.read(where), await store.write(where)

    loop_thread, (read_thread, _), (write_thread, _) = asyncio.run(go())
    assert read_thread.startswith("store-read") and read_thread != loop_thread
    assert write_thread == "store-writer"


def test_read_sees_committed_write(store):
    domain = f"v{uuid.uuid4().hex[:8]}.test"

    async def go():
        await store.write(_bounce, domain, "seen@x.test")
        return await store.read(
            lambda: [b.address for b in models.Bounce.select().where(models.Bounce.domain == domain)])

    assert asyncio.run(go()) == ["seen@x.test"]


def test_background_writes_yield_to_foreground(db_url):
    """A foreground write submitted behind many background jobs commits in a group that
    carries at most a few of them."""
    import asyncio
    import threading

    from mailplat.store.db import BACKGROUND_PER_GROUP, Store
    from mailplat.store.models import Bounce

    store = Store(db_url)
    store.migrate()
    gate = threading.Event()
    order: list[str] = []

    async def main():
        # The first job holds the writer until everything below is queued behind it.
        blocker = asyncio.ensure_future(store.write(lambda: gate.wait(10)))
        bg = [asyncio.ensure_future(store.write_background(
            lambda i=i: (order.append(f"b{i}"), Bounce.create(domain="bg.test", address=f"{i}@x"))))
            for i in range(20)]
        fg = asyncio.ensure_future(store.write(lambda: order.append("fg")))
        await asyncio.sleep(0)  # let every submission reach the writer's queue
        await asyncio.get_running_loop().run_in_executor(None, gate.set)
        await asyncio.gather(blocker, fg, *bg)

    try:
        asyncio.run(main())
    finally:
        store.close()
    # The blocker's group and the foreground job's group may each carry a share of them.
    assert order.index("fg") <= 2 * BACKGROUND_PER_GROUP
    assert sorted(order) == sorted(["fg"] + [f"b{i}" for i in range(20)])


def test_too_old_sqlite_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(storedb, "MIN_SQLITE", (sqlite3.sqlite_version_info[0] + 1, 0))
    with pytest.raises(storedb.StoreUnsupported, match=r"needs SQLite \d+\.0 or later; this Python has "):
        storedb.make_database(f"sqlite:///{tmp_path / 'old.db'}")
