"""Store health: the startup probe, `mailplat db check` and `mailplat db repair`.

Owns what happens when the SQLite file is damaged.  `probe` runs when a process opens the store
and turns an unreadable file into a `StoreDamaged` error that says what to do (instead of a
traceback).  `check` runs SQLite's integrity check (on PostgreSQL the server owns integrity; the
check connects and reports pending migrations).  `salvage` rebuilds a damaged SQLite store into
a new file: a fresh, fully migrated schema, then every row that can still be read is copied
table by table, walking rowid ranges and halving a range that hits a damaged page until single
unreadable rows are skipped and counted.  Indexes are rebuilt by the inserts, so damage confined
to an index loses nothing.  The damaged file is kept beside the new one; nothing is deleted.
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import peewee

CHUNK = 5000  # rowids per read while nothing is damaged
# peewee wraps errors raised by execute; fetching rows raises the driver's own
_DB_ERRORS = (peewee.DatabaseError, sqlite3.DatabaseError)


class StoreDamaged(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"the store {path} cannot be read ({reason}); stop mailplat, then run "
                         f"`mailplat db check` and `mailplat db repair`")


def sqlite_path(url: str) -> str | None:
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else None


def probe(db: peewee.Database, url: str) -> None:
    """Read the schema once; a file that is not a database or whose schema page is damaged
    raises StoreDamaged."""
    path = sqlite_path(url)
    if path is None or path == ":memory:":
        return
    try:
        with db.connection_context():
            db.execute_sql("SELECT count(*) FROM sqlite_master").fetchone()
    except _DB_ERRORS as exc:
        raise StoreDamaged(path, str(exc)) from None


def check(store) -> list[str]:
    """Problems found (empty when healthy)."""
    if store.is_postgres:
        pending = store.pending_migrations()
        return [f"migration not applied: {name}" for name in pending]
    try:
        with store.db.connection_context():
            rows = store.db.execute_sql("PRAGMA integrity_check").fetchall()
    except _DB_ERRORS as exc:
        return [str(exc)]
    problems = [line for (text,) in rows for line in str(text).splitlines() if line != "ok"]
    return problems


@dataclass
class Salvage:
    copied: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)  # rowids that could not be read
    unreadable_tables: list[str] = field(default_factory=list)


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' "
                        "AND name NOT LIKE 'sqlite_%' AND name != 'migratehistory'").fetchall()
    # Virtual tables and their shadow tables are derived data: rebuilt, not copied.
    virtual = [n for n, sql in rows if (sql or "").upper().startswith("CREATE VIRTUAL")]
    return [n for n, _ in rows if n not in virtual and not any(n.startswith(v + "_") for v in virtual)]


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]


def _max_rowid(src: sqlite3.Connection, table: str) -> int:
    try:
        return src.execute(f'SELECT max(rowid) FROM "{table}"').fetchone()[0] or 0
    except sqlite3.DatabaseError:
        # The rightmost page is damaged: an upper bound, the first power of two past which
        # the table readably holds nothing (a damaged probe counts as "may hold rows").
        hi = 1
        while hi < 2 ** 62:
            try:
                if src.execute(f'SELECT 1 FROM "{table}" WHERE rowid >= ? LIMIT 1', (hi,)).fetchone() is None:
                    return hi
            except sqlite3.DatabaseError:
                pass
            hi *= 2
        return hi


def _copy_range(src, dst, table, cols, lo, hi, out: Salvage) -> None:
    select = f'SELECT rowid, {", ".join(chr(34) + c + chr(34) for c in cols)} FROM "{table}" WHERE rowid BETWEEN ? AND ?'
    insert = f'INSERT OR IGNORE INTO "{table}" (rowid, {", ".join(chr(34) + c + chr(34) for c in cols)}) VALUES ({", ".join("?" * (len(cols) + 1))})'
    stack = [(lo, hi)]
    while stack:
        a, b = stack.pop()
        try:
            rows = src.execute(select, (a, b)).fetchall()
        except sqlite3.DatabaseError:
            if a == b:
                out.lost[table] = out.lost.get(table, 0) + 1
                continue
            mid = (a + b) // 2
            stack += [(mid + 1, b), (a, mid)]
            continue
        dst.executemany(insert, rows)
        out.copied[table] = out.copied.get(table, 0) + len(rows)


def salvage(damaged: str, fresh: str) -> Salvage:
    """Copy every readable row of `damaged` into `fresh` (an already migrated, empty store)."""
    out = Salvage()
    src = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    dst = sqlite3.connect(fresh)
    try:
        src_tables = set(_tables(src))
        for table in _tables(dst):
            if table not in src_tables:
                out.unreadable_tables.append(table)
                continue
            cols = [c for c in _columns(dst, table) if c in set(_columns(src, table))]
            top = _max_rowid(src, table)
            out.copied.setdefault(table, 0)
            for lo in range(1, top + 1, CHUNK):
                _copy_range(src, dst, table, cols, lo, min(lo + CHUNK - 1, top), out)
            dst.commit()
        return out
    finally:
        src.close()
        dst.close()


def swap_in(path: str, recovered: str) -> str:
    """Move the damaged file (and its WAL) aside and the recovered one into place; the damaged
    file's new name is returned."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%d%H%M%S')}"
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    os.replace(recovered, path)
    fd = os.open(str(Path(path).parent), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return aside
