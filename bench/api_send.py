"""API acceptance benchmark: POST /v3/<domain>/messages with N concurrent clients.

Starts a private `mailplat serve api` (SQLite in a temporary data dir, unless --db-url), creates
a sending domain, then keeps --clients keep-alive HTTP clients posting --size byte text messages
(urlencoded, as the Python SDK sends them) for --count messages after a warm-up.  Every 200
means the message, its queue row and its accepted event were committed.  Prints messages/s and
latency percentiles, and checks the store holds every accepted message.  With --postfix, the
same run also measures Postfix's smtp-source against a private Postfix (bench/postfix_private.sh,
needs postfix installed and root) with as many sessions as clients and messages of the same
size to a remote domain, queued for relay and held, and prints mailplat's rate over Postfix's.

    .venv/bin/python bench/api_send.py [--clients 10] [--size 10240] [--count 5000] [--postfix]
"""
from __future__ import annotations

import argparse
import contextlib
import asyncio
import base64
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import pg_database, start_server  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(url: str, key: str, domain: str, clients: int, size: int, count: int, warmup: int, pid: int):
    body_text = ("0123456789abcdef" * (size // 16 + 1))[:size]
    payload = {"from": f"Bench <bench@{domain}>", "to": "rcpt@sink.example.test", "subject": "bench",
               "text": body_text}
    latencies: list[float] = []
    errors: list[str] = []
    ids: list[str] = []
    # The same urlencoded bytes the SDK sends, encoded once: the client shares the machine's
    # cores with the server, so it should spend as little of them as it can.
    encoded = urlencode(payload).encode()
    headers = {"Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode(),
               "Content-Type": "application/x-www-form-urlencoded"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        endpoint = f"{url}/v3/{domain}/messages"

        async def post() -> float:
            t = time.perf_counter()
            async with session.post(endpoint, data=encoded) as resp:
                body = await resp.json()
                if resp.status != 200:
                    errors.append(f"{resp.status} {body}")
                else:
                    ids.append(body["id"])
            return time.perf_counter() - t

        async def worker(n: int, record: bool):
            for _ in range(n):
                lat = await post()
                if record:
                    latencies.append(lat)

        await asyncio.gather(*(worker(warmup // clients, False) for _ in range(clients)))
        ids.clear()
        cpu0 = cpu_seconds(pid)
        own0 = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker(count // clients, True) for _ in range(clients)))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu0
        run.client_cpu = time.process_time() - own0
    return latencies, errors, ids, elapsed, cpu


def postfix_rate(sessions: int, size: int, count: int, warmup: int, port: int = 25527) -> float:
    """Messages/s of smtp-source into a private Postfix: same sessions, size and recipient domain."""
    work = Path(tempfile.mkdtemp(prefix="postfix-bench-"))
    helper = str(ROOT / "bench" / "postfix_private.sh")
    subprocess.run([helper, "start", str(work / "postfix"), str(port)], check=True)

    def source(n: int) -> None:
        subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(n), "-l", str(size),
                        "-f", "bench@bench.example.test", "-t", "rcpt@sink.example.test",
                        f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    try:
        source(warmup)
        start = time.perf_counter()
        source(count)
        return count / (time.perf_counter() - start)
    finally:
        subprocess.run([helper, "stop", str(work / "postfix")], check=False)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--size", type=int, default=10240, help="text body bytes")
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--postfix", action="store_true",
                    help="also measure Postfix's SMTP acceptance (smtp-source) in the same run")
    ap.add_argument("--db-url", help="PostgreSQL server URL: the run uses a new database on it "
                    "(default: SQLite in the temporary data dir)")
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="mailplat-bench-"))
    with contextlib.ExitStack() as stack:
        # PostgreSQL: a new empty database on that server for each run (dropped afterwards).
        db_url = stack.enter_context(pg_database(args.db_url)) if args.db_url else None
        return _measure(args, data_dir, db_url)


def _measure(args, data_dir: Path, db_url: str | None) -> int:
    srv = start_server(data_dir, db_url=db_url, services=["api"], sets=["log.level=WARNING"])
    try:
        domain = "bench.example.test"
        r = srv.api("POST", "/v3/domains", data={"name": domain, "dkim_key_size": "1024"})
        assert r.status_code == 200, r.text
        latencies, errors, ids, elapsed, cpu = asyncio.run(
            run(srv.url, srv.key, domain, args.clients, args.size, args.count, args.warmup, srv.proc.pid))
        from tests.test_send_api import StoredView
        store = StoredView(srv)
        stored = store.rows("SELECT COUNT(*) AS n FROM message WHERE message_id IN (%s)" % ",".join("?" * min(len(ids), 900)),
                            *[i.strip("<>") for i in ids[:900]])[0]["n"]
    finally:
        srv.stop()
    n = len(latencies)
    lat_ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(lat_ms, n=100) if n >= 2 else [0] * 99
    print(f"API acceptance: POST /v3/<domain>/messages, {args.clients} clients, {args.size} B text, store "
          f"{'postgres' if args.db_url else 'sqlite'}")
    print(f"  messages: {n} in {elapsed:.2f} s  ->  {n / elapsed:.0f} msgs/s")
    print(f"  latency ms: p50 {q[49]:.1f}  p90 {q[89]:.1f}  p99 {q[98]:.1f}  max {lat_ms[-1]:.1f}")
    print(f"  server CPU: {cpu * 1000 / max(n, 1):.2f} ms per message ({cpu / elapsed * 100:.0f}% of one core);"
          f" load average at end {open('/proc/loadavg').read().split()[0]} on {__import__('os').cpu_count()} cores")
    print(f"  client CPU: {getattr(run, 'client_cpu', 0) * 1000 / max(n, 1):.2f} ms per message (the load generator, same machine)")
    print(f"  errors: {len(errors)}{'  first: ' + errors[0] if errors else ''}")
    if args.postfix:
        pf = postfix_rate(args.clients, args.size, args.count, args.warmup)
        print(f"  postfix smtp-source, {args.clients} sessions, {args.size} B: {pf:.0f} msgs/s"
              f"  ->  mailplat API / postfix SMTP = {n / elapsed / pf:.2f}x")
    print(f"  committed check: {stored} of the first {min(len(ids), 900)} accepted ids are in the store")
    return 0 if not errors and stored == min(len(ids), 900) else 1


if __name__ == "__main__":
    sys.exit(main())
