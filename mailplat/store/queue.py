"""The outbound queue's SQL: claims with leases, outcomes, wake-ups, and the admin verbs.

Owns every query on `queue_item` that the relay and `mailplat queue` make (core.send inserts
the rows).  All `*_sync` functions run inside a store transaction (`store.read/write`).

Claims are leases: `claim_sync` picks due rows (state queued, next_attempt_at <= now, lease
absent or expired) and stamps lease_owner/lease_until in ONE statement (UPDATE ... WHERE id IN
(SELECT ... [FOR UPDATE SKIP LOCKED]) RETURNING id), so two relay processes never hold the same
row; a row whose worker died becomes claimable again when its lease runs out.  Outcomes
(`finish_sync`) only apply while the caller still holds the lease, except deliveries
(`finish_delivered_sync`, one statement for a batch): the remote already has the message.

Wake-ups: the sending side calls `notify_new_sync()` inside the transaction that inserts queue
rows.  On PostgreSQL that is `NOTIFY mailplat_queue` (delivered at commit) and relay processes
LISTEN on a dedicated thread (`Listener`); in every store kind it also pokes wakers registered in
this process (a relay running in the same process as the API/SMTP service).
"""
from __future__ import annotations

import logging
import select
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterable

import peewee

from .db import run_cached, select_cached
from .models import Message, QueueItem, database

CHANNEL = "mailplat_queue"
log = logging.getLogger("mailplat.queue")

_wakers: list[Callable[[], None]] = []
_wakers_lock = threading.Lock()


# -- wake-ups ---------------------------------------------------------------------------------
def notify_new_sync() -> None:
    """Tell relay workers new rows are queued.  Call inside the inserting transaction."""
    db = database.obj
    if isinstance(db, peewee.PostgresqlDatabase):
        db.execute_sql(f"NOTIFY {CHANNEL}")
    with _wakers_lock:
        wakers = list(_wakers)
    for fn in wakers:
        try:
            fn()
        except Exception:  # noqa: BLE001 - a waker must never break the sender's transaction
            log.exception("queue waker failed")


def add_waker(fn: Callable[[], None]) -> None:
    with _wakers_lock:
        _wakers.append(fn)


def remove_waker(fn: Callable[[], None]) -> None:
    with _wakers_lock:
        if fn in _wakers:
            _wakers.remove(fn)


class Listener:
    """LISTEN mailplat_queue on its own psycopg2 connection in a thread; calls `on_notify()`
    (from that thread) for each burst of notifications.  PostgreSQL only."""

    def __init__(self, url: str, on_notify: Callable[[], None]):
        self.url = url
        self.on_notify = on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg2
        while not self._stop.is_set():
            conn = None
            try:
                conn = psycopg2.connect(self.url)
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {CHANNEL}")
                self.on_notify()  # anything queued while we were not listening
                while not self._stop.is_set():
                    ready, _, _ = select.select([conn], [], [], 0.5)
                    if ready:
                        conn.poll()
                        if conn.notifies:
                            conn.notifies.clear()
                            self.on_notify()
            except Exception as exc:  # noqa: BLE001 - reconnect after a pause
                log.warning("queue LISTEN connection failed: %s", exc)
                self._stop.wait(1.0)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass


# -- the relay's side -------------------------------------------------------------------------
def _due(now: float):
    return ((QueueItem.state == "queued") & (QueueItem.next_attempt_at <= now)
            & (QueueItem.lease_until.is_null() | (QueueItem.lease_until <= now)))


def claim_sync(owner: str, now: float, lease_seconds: float, limit: int) -> list[int]:
    """Lease up to `limit` due rows to `owner`; returns their ids."""
    def build():
        sub = (QueueItem.select(QueueItem.id).where(_due(0.0))
               .order_by(QueueItem.next_attempt_at, QueueItem.id).limit(1))
        if isinstance(database.obj, peewee.PostgresqlDatabase):
            sub = sub.for_update("FOR UPDATE SKIP LOCKED")
        return (QueueItem.update(lease_owner="", lease_until=0.0, updated_at=0.0)
                .where(QueueItem.id.in_(sub)).returning(QueueItem.id))
    # The SQL text is kept (run_cached); parameters in the order the statement places them.
    cursor = run_cached("queue.claim", build, [owner, now + lease_seconds, now, "queued", now, now, limit])
    return [row[0] for row in cursor.fetchall()]


