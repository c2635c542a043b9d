"""The store's connection and its async API: the only place that decides how database calls
leave the event loop.

Mechanism (chosen once, here): peewee runs in threads.
- Reads go to a small thread pool (`Store.read`), each thread with its own connection.
- Writes go to ONE writer thread (`Store.write`) that practises group commit: it takes every
  write job waiting in its queue, runs each inside its own savepoint in one transaction, and
  commits once.  A job's future resolves only after that commit returned, so "200"/"250" said
  after `await store.write(...)` means the data is on disk (SQLite WAL + synchronous=FULL;
  PostgreSQL's default synchronous_commit).  A failing job rolls back only its savepoint.
  `Store.write_merged` lets the jobs of one kind that meet in a group share one call (and so
  one statement per table: core.send's sends); if that call fails, each of its jobs is run
  again alone, in its own savepoint.
  `Store.write_background` is the same for work nobody is waiting on (inbound delivery, relay
  outcomes): each group takes every waiting foreground job but only a few background ones, so
  a heavy background batch never sits in front of an SMTP client's 250 for long.
- SQLite write groups start with BEGIN IMMEDIATE (several processes may share the file: the
  lock is taken, and waited for, before any statement runs), and a checkpointer thread copies
  the WAL back into the database off the commit path.  Writers of several processes take turns
  through a file lock (<db>.write-lock) held around each group: a waiting writer is woken the
  moment the other commits, where SQLite's own busy wait would sleep 1, 2, 5... ms.
- Synchronous callers (CLI, migrations, worker threads) use `Store.sync()`.

SQLite is the default (a file in the data dir); PostgreSQL comes from a postgresql:// URL.
"""
from __future__ import annotations

import asyncio
import fcntl
import queue
import sqlite3
from collections import deque
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urlparse

import peewee
from playhouse.migrations import Runner

from . import models

T = TypeVar("T")
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MAX_GROUP = 512
BACKGROUND_PER_GROUP = 2  # background jobs joined to a group that has foreground jobs
CHECKPOINT_SECONDS = 1.0
MIGRATION_LOCK_ID = 0x6D61696C706C6174  # 'mailplat'
MIN_SQLITE = (3, 35)

IntegrityError = peewee.IntegrityError
DoesNotExist = peewee.DoesNotExist


class StoreUnsupported(Exception):
    """The database cannot hold mailplat's store (too old a SQLite)."""


def make_database(url: str) -> peewee.Database:
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        if sqlite3.sqlite_version_info < MIN_SQLITE:  # RETURNING (3.35), FTS5 trigram (3.34)
            raise StoreUnsupported(f"mailplat needs SQLite {'.'.join(map(str, MIN_SQLITE))} or later; "
                               f"this Python has {sqlite3.sqlite_version}")
        path = url[len("sqlite:///"):]
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return peewee.SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "synchronous": 2,  # FULL: a commit is durable against power loss
                "foreign_keys": 1,
                "busy_timeout": 30000,
                "cache_size": -32000,
                # The checkpointer thread keeps the WAL short; this is only the backstop.
                "wal_autocheckpoint": 20000,
            },
            timeout=30,
        )
    if parsed.scheme in ("postgresql", "postgres"):
        return peewee.PostgresqlDatabase(
            unquote(parsed.path.lstrip("/")) or "postgres",
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname or None,
            port=parsed.port or None,
            autorollback=True,
            # peewee maps FloatField to REAL (float32) on PostgreSQL: epoch times would lose
            # ~2 minutes of precision.  Every float here is a time or a score: store doubles.
            field_types={"FLOAT": "DOUBLE PRECISION"},
        )
    raise ValueError(f"unsupported database URL scheme {parsed.scheme!r}")


