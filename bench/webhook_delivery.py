"""Webhook delivery throughput to a loopback receiver.

Starts a private `mailplat serve api hooks` (SQLite in a temporary data dir, unless --db-url)
with private targets allowed, points the `accepted` webhook of a domain at an aiohttp receiver
in this process, then sends --messages test-mode messages of --rcpts recipients each through the
API: every accepted event queues one signed JSON post in its own transaction.  Prints how long
the posts took to arrive (posts/s from the first send to the last post), checks every post's
signature and body HMAC, and that none arrived twice.

    .venv/bin/python bench/webhook_delivery.py [--messages 20] [--rcpts 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import sys
import tempfile
import time
from pathlib import Path

import requests
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import start_server  # noqa: E402


async def main_async(args) -> int:
    got: dict[str, int] = {}
    bodies: list[tuple[bytes, str]] = []
    done = asyncio.Event()
    total = args.messages * args.rcpts

    async def hook(request):
        body = await request.read()
        data = json.loads(body)
        eid = data["event-data"]["id"]
        got[eid] = got.get(eid, 0) + 1
        if len(bodies) < 50:
            bodies.append((body, request.headers.get("X-Mailplat-Signature", "")))
        if len(got) >= total:
            done.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="mailplat-bench-wh-"))
    srv = await asyncio.to_thread(start_server, tmp / "data", args.db_url or None,
                                  ["hooks.allow_private_targets=true", "log.level=WARNING"], ["api", "hooks"])
    try:
        s = requests.Session()
        s.auth = ("api", srv.key)
        dom = "bench-wh.example.test"
        s.post(f"{srv.url}/v3/domains", data={"name": dom, "dkim_key_size": "1024"}).raise_for_status()
        s.post(f"{srv.url}/v3/domains/{dom}/webhooks", data={"id": "accepted",
                                                             "url": f"http://127.0.0.1:{port}/hook"}).raise_for_status()
        key = s.get(f"{srv.url}/v5/accounts/http_signing_key").json()["http_signing_key"]
        t0 = time.perf_counter()
        for m in range(args.messages):
            rcpts = [f"r{m}-{i}@sink.example.test" for i in range(args.rcpts)]
            r = await asyncio.to_thread(s.post, f"{srv.url}/v3/{dom}/messages",
                                        data={"from": f"b@{dom}", "to": rcpts, "subject": "wh", "text": "x",
                                              "o:testmode": "yes"})
            r.raise_for_status()
        t_sent = time.perf_counter() - t0
        await asyncio.wait_for(done.wait(), timeout=args.timeout)
        elapsed = time.perf_counter() - t0
        for body, header in bodies:
            sig = json.loads(body)["signature"]
            assert hmac.compare_digest(sig["signature"], hmac.new(key.encode(), (sig["timestamp"] + sig["token"]).encode(),
                                                                  hashlib.sha256).hexdigest())
            assert header == "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
        dupes = sum(1 for n in got.values() if n > 1)
        print(f"{total:,} webhook posts (accepted events of {args.messages} sends x {args.rcpts} recipients)")
        print(f"sends committed in {t_sent:.2f} s; all posts received after {elapsed:.2f} s: "
              f"{total / elapsed:,.0f} posts/s end to end; duplicates: {dupes}; signatures checked: {len(bodies)}")
    finally:
        await asyncio.to_thread(srv.stop)
        await runner.cleanup()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--rcpts", type=int, default=1000)
    ap.add_argument("--db-url", default="")
    ap.add_argument("--timeout", type=float, default=600)
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
