"""Message bodies, content-addressed: the one place bodies are written and read.

`put_sync` stores bytes under their SHA-256 (once, however many messages point at them) and
`get_sync` reads them back; both are synchronous and meant to run inside a store transaction
(`await store.write(fn)` / `store.read(fn)`).  core.send stores; the relay and others read.
"""
from __future__ import annotations

import hashlib

from peewee import fn

from .db import insert_rows, run_cached
from .models import Blob


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_sync(data: bytes, sha256: str | None = None) -> str:
    """Store `data` (a no-op when the same bytes are already stored); returns its SHA-256."""
    sha = sha256 or digest(data)
    insert_rows(Blob, [{"sha256": sha, "size": len(data), "data": data}], ignore_conflicts=True)
    return sha


def get_sync(sha256: str) -> bytes:
    """The stored bytes; raises KeyError when there is no such blob."""
    row = Blob.select(Blob.data).where(Blob.sha256 == sha256).tuples().first()
    if row is None:
        raise KeyError(sha256)
    return bytes(row[0])


def get_many_sync(sha256s) -> dict[str, bytes]:
    """The stored bytes of each of `sha256s` that exists, in one query, by SHA-256."""
    return {sha: bytes(data) for sha, data in
            Blob.select(Blob.sha256, Blob.data).where(Blob.sha256.in_(list(set(sha256s)))).tuples()}


def head_sync(sha256: str, n: int) -> bytes | None:
    """The first `n` bytes (the headers, say) without reading the whole body; None if absent."""
    row = run_cached(("blobs.head", n), lambda: Blob.select(fn.substr(Blob.data, 1, n)).where(Blob.sha256 == ""),
                     [1, n, sha256]).fetchone()
    return None if row is None else bytes(row[0])


def exists_sync(sha256: str) -> bool:
    return Blob.select().where(Blob.sha256 == sha256).exists()
