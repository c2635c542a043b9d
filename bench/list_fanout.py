"""Mailing-list fan-out: a 10,000-member list, one POST /v3/<domain>/messages to the list.

Measures the time from the API call to all members queued (the call answers only after the
commit of the message, its one body and every queue row), the queue rows and bodies stored, and
the server's memory: resident set before and after, and the peak (VmHWM) over the run.  Runs a
private `mailplat serve api` (no relay, so nothing is delivered while counting) on SQLite, or on
PostgreSQL with --db-url.

    .venv/bin/python bench/list_fanout.py [--members 10000] [--db-url postgresql://...]
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import start_server  # noqa: E402


def mem(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) // 1024
    return out


def count(db_url: str, data_dir: Path, sql: str) -> int:
    if not db_url:
        conn = sqlite3.connect(data_dir / "mailplat.db")
        try:
            return conn.execute(sql).fetchone()[0]
        finally:
            conn.close()
    import psycopg2
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=10_000)
    ap.add_argument("--db-url", default="")
    args = ap.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="mailplat-fanout-"))
    srv = start_server(data_dir, db_url=args.db_url or None, services=["api"],
                       sets=["api.domains_rate_limit_per_minute=100000"])
    s = requests.Session()
    s.auth = ("api", srv.key)
    try:
        dom = "fanout.example.test"
        assert s.post(srv.url + "/v3/domains", data={"name": dom}).status_code == 200
        address = f"all@{dom}"
        assert s.post(srv.url + "/v3/lists", data={"address": address}).status_code == 200
        t0 = time.monotonic()
        for start in range(0, args.members, 1000):
            batch = [{"address": f"m{i:06d}@members.example.test", "name": f"First{i} Last{i}",
                      "vars": {"n": i, "city": "Oslo"}} for i in range(start, min(start + 1000, args.members))]
            r = s.post(srv.url + f"/v3/lists/{address}/members.json", data={"members": json.dumps(batch), "upsert": "yes"})
            assert r.status_code == 200, r.text
        load = time.monotonic() - t0
        before = mem(srv.proc.pid)
        t0 = time.monotonic()
        r = s.post(srv.url + f"/v3/{dom}/messages", data={
            "from": f"news@{dom}", "to": address, "subject": "Monthly news",
            "text": "Hi %recipient_fname%, news for %recipient.city%. Leave: %mailing_list_unsubscribe_url%",
            "html": "<p>Hi %recipient_fname%</p>" + "<p>" + "lorem ipsum " * 2000 + "</p>"})
        elapsed = time.monotonic() - t0
        assert r.status_code == 200, r.text
        after = mem(srv.proc.pid)
        queued = count(args.db_url, data_dir, "select count(*) from queue_item")
        bodies = count(args.db_url, data_dir, "select count(*) from blob")
        messages = count(args.db_url, data_dir, "select count(*) from message")
        store = "postgresql" if args.db_url else "sqlite"
        print(f"store={store} members={args.members} load_members={load:.2f}s")
        print(f"send_to_list_until_all_queued={elapsed:.2f}s queued={queued} messages={messages} blobs={bodies}")
        print(f"server_rss_before={before['VmRSS']}MB server_rss_after={after['VmRSS']}MB "
              f"server_peak_rss={after['VmHWM']}MB (peak before send {before['VmHWM']}MB)")
        assert queued == args.members and messages == 1
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