class Store:
    """One per process. `models` are bound to it when it opens."""

    def __init__(self, url: str, read_threads: int = 4):
        self.url = url
        self.db = make_database(url)
        self.is_postgres = isinstance(self.db, peewee.PostgresqlDatabase)
        models.database.initialize(self.db)
        _insert_sql.clear()  # kept SQL text is in the previous database's dialect
        self._reads = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="store-read")
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._write_lock = () if self.is_postgres else ("IMMEDIATE",)
        self._turns = None  # SQLite file: the writers' turn lock, opened by the writer thread
        self._checkpointer: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self.commits = 0  # number of transactions the writer committed (bench/diagnostics)

    # -- lifecycle -------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply pending migrations.  Several processes (one per service) may start at once on
        a fresh store, so the runner holds a lock across all of them: a file lock next to the
        SQLite file, or a PostgreSQL advisory lock."""
        with self.db.connection_context(), self._migration_lock():
            return Runner(self.db, str(MIGRATIONS_DIR)).up()

    @contextmanager
    def _migration_lock(self):
        if self.is_postgres:
            self.db.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
            try:
                yield
            finally:
                self.db.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
            return
        path = self.db.database
        if path == ":memory:":
            yield
            return
        with open(f"{path}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def pending_migrations(self) -> list[str]:
        with self.db.connection_context():
            return [m.name for m in Runner(self.db, str(MIGRATIONS_DIR)).status() if not m.applied]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._writer is not None:
            self._jobs.put(_STOP)
            self._writer.join()
        if self._checkpointer is not None:
            self._checkpointer.join()
        if self._turns is not None:
            self._turns.close()
        self._reads.shutdown(wait=True)
        if not self.db.is_closed():
            self.db.close()

    # -- synchronous access ----------------------------------------------------------------
    @contextmanager
    def sync(self):
        """Connection for synchronous code (CLI, background threads); a transaction per block."""
        self.db.connect(reuse_if_open=True)
        with self.db.atomic():
            yield self.db

    # -- async access ----------------------------------------------------------------------
    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in a read thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reads, self._run_read, fn, args)

    def _run_read(self, fn, args):
        self.db.connect(reuse_if_open=True)
        with self.db.atomic():
            return fn(*args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the writer thread; returns after its transaction is committed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._submit(fn, args, (loop, fut))
        return await fut

    async def write_merged(self, fn_many: Callable[[list], list], item: Any) -> Any:
        """As `write`, for a job that may share ONE call with the other jobs of `fn_many` in its
        group: the writer runs `fn_many([item, ...])` in one savepoint, and each caller gets its
        own entry of the returned list, or has it raised when that entry is an exception
        (`fn_many` must then have written nothing for that item).  When the shared call raises,
        each item is run alone in a savepoint of its own, so a failure stays its own job's."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._submit(_Merged(fn_many), (item,), (loop, fut))
        return await fut

    async def write_background(self, fn: Callable[..., T], *args: Any) -> T:
        """As `write`, for work no client waits on: it yields to foreground writes."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._submit(fn, args, (loop, fut), background=True)
        return await fut

    def write_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """As `write`, for code running in a thread (not the event loop)."""
        fut: Future = Future()
        self._submit(fn, args, fut)
        return fut.result()

    def _submit(self, fn, args, fut, background: bool = False) -> None:
        if self._closed:
            raise RuntimeError("store is closed")
        if self._writer is None:
            with _start_lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._writer_loop, name="store-writer",
                                                     daemon=True)
                    self._writer.start()
                    if not self.is_postgres and self.db.database != ":memory:":
                        self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                                              name="store-checkpoint", daemon=True)
                        self._checkpointer.start()
        self._jobs.put((fn, args, fut, background))

    def _writer_loop(self) -> None:
        stop = False
        waiting: deque = deque()  # background jobs not yet run
        while not stop or waiting:
            foreground: list = []
            job = None
            if not waiting and not stop:
                job = self._jobs.get()
            while True:
                if job is None:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                if job is _STOP:
                    stop = True
                elif job[3]:
                    waiting.append(job)
                else:
                    foreground.append(job)
                job = None
                if len(foreground) >= MAX_GROUP:
                    break
            share = BACKGROUND_PER_GROUP if foreground else MAX_GROUP
            batch = foreground + [waiting.popleft() for _ in range(min(share, len(waiting)))]
            if batch:
                self._run_group(batch)

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database file once a second, on a connection of its own."""
        import sqlite3
        conn = sqlite3.connect(self.db.database, timeout=30)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            while not self._stop.wait(CHECKPOINT_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # busy or locked: the next round (or the backstop) checkpoints
        finally:
            conn.close()

    def _run_group(self, batch) -> None:
        results: list[tuple[Future, bool, Any]] = []
        attempt = 0
        while True:
            attempt += 1
            results.clear()
            try:
                self.db.connect(reuse_if_open=True)
                with self._turn(), self.db.atomic(*self._write_lock):
                    for unit in _units(batch):
                        if isinstance(unit, list):
                            self._run_merged(unit, results)
                            continue
                        fn, args, fut, _ = unit
                        try:
                            with self.db.atomic():  # savepoint: one job's failure is its own
                                results.append((fut, True, fn(*args)))
                        except Exception as exc:  # noqa: BLE001 - handed to the job's caller
                            results.append((fut, False, exc))
                self.commits += 1
                break
            except peewee.OperationalError as exc:
                # SQLite "database is locked" from another process: retry the whole group.
                if attempt < 5 and "locked" in str(exc):
                    time.sleep(0.05 * attempt)
                    continue
                results = [(fut, False, exc) for _, _, fut, _ in batch]
                self._reset_connection()
                break
            except Exception as exc:  # noqa: BLE001 - commit failed: every job fails
                results = [(fut, False, exc) for _, _, fut, _ in batch]
                self._reset_connection()
                break
        # Event-loop callers' futures are resolved with ONE wake-up of their loop per group
        # (not one thread-safe call per job); threads' concurrent futures directly.
        by_loop: dict = {}
        for fut, ok, value in results:
            if isinstance(fut, tuple):
                by_loop.setdefault(fut[0], []).append((fut[1], ok, value))
            elif ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    @contextmanager
    def _turn(self):
        """This process's turn to write (SQLite file stores; a no-op otherwise)."""
        if self.is_postgres or self.db.database == ":memory:":
            yield
            return
        if self._turns is None:
            self._turns = open(f"{self.db.database}.write-lock", "a")
        fcntl.flock(self._turns, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turns, fcntl.LOCK_UN)

    def _run_merged(self, jobs: list, results: list) -> None:
        """One call of a write_merged function for `jobs` (same function), in one savepoint."""
        try:
            with self.db.atomic():
                outs = jobs[0][0].fn([args[0] for _, args, _, _ in jobs])
                if len(outs) != len(jobs):
                    raise RuntimeError(f"{jobs[0][0].fn.__name__} returned {len(outs)} results for {len(jobs)} jobs")
        except Exception as exc:  # noqa: BLE001 - rolled back: the jobs run again one by one
            if len(jobs) == 1:
                results.append((jobs[0][2], False, exc))
                return
            for job in jobs:
                self._run_merged([job], results)
            return
        for job, out in zip(jobs, outs):
            results.append((job[2], not isinstance(out, BaseException), out))

    def _reset_connection(self) -> None:
        try:
            if not self.db.is_closed():
                self.db.close()
        except Exception:  # noqa: BLE001 - the connection is being thrown away
            pass


# -- hot-path inserts --------------------------------------------------------------------------
# peewee builds an INSERT's SQL text anew on every call (a third of the send path's CPU); these
# keep the text per (model, columns, rows, options) and only convert values with the fields'
# own db_value, so the statement and parameters are the ones peewee itself would send.
_insert_sql: dict = {}
# Fields whose db_value hands back a value of exactly this type unchanged: such values skip the
# call (most of a send's ~40 parameters).  Subclasses (JSONField...) are not listed: they convert.
_UNCHANGED = {peewee.CharField: str, peewee.TextField: str, peewee.IntegerField: int,
              peewee.BigIntegerField: int, peewee.AutoField: int, peewee.FloatField: float,
              peewee.BooleanField: bool}


def insert_rows(model, rows: list[dict], *, ignore_conflicts: bool = False, returning_ids: bool = False,
                refresh: str | None = None):
    """INSERT `rows` (dicts with the same keys; missing fields get their defaults) in one
    statement, inside the caller's transaction.  Returns the new rows' ids in the order of
    `rows` when `returning_ids` (RETURNING, on SQLite 3.35 and later too), else None.  With
    `ignore_conflicts`, a row whose primary key exists is left as it is, except that on
    PostgreSQL its `refresh` column (if given) takes the new value (store.blobs: this locks
    the row against a concurrent garbage collection)."""
    meta = model._meta
    db = meta.database
    names = tuple(rows[0])
    key = (model, names, len(rows), ignore_conflicts, returning_ids, refresh)
    cached = _insert_sql.get(key)
    if cached is None:
        defaults = [(f.name, d) for f, d in meta.defaults.items() if f.name not in rows[0]]
        cols = names + tuple(n for n, _ in defaults)
        fields = [meta.fields[n] for n in cols]
        p = db.param
        one = "(" + ", ".join([p] * len(cols)) + ")"
        sql = (f'INSERT INTO "{meta.table_name}" (' + ", ".join(f'"{f.column_name}"' for f in fields)
               + ") VALUES " + ", ".join([one] * len(rows)))
        postgres = isinstance(getattr(db, "obj", db), peewee.PostgresqlDatabase)
        if ignore_conflicts and refresh and postgres:
            col = meta.fields[refresh].column_name
            sql += f' ON CONFLICT ("{meta.primary_key.column_name}") DO UPDATE SET "{col}" = EXCLUDED."{col}"'
        elif ignore_conflicts:
            sql += " ON CONFLICT DO NOTHING"
        if returning_ids:
            sql += f' RETURNING "{meta.primary_key.column_name}"'
        if len(_insert_sql) > 1000:
            _insert_sql.clear()
        cached = _insert_sql[key] = (sql, [(_UNCHANGED.get(type(f)), f.db_value) for f in fields],
                                     defaults)
    sql, converters, defaults = cached
    params = []
    for row in rows:
        values = [row[n] for n in names]
        if defaults:
            values += [d() if callable(d) else d for _, d in defaults]
        params += [v if type(v) is kind else conv(v) for (kind, conv), v in zip(converters, values)]
    cursor = db.execute_sql(sql, params)
    return [row[0] for row in cursor.fetchall()] if returning_ids else None


def _cached_sql(key, build: Callable[[], Any], params: list) -> str:
    sql = _insert_sql.get(key)
    if sql is None:
        sql, built = build().sql()
        if len(built) != len(params):  # a caller's bug: its key or parameters do not fit the query
            raise ValueError(f"cached query {key!r}: it takes {len(built)} parameters, not {len(params)}")
        if len(_insert_sql) > 1000:
            _insert_sql.clear()
        _insert_sql[key] = sql
    return sql


def run_cached(key, build: Callable[[], Any], params: list):
    """Execute the query `build()` makes, its SQL text kept under `key` after the first call
    (the key names everything that shapes the text: e.g. the length of an IN list), with
    `params` in the order the built query places them.  Returns the cursor."""
    return models.database.execute_sql(_cached_sql(key, build, params), params)


def select_cached(model, key, build: Callable[[], Any], params: list) -> list:
    """As run_cached, for a SELECT of whole `model` rows: returns model instances.  Building a
    select's SQL text costs more than reading a batch of rows back."""
    return list(model.raw(_cached_sql(key, build, params), *params))


class _Merged:
    """The `fn` of a write_merged job: jobs with the same `fn_many` share one call."""
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[list], list]):
        self.fn = fn


def _units(batch: list) -> list:
    """A group's jobs in order, each write_merged function's jobs gathered into one list at the
    place of its first job."""
    units: list = []
    merged: dict = {}
    for job in batch:
        if isinstance(job[0], _Merged):
            same = merged.get(job[0].fn)
            if same is None:
                same = merged[job[0].fn] = []
                units.append(same)
            same.append(job)
        else:
            units.append(job)
    return units


def _resolve(items) -> None:
    """On the caller's event loop: hand each write job's result to its awaiting future."""
    for fut, ok, value in items:
        if fut.cancelled():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


_current: Store | None = None
_start_lock = threading.Lock()
_STOP = object()


def open_store(url: str, read_threads: int = 4, migrate: bool = True) -> Store:
    """Open the process's store (running pending migrations unless told not to)."""
    global _current
    from .repair import probe
    store = Store(url, read_threads=read_threads)
    try:
        probe(store.db, url)
    except Exception:
        store.close()
        raise
    if migrate:
        store.migrate()
    _current = store
    return store


def current() -> Store:
    if _current is None:
        raise RuntimeError("store not opened")
    return _current
