"""`mailplat queue list|show|retry|hold|release|drop`: the outbound queue for the operator.

Owns what these commands print.  A row is named by its queue id (digits) or by a message id
(every recipient row of that message).  The queries are store.queue's; dropping a row records
a `failed` event (permanent, "Dropped by the administrator") in the same transaction.
"""
from __future__ import annotations

import datetime
import sys
import time

VERBS = ("list", "show", "retry", "hold", "release", "drop")


def register(sub, common) -> None:
    p = sub.add_parser("queue", parents=[common], help="inspect and manage the outbound queue")
    qsub = p.add_subparsers(dest="queue_cmd", required=True)
    ls = qsub.add_parser("list", parents=[common], help="queue rows (all states by default)")
    ls.add_argument("--state", choices=["queued", "held", "delivered", "failed"])
    ls.add_argument("--domain", help="sending or recipient domain")
    ls.add_argument("--limit", type=int, default=100)
    for verb in VERBS[1:]:
        v = qsub.add_parser(verb, parents=[common], help=f"{verb} rows by queue id or message id")
        v.add_argument("ref", nargs="+", help="queue id or message id")
    p.set_defaults(fn=cmd_queue)


def _when(ts) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _line(row) -> str:
    return "\t".join([str(row.id), row.state, str(row.attempts), _when(row.next_attempt_at),
                      row.message.message_id, row.recipient, (row.last_error or "")[:80]])


def _show(row) -> str:
    lease = f"{row.lease_owner} until {_when(row.lease_until)}" if row.lease_owner else "-"
    fields = [("queue id", row.id), ("message id", row.message.message_id), ("domain", row.message.domain),
              ("sender", row.message.sender), ("recipient", row.recipient), ("state", row.state),
              ("attempts", row.attempts), ("next attempt", _when(row.next_attempt_at)),
              ("lease", lease), ("last code", row.last_code if row.last_code is not None else "-"),
              ("last error", row.last_error or "-"), ("queued at", _when(row.created_at))]
    return "\n".join(f"{k}: {v}" for k, v in fields)


def _drop_sync(ids, now):
    from ..core import events
    from ..store import queue
    changed = set(queue.drop_sync(ids, now, "dropped by the administrator"))
    for row in queue.load_sync(changed):
        data = events.build("failed", row.message, row.recipient, timestamp=now, severity="permanent",
                            reason="generic", delivery_status={
                                "code": 0, "message": "Dropped by the administrator",
                                "description": "Dropped by the administrator (mailplat queue drop)",
                                "attempt-no": row.attempts, "mx-host": "", "tls": False,
                                "certificate-verified": False, "enhanced-code": ""})
        events.record_sync(row.message.domain, data)
    return len(changed)


def cmd_queue(args) -> int:
    from ..cli import _load, _open_store
    from ..store import queue

    cfg = _load(args)
    store = _open_store(cfg)
    try:
        with queue.admin_transaction(store):
            if args.queue_cmd == "list":
                rows = queue.list_sync(args.state, args.domain, args.limit)
                print("\t".join(["id", "state", "attempts", "next attempt", "message id", "recipient", "last error"]))
                for row in rows:
                    print(_line(row))
                counts = queue.counts_sync()
                print("# " + ", ".join(f"{k}: {counts[k]}" for k in sorted(counts)) if counts else "# queue is empty")
                return 0
            rows = []
            for ref in args.ref:
                found = queue.find_sync(ref)
                if not found:
                    print(f"mailplat: no queued message matches {ref!r}", file=sys.stderr)
                    return 1
                rows += found
            ids = sorted({r.id for r in rows})
            now = time.time()
            if args.queue_cmd == "show":
                print("\n\n".join(_show(r) for r in rows))
                return 0
            if args.queue_cmd == "retry":
                print(f"retried {queue.retry_sync(ids, now)}")
            elif args.queue_cmd == "hold":
                print(f"held {queue.hold_sync(ids, now)}")
            elif args.queue_cmd == "release":
                print(f"released {queue.release_hold_sync(ids, now)}")
            elif args.queue_cmd == "drop":
                print(f"dropped {_drop_sync(ids, now)}")
            if args.queue_cmd in ("retry", "release"):
                queue.notify_new_sync()
        return 0
    finally:
        store.close()
