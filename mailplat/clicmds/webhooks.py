"""`mailplat webhooks failed|replay` and `mailplat events purge`: the operator's view of
webhook posts that gave up, putting them back in the outbox, and purging events past the
retention period now (the hooks service also does it hourly).  Rows and rules are
core.webhooks'."""
from __future__ import annotations

import datetime
import time


def register(sub, common) -> None:
    p = sub.add_parser("webhooks", parents=[common], help="failed webhook posts: list and replay")
    wsub = p.add_subparsers(dest="webhooks_cmd", required=True)
    for verb, text in (("failed", "list webhook posts that gave up"), ("replay", "queue failed webhook posts again")):
        v = wsub.add_parser(verb, parents=[common], help=text)
        v.add_argument("--domain", help="only this sending domain")
        v.add_argument("--since", type=float, help="only posts created in the last N hours")
    p.set_defaults(fn=cmd_webhooks)
    e = sub.add_parser("events", parents=[common], help="event store maintenance")
    esub = e.add_subparsers(dest="events_cmd", required=True)
    esub.add_parser("purge", parents=[common], help="delete events older than tracking.events_retention_days")
    e.set_defaults(fn=cmd_events)


def _when(ts) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_webhooks(args) -> int:
    from ..cli import _load, _open_store
    from ..core import webhooks
    from ..store.route_models import OutboxItem

    cfg = _load(args)
    store = _open_store(cfg)
    now = time.time()
    since = now - args.since * 3600 if args.since else None
    try:
        with store.sync():
            if args.webhooks_cmd == "replay":
                print(f"replayed {webhooks.replay_failed_sync(args.domain, since, now)}")
                return 0
            cond = (OutboxItem.state == "failed") & OutboxItem.kind.in_(["webhook", "webhook-once"])
            if args.domain:
                cond &= OutboxItem.domain == args.domain
            if since is not None:
                cond &= OutboxItem.created_at >= since
            print("\t".join(["id", "domain", "attempts", "created", "last status", "last error"]))
            for row in OutboxItem.select().where(cond).order_by(OutboxItem.id):
                print("\t".join([str(row.id), row.domain, str(row.attempts), _when(row.created_at),
                                 str(row.last_status or "-"), (row.last_error or "")[:80]]))
        return 0
    finally:
        store.close()


def cmd_events(args) -> int:
    from ..cli import _load, _open_store
    from ..core import webhooks

    cfg = _load(args)
    days = cfg.tracking.events_retention_days
    if days <= 0:
        print("events are kept forever (tracking.events_retention_days = 0)")
        return 0
    store = _open_store(cfg)
    total = 0
    try:
        while True:
            with store.sync():
                n = webhooks.purge_events_sync(time.time() - days * 86400.0)
            total += n
            if not n:
                break
        print(f"purged {total}")
        return 0
    finally:
        store.close()