def release_dead_owners_sync(host: str, now: float, alive: Callable[[int], bool]) -> int:
    """Leases held by relay processes of this host that no longer run (one killed, then the
    relay restarted): released now rather than when they run out.  Owners are
    `<host>:<pid>:<token>` (relay.worker); a pid that runs is left alone, whatever runs under it
    now, so only a certainly dead owner loses its rows.  Returns how many rows were released."""
    rows = (QueueItem.select(QueueItem.lease_owner).distinct()
            .where((QueueItem.state == "queued") & (QueueItem.lease_until > now)
                   & QueueItem.lease_owner.startswith(host + ":")).tuples())
    dead = []
    for (owner,) in rows:
        pid = owner[len(host) + 1:].partition(":")[0]
        if pid.isdigit() and not alive(int(pid)):
            dead.append(owner)
    if not dead:
        return 0
    return (QueueItem.update(lease_until=now)
            .where((QueueItem.state == "queued") & QueueItem.lease_owner.in_(dead)).execute())


def next_due_sync(now: float) -> float | None:
    """When the earliest queued row becomes claimable (its attempt time or its lease end)."""
    row = (QueueItem.select(peewee.fn.MIN(QueueItem.next_attempt_at))
           .where((QueueItem.state == "queued")
                  & (QueueItem.lease_until.is_null() | (QueueItem.lease_until <= now))).scalar())
    leased = (QueueItem.select(peewee.fn.MIN(QueueItem.lease_until))
              .where((QueueItem.state == "queued") & (QueueItem.lease_until > now)).scalar())
    times = [t for t in (row, leased) if t is not None]
    return min(times) if times else None


def load_sync(ids: Iterable[int]) -> list[QueueItem]:
    """Claimed rows with their Message (`item.message`) loaded, each Message once: rows of one
    message share the instance (a list fan-out's Message carries every member's variables, so
    decoding it per row would cost memory and CPU per recipient)."""
    ids = list(ids)
    if not ids:
        return []
    items = select_cached(QueueItem, ("queue.load", len(ids)),
                          lambda: QueueItem.select().where(QueueItem.id.in_(ids)).order_by(QueueItem.id), ids)
    message_ids = list({i.message_id for i in items})
    messages = {m.id: m for m in select_cached(Message, ("queue.load.messages", len(message_ids)),
                                               lambda: Message.select().where(Message.id.in_(message_ids)),
                                               message_ids)}
    for item in items:
        item.message = messages[item.message_id]
    return items


def _outcome_values(state: str, now: float, code: int | None, error: str) -> dict:
    return {QueueItem.state: state, QueueItem.attempts: QueueItem.attempts + 1,
            QueueItem.lease_owner: None, QueueItem.lease_until: None, QueueItem.last_code: code,
            QueueItem.last_error: error[:2000], QueueItem.updated_at: now}


def finish_sync(item_id: int, owner: str, *, state: str, now: float, next_attempt_at: float | None = None,
                code: int | None = None, error: str = "") -> bool:
    """Record an attempt's outcome and drop the lease.  Applies only while `owner` still holds
    the lease; returns whether it did."""
    values = _outcome_values(state, now, code, error)
    if next_attempt_at is not None:
        values[QueueItem.next_attempt_at] = next_attempt_at
    cond = (QueueItem.id == item_id) & (QueueItem.lease_owner == owner) & (QueueItem.state == "queued")
    return QueueItem.update(values).where(cond).execute() > 0


def finish_delivered_sync(ids: list[int], *, now: float, code: int, error: str = "") -> None:
    """Rows whose copies the remote took with reply `code`: delivered, lease dropped, in one
    statement.  Whoever holds the lease now: the delivery already happened."""
    values = _outcome_values("delivered", now, code, error)
    run_cached(("queue.delivered", len(ids)), lambda: QueueItem.update(values).where(QueueItem.id.in_(ids)),
               ["delivered", 1, None, None, code, error[:2000], now, *ids])


