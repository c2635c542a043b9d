"""Click-tracking redirect latency under load.

Starts a private `mailplat serve api` (SQLite in a temporary data dir, unless --db-url), sends
one test-mode message to --rcpts recipients, makes one signed click link per recipient with
core.tracking (the same tokens the relay writes into mail), then has --clients concurrent
keep-alive clients GET /c/<token> with the tracking Host header for --seconds.  Every answer
must be a 302 to the original URL, and each records a `clicked` event (a committed store write)
before it is sent.  Prints requests/s and latency p50/p99.

    .venv/bin/python bench/tracking_redirect.py [--clients 50] [--seconds 15]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import start_server  # noqa: E402

TARGET = "https://example.org/landing?utm=bench"


def make_links(db_url: str, n: int, dom: str) -> list[str]:
    from mailplat.core import tracking
    from mailplat.store import db as storedb
    from mailplat.store.models import Message
    store = storedb.open_store(db_url)
    try:
        with store.sync():
            tracking.secret_sync()
            msg = Message.select().where(Message.domain == dom).get()
            return [tracking.make_token("c", msg.id, f"r{i}@sink.example.test", TARGET) for i in range(n)]
    finally:
        store.close()


async def load(url: str, host: str, tokens: list[str], clients: int, seconds: float):
    lat: list[float] = []
    bad = 0
    stop = time.perf_counter() + seconds
    rnd = random.Random(3)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def worker():
            nonlocal bad
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with session.get(f"{url}/c/{rnd.choice(tokens)}", headers={"Host": host,
                                       "User-Agent": "Mozilla/5.0 bench"}, allow_redirects=False) as r:
                    await r.read()
                    if r.status != 302 or r.headers.get("Location") != TARGET:
                        bad += 1
                lat.append(time.perf_counter() - t)
        await asyncio.gather(*(worker() for _ in range(clients)))
    return lat, bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rcpts", type=int, default=1000)
    ap.add_argument("--db-url", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mailplat-bench-trk-"))
    srv = start_server(tmp / "data", args.db_url or None, ["log.level=WARNING"], ["api"])
    try:
        s = requests.Session()
        s.auth = ("api", srv.key)
        dom = "bench-trk.example.test"
        s.post(f"{srv.url}/v3/domains", data={"name": dom, "dkim_key_size": "1024"}).raise_for_status()
        s.post(f"{srv.url}/v3/{dom}/messages", data={"from": f"b@{dom}", "subject": "t", "html": "<a href=x>x</a>",
                                                     "to": [f"r{i}@sink.example.test" for i in range(args.rcpts)],
                                                     "o:testmode": "yes"}).raise_for_status()
        from mailplat import config as configmod
        tokens = make_links(configmod.load(data_dir=tmp / "data").db_url, args.rcpts, dom)
        asyncio.run(load(srv.url, f"email.{dom}", tokens, 5, 1.0))  # warm-up
        lat, bad = asyncio.run(load(srv.url, f"email.{dom}", tokens, args.clients, args.seconds))
        lat.sort()
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"{len(lat):,} redirects in {args.seconds:.0f} s with {args.clients} clients: "
              f"{len(lat) / args.seconds:,.0f}/s; p50 {statistics.median(lat) * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms; wrong answers: {bad}")
        total = s.get(f"{srv.url}/v3/{dom}/stats/total", params={"event": "clicked", "duration": "1d"}).json()
        counted = sum(x["clicked"]["total"] for x in total["stats"])
        print(f"clicked events counted by stats: {counted:,}")
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
