"""Message bodies, content-addressed: the one place bodies are written, read and collected.

`put_sync` stores bytes under their SHA-256 (once, however many messages point at them) and
`get_sync` reads them back; both are synchronous and meant to run inside a store transaction
(`await store.write(fn)` / `store.read(fn)`).  core.send stores; the relay and others read.

`collect_sync` deletes blobs no row references (REFERENCES lists every column holding a blob's
SHA-256: a new one must be added there).  It never races a writer that stores the same bytes
again and references them in the same transaction: on SQLite, write transactions are
serialized (BEGIN IMMEDIATE), so the DELETE sees every reference committed before it and a
later writer inserts the bytes anew; on PostgreSQL, `put_sync` refreshes the stored blob's
created_at (ON CONFLICT DO UPDATE), which locks the row: a concurrent DELETE waits for that
writer and then finds the row younger than its cutoff, and a writer that comes after the DELETE
waits for it and inserts the row again.  Only blobs older than the cutoff (GRACE_SECONDS ago)
are candidates, which also keeps any body stored shortly before its reference is committed.
"""
from __future__ import annotations

import hashlib

from peewee import fn

from .db import insert_rows, run_cached
from .mailbox_models import InboundJob, MailMessage
from .models import Blob, Message
from .route_models import RouteJob, StoredMessage

GRACE_SECONDS = 3600.0
REFERENCES = ((Message, "blob"), (MailMessage, "blob"), (InboundJob, "blob"), (RouteJob, "blob"),
              (StoredMessage, "blob"))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_sync(data: bytes, sha256: str | None = None) -> str:
    """Store `data` (a no-op when the same bytes are already stored); returns its SHA-256."""
    sha = sha256 or digest(data)
    put_many_sync({sha: data})
    return sha


def put_many_sync(bodies: dict[str, bytes]) -> None:
    """put_sync for several bodies ({SHA-256: bytes}) in one statement."""
    if bodies:
        insert_rows(Blob, [{"sha256": sha, "size": len(data), "data": data} for sha, data in bodies.items()],
                    ignore_conflicts=True, refresh="created_at")


def get_sync(sha256: str) -> bytes:
    """The stored bytes; raises KeyError when there is no such blob."""
    row = Blob.select(Blob.data).where(Blob.sha256 == sha256).tuples().first()
    if row is None:
        raise KeyError(sha256)
    return bytes(row[0])


def get_many_sync(sha256s) -> dict[str, bytes]:
    """The stored bytes of each of `sha256s` that exists, in one query, by SHA-256."""
    keys = list(set(sha256s))
    if not keys:
        return {}
    rows = run_cached(("blobs.get_many", len(keys)),
                      lambda: Blob.select(Blob.sha256, Blob.data).where(Blob.sha256.in_(keys)), keys)
    return {sha: bytes(data) for sha, data in rows.fetchall()}


def head_sync(sha256: str, n: int) -> bytes | None:
    """The first `n` bytes (the headers, say) without reading the whole body; None if absent."""
    row = run_cached(("blobs.head", n), lambda: Blob.select(fn.substr(Blob.data, 1, n)).where(Blob.sha256 == ""),
                     [1, n, sha256]).fetchone()
    return None if row is None else bytes(row[0])


def exists_sync(sha256: str) -> bool:
    return Blob.select().where(Blob.sha256 == sha256).exists()


def collect_sync(before: float) -> int:
    """Delete the blobs stored before `before` that nothing references (one statement, in the
    caller's write transaction); returns how many."""
    db, table = Blob._meta.database, Blob._meta.table_name
    unreferenced = " EXCEPT ".join([f'SELECT "sha256" FROM "{table}"'] + [
        f'SELECT "{model._meta.fields[col].column_name}" FROM "{model._meta.table_name}"'
        for model, col in REFERENCES])
    sql = f'DELETE FROM "{table}" WHERE "sha256" IN ({unreferenced}) AND "created_at" < {db.param}'
    return db.execute_sql(sql, [before]).rowcount