def renew_sync(owner: str, ids: Iterable[int], until: float) -> set[int]:
    """Extend this worker's leases on `ids`; returns the ids it still holds."""
    ids = list(ids)
    held: set[int] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        (QueueItem.update(lease_until=until)
         .where(QueueItem.id.in_(chunk) & (QueueItem.lease_owner == owner) & (QueueItem.state == "queued"))
         .execute())
        held.update(r for (r,) in QueueItem.select(QueueItem.id).where(
            QueueItem.id.in_(chunk) & (QueueItem.lease_owner == owner) & (QueueItem.state == "queued")).tuples())
    return held


def release_sync(owner: str, ids: Iterable[int]) -> int:
    """Give back leases on rows this worker claimed but did not start."""
    ids = list(ids)
    if not ids:
        return 0
    return (QueueItem.update(lease_owner=None, lease_until=None)
            .where(QueueItem.id.in_(ids) & (QueueItem.lease_owner == owner)).execute())


def lifetime_start_sync(item: QueueItem) -> float:
    """When an item's queue lifetime began: its creation, or its scheduled time if later."""
    deliver_at = (item.message.options or {}).get("deliver_at") or 0
    return max(item.created_at, float(deliver_at))


# -- `mailplat queue` -------------------------------------------------------------------------
@contextmanager
def admin_transaction(store):
    """A write transaction for a separate process (the CLI) sharing the store with running
    services.  On SQLite it takes the write lock up front (BEGIN IMMEDIATE), so it waits on the
    busy timeout instead of failing with "database is locked" when a service commits between
    its reads and its writes."""
    store.db.connect(reuse_if_open=True)
    if isinstance(store.db, peewee.SqliteDatabase):
        with store.db.atomic(lock_type="IMMEDIATE"):
            yield
    else:
        with store.db.atomic():
            yield


def find_sync(ref: str) -> list[QueueItem]:
    """Rows named by a queue id (digits) or a message id (with or without <>)."""
    ref = ref.strip()
    query = QueueItem.select(QueueItem, Message).join(Message)
    if ref.isdigit():
        return list(query.where(QueueItem.id == int(ref)))
    mid = ref.strip("<>")
    return list(query.where(Message.message_id == mid).order_by(QueueItem.id))


def list_sync(state: str | None = None, domain: str | None = None, limit: int = 100) -> list[QueueItem]:
    query = QueueItem.select(QueueItem, Message).join(Message)
    if state:
        query = query.where(QueueItem.state == state)
    if domain:
        query = query.where((Message.domain == domain) | (QueueItem.rcpt_domain == domain))
    return list(query.order_by(QueueItem.next_attempt_at, QueueItem.id).limit(limit))


def counts_sync() -> dict[str, int]:
    rows = QueueItem.select(QueueItem.state, peewee.fn.COUNT(QueueItem.id)).group_by(QueueItem.state).tuples()
    return {state: n for state, n in rows}


def retry_sync(ids: list[int], now: float) -> int:
    """Queued, held or failed rows: attempt again now."""
    return (QueueItem.update(state="queued", next_attempt_at=now, lease_owner=None, lease_until=None,
                             updated_at=now)
            .where(QueueItem.id.in_(ids) & QueueItem.state.in_(["queued", "held", "failed"])).execute())


def hold_sync(ids: list[int], now: float) -> int:
    return (QueueItem.update(state="held", updated_at=now)
            .where(QueueItem.id.in_(ids) & (QueueItem.state == "queued")).execute())


def release_hold_sync(ids: list[int], now: float) -> int:
    return (QueueItem.update(state="queued", lease_owner=None, lease_until=None, updated_at=now)
            .where(QueueItem.id.in_(ids) & (QueueItem.state == "held")).execute())


def drop_sync(ids: list[int], now: float, reason: str) -> list[int]:
    """Queued or held rows: give up on them (state failed); returns the ids that changed."""
    changed = [i for (i,) in QueueItem.select(QueueItem.id)
               .where(QueueItem.id.in_(ids) & QueueItem.state.in_(["queued", "held"])).tuples()]
    if changed:
        (QueueItem.update(state="failed", last_error=reason, lease_owner=None, lease_until=None,
                          updated_at=now).where(QueueItem.id.in_(changed)).execute())
    return changed


def now() -> float:
    return time.time()
