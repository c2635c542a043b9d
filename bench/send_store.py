"""The send transaction's own cost: core.send's store write for N trusted-submission-shaped
1 KB messages, in one thread, with no event loop or interpreter-lock contention.

Stores --count messages in write groups of --group sends (one transaction each, as the store
writer groups them) on a fresh SQLite store in a temporary directory, either shared (the group's
sends in ONE _store_many call: what store.write_merged does) or one by one (a _store_many call
and savepoint per send: what the writer did before).  Prints CPU microseconds per message for
both, so the gain of sharing statements is measured on its own.

    .venv/bin/python bench/send_store.py [--count 3000] [--group 10]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailplat.core import send  # noqa: E402
from mailplat.core.options import Options  # noqa: E402
from mailplat.store.db import open_store  # noqa: E402
from mailplat.store.models import Domain  # noqa: E402

DOMAIN = "bench.test"


def jobs(n: int, start: int) -> list:
    out = []
    for i in range(start, start + n):
        raw = (b"From: <bench@bench.test>\r\nTo: <sink@relay.test>\r\nSubject: hello there\r\n\r\n"
               + b"x" * 1000 + b"\r\n" + str(i).encode())
        req = send.SendRequest(domain=DOMAIN, source="smtp", mime=raw, recipients=["sink@relay.test"],
                               sender="bench@bench.test")
        now = time.time()
        prep = send._prepare_mime(req, DOMAIN, now, 1 << 25)
        out.append(send._Job(DOMAIN, "smtp", prep, hashlib.sha256(prep.raw).hexdigest(), Options().as_stored(),
                             [], [], {}, {}, now, now, time.time, ()))
    return out


def run(count: int, group: int, shared: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/bench.db")
        db = store.db
        db.connect(reuse_if_open=True)
        Domain.create(id=uuid.uuid4().hex[:24], name=DOMAIN, smtp_login=f"postmaster@{DOMAIN}")
        # Messages are prepared outside the timing: only the store write is measured.
        groups = [jobs(group, g * group) for g in range(count // group)]
        cpu = time.process_time()
        for batch in groups:
            with db.atomic("IMMEDIATE"):
                if shared:
                    with db.atomic():
                        send._store_many(batch)
                else:
                    for job in batch:
                        with db.atomic():
                            send._store_many([job])
        used = time.process_time() - cpu
        store.close()
    return used / (count // group * group) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--group", type=int, default=10)
    args = ap.parse_args()
    one = run(args.count, args.group, shared=False)
    shared = run(args.count, args.group, shared=True)
    print(f"send store write, {args.count} x 1 KB, groups of {args.group}, SQLite, one thread:")
    print(f"  one call per send:        {one:6.0f} us CPU per message")
    print(f"  one call per group:       {shared:6.0f} us CPU per message  ({one / shared:.2f}x less)")


if __name__ == "__main__":
    main()
