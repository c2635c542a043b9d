"""Events API query latency over a store holding millions of events.

Builds (or reuses, with --reuse) a data dir whose store holds --events events of one domain,
written with bulk SQL (a recursive CTE on SQLite, generate_series on PostgreSQL; never through
the API): 30 days of accepted/delivered/failed/opened/clicked events over 200,000 recipients and
2,000,000 messages, tagged.  Then runs `mailplat serve api` on it and times GET
/v3/<domain>/events over HTTP for the queries clients make (the newest page, Ghost's poll with
event OR-lists and tags, one recipient, one message-id, an ascending walk from a begin time,
the next page through paging.next, and subject/from filters with rare, common and NOT terms),
printing p50/p99 per query and the CPU milliseconds per query of the API server process (which
includes SQLite's work) and of the PostgreSQL backends serving it (a server on this machine).

    .venv/bin/python bench/events_query.py [--events 10000000] [--runs 200] [--db-url postgresql://...]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailplat import config as configmod  # noqa: E402
from tests.support import init_data_dir, serve  # noqa: E402

DOMAIN = "bench-events.example.test"
DAYS = 30
RCPTS = 200_000
MSGS = 2_000_000

SQLITE_FILL = """
WITH RECURSIVE n(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM n WHERE i < {stop})
INSERT INTO event (event_id, domain, event, timestamp, recipient, message_id, severity, data)
SELECT 'b' || i, '{domain}', ev, ts, rcpt, mid, sev,
  '{{"id":"b' || i || '","event":"' || ev || '","timestamp":' || ts || ',"recipient":"' || rcpt ||
  '","severity":"' || sev || '","tags":["t' || (i % 10) || '"],"message":{{"headers":{{"message-id":"' || mid ||
  '","from":"news@{domain}","to":"' || rcpt || '","subject":"Issue ' || (i % 1000) || ' [k' || (i % 99991) || ']"}},"size":' || (1000 + i % 50000) ||
  '}},"user-variables":{{}},"flags":{{}}}}'
FROM (SELECT i,
  CASE i % 10 WHEN 0 THEN 'failed' WHEN 1 THEN 'opened' WHEN 2 THEN 'clicked' WHEN 3 THEN 'delivered'
              WHEN 4 THEN 'delivered' WHEN 5 THEN 'delivered' ELSE 'accepted' END AS ev,
  CASE WHEN i % 10 = 0 THEN (CASE WHEN i % 20 = 0 THEN 'permanent' ELSE 'temporary' END) ELSE '' END AS sev,
  {t0} + i * {step} AS ts,
  'r' || ((i * 7919) % {rcpts}) || '@x.test' AS rcpt,
  'm' || (i / 5 % {msgs}) || '@{domain}' AS mid
  FROM n)
"""

PG_FILL = """
INSERT INTO event (event_id, domain, event, timestamp, recipient, message_id, severity, data)
SELECT 'b' || i, '{domain}', ev, ts, rcpt, mid, sev,
  json_build_object('id', 'b' || i, 'event', ev, 'timestamp', ts, 'recipient', rcpt, 'severity', sev,
    'tags', json_build_array('t' || (i % 10)),
    'message', json_build_object('headers', json_build_object('message-id', mid, 'from', 'news@{domain}',
        'to', rcpt, 'subject', 'Issue ' || (i % 1000) || ' [k' || (i % 99991) || ']'), 'size', 1000 + i % 50000),
    'user-variables', '{{}}'::json, 'flags', '{{}}'::json)::text
FROM (SELECT i,
  CASE i % 10 WHEN 0 THEN 'failed' WHEN 1 THEN 'opened' WHEN 2 THEN 'clicked' WHEN 3 THEN 'delivered'
              WHEN 4 THEN 'delivered' WHEN 5 THEN 'delivered' ELSE 'accepted' END AS ev,
  CASE WHEN i % 10 = 0 THEN (CASE WHEN i % 20 = 0 THEN 'permanent' ELSE 'temporary' END) ELSE '' END AS sev,
  {t0} + i * {step} AS ts,
  'r' || ((i::bigint * 7919) % {rcpts}) || '@x.test' AS rcpt,
  'm' || (i / 5 % {msgs}) || '@{domain}' AS mid
  FROM generate_series({start}, {stop}) AS i) AS g
"""


# The text the events API's filters search (core.eventquery.search_text), for the rows above.
TEXT_FILL = """
INSERT INTO event_text (event_row, subject, from_text, to_text, attachment)
SELECT id, lower({subject}), lower({sender}) || ' ', lower({to}), '' FROM event WHERE event_id IN
  (SELECT 'b' || i FROM {series})
"""
SQLITE_TEXT = {"subject": "json_extract(data, '$.message.headers.subject')",
               "sender": "json_extract(data, '$.message.headers.from')",
               "to": "json_extract(data, '$.message.headers.to')",
               "series": "(WITH RECURSIVE n(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM n WHERE i < {stop}) "
                         "SELECT i FROM n)"}
PG_TEXT = {"subject": "(data::json #>> '{{message,headers,subject}}')",
           "sender": "(data::json #>> '{{message,headers,from}}')",
           "to": "(data::json #>> '{{message,headers,to}}')",
           "series": "generate_series({start}, {stop}) AS i"}


def build(db_url: str, total: int, now: float) -> None:
    from mailplat.store import db as storedb
    store = storedb.open_store(db_url)
    t0 = now - DAYS * 86400
    step = (DAYS * 86400 - 60) / total
    chunk = 500_000
    started = time.perf_counter()
    try:
        db = store.db
        db.connect(reuse_if_open=True)
        if not db_url.startswith("postgres"):
            db.execute_sql("PRAGMA synchronous=OFF")
            db.execute_sql("PRAGMA cache_size=-1000000")
        db.execute_sql("INSERT INTO domain (id, name, state, type, created_at, smtp_login, spam_action, wildcard, "
                       "force_dkim_authority, dkim_selector, dkim_key_size, web_scheme, web_prefix, ips, require_tls, "
                       "skip_verification, tracking_open, tracking_click, tracking_unsubscribe, "
                       "unsubscribe_html_footer, unsubscribe_text_footer, is_disabled, dns_checks) VALUES "
                       f"('benchdom', '{DOMAIN}', 'active', 'custom', {now}, 'postmaster@{DOMAIN}', 'disabled', "
                       "false, false, 'mailo', 1024, 'http', 'email', '[]', false, false, false, false, false, '', '', "
                       "false, '{}')")
        # psycopg2 reads % as a parameter marker.
        sql = PG_FILL.replace(" % ", " %% ") if db_url.startswith("postgres") else SQLITE_FILL
        text_sql = TEXT_FILL.format(**(PG_TEXT if db_url.startswith("postgres") else SQLITE_TEXT))
        for start in range(0, total, chunk):
            stop = min(total, start + chunk) - 1
            with db.atomic():
                db.execute_sql(sql.format(start=start, stop=stop, domain=DOMAIN, t0=t0, step=step,
                                          rcpts=RCPTS, msgs=MSGS))
                db.execute_sql(text_sql.format(start=start, stop=stop))
            done = stop + 1
            rate = done / (time.perf_counter() - started)
            print(f"  {done:,} events ({rate:,.0f}/s)", flush=True)
        if db_url.startswith("postgres"):
            db.execute_sql("ANALYZE event")
            db.execute_sql("ANALYZE event_text")
        else:
            db.execute_sql("ANALYZE")
    finally:
        store.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (Linux /proc)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def backend_cpu(db_url: str) -> float:
    """CPU seconds of the PostgreSQL backends serving the bench database (a local server), or 0."""
    if not db_url.startswith("postgres"):
        return 0.0
    import psycopg2
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()")
            return sum(cpu_seconds(pid) for (pid,) in cur.fetchall())
    finally:
        conn.close()


def timed(session, url, params=None) -> tuple[float, dict]:
    t = time.perf_counter()
    r = session.get(url, params=params, timeout=60)
    elapsed = time.perf_counter() - t
    r.raise_for_status()
    return elapsed, r.json()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--data-dir", default="/tmp/mailplat-bench-events")
    ap.add_argument("--db-url", default="")
    ap.add_argument("--reuse", action="store_true", help="reuse a data dir built before")
    args = ap.parse_args()
    data_dir = Path(args.data_dir)
    keyfile = data_dir / "bench-key"
    now = time.time()
    if not args.reuse:
        if data_dir.exists():
            import shutil
            shutil.rmtree(data_dir)
        data_dir.mkdir(parents=True)
        key = init_data_dir(data_dir, args.db_url or None, ["log.level=WARNING"])
        keyfile.write_text(key)
        db_url = configmod.load(data_dir=data_dir).db_url
        print(f"building {args.events:,} events in {db_url} ...", flush=True)
        t = time.perf_counter()
        build(db_url, args.events, now)
        print(f"built in {time.perf_counter() - t:.0f} s", flush=True)
        (data_dir / "bench-now").write_text(f"{now} {args.events}")
    key = keyfile.read_text().strip()
    now_text, total_text = (data_dir / "bench-now").read_text().split()
    now, total = float(now_text), int(total_text)
    srv = serve(data_dir, key, ["api"])
    db_url = configmod.load(data_dir=data_dir).db_url
    try:
        s = requests.Session()
        s.auth = ("api", key)
        base = f"{srv.url}/v3/{DOMAIN}/events"
        rnd = random.Random(7)
        queries = {
            "newest page (limit 100)": lambda: {"limit": 100},
            "Ghost poll: event OR-list, tags, begin, ascending, limit 300":
                lambda: {"event": "delivered OR failed OR opened", "tags": "t3", "ascending": "yes", "limit": 300,
                         "begin": repr(now - rnd.uniform(1, 29) * 86400)},
            "event=failed severity=permanent": lambda: {"event": "failed", "severity": "permanent", "limit": 100},
            "one recipient": lambda: {"recipient": f"r{rnd.randrange(RCPTS)}@x.test", "limit": 100},
            "one message-id": lambda: {"message-id": f"m{rnd.randrange(min(MSGS, total // 5 or 1))}@{DOMAIN}"},
            "time window begin/end": lambda: {"begin": repr(now - 20 * 86400), "end": repr(now - 19 * 86400),
                                              "limit": 300},
            # Subject text: "Issue N" is in 0.1% (N >= 100) to 11% (N < 10) of events, "[kN]" in 1 of
            # 99,991, "issue" in all; NOT of a 0.1% phrase keeps nearly all.
            "subject phrase \"Issue N\" (0.1%-11%)":
                lambda: {"subject": f'"Issue {rnd.randrange(1000)}"', "limit": 10},
            "subject phrase, limit 100": lambda: {"subject": f'"Issue {rnd.randrange(1000)}"', "limit": 100},
            "subject rare term [kN] (1 in 99,991)": lambda: {"subject": f"[k{rnd.randrange(99991)}]"},
            "subject rare OR rare": lambda: {"subject": f"[k{rnd.randrange(99991)}] OR [k{rnd.randrange(99991)}]"},
            "subject common word (every event)": lambda: {"subject": "issue", "limit": 100},
            "subject NOT phrase": lambda: {"subject": f'NOT "Issue {rnd.randrange(100, 1000)} "', "limit": 100},
            "subject common AND rare, ascending": lambda: {"subject": f"issue [k{rnd.randrange(99991)}]",
                                                           "ascending": "yes"},
            "from + subject phrase": lambda: {"from": "news@", "subject": f'"Issue {rnd.randrange(1000)}"'},
        }
        print(f"\n{'query':62} {'p50 ms':>8} {'p99 ms':>8} {'items':>6} {'CPU ms/q':>8} {'DB CPU':>7}")
        for name, make in queries.items():
            for _ in range(5):
                timed(s, base, make())
            lat, items = [], 0
            cpu, db_cpu = cpu_seconds(srv.proc.pid), backend_cpu(db_url)
            for _ in range(args.runs):
                el, body = timed(s, base, make())
                lat.append(el)
                items += len(body["items"])
            lat.sort()
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            cpu = (cpu_seconds(srv.proc.pid) - cpu) / args.runs
            db_cpu = (backend_cpu(db_url) - db_cpu) / args.runs
            print(f"{name:62} {statistics.median(lat) * 1000:8.1f} {p99 * 1000:8.1f} {items // args.runs:6} "
                  f"{cpu * 1000:8.1f} {db_cpu * 1000:7.1f}", flush=True)
        # Following paging.next the way mailgun.js does.
        _, body = timed(s, base, {"limit": 300})
        lat = []
        for _ in range(args.runs):
            token = urlparse(body["paging"]["next"]).path.rsplit("/", 1)[1]
            el, body = timed(s, f"{base}/{token}")
            lat.append(el)
        lat.sort()
        print(f"{'next page via token (limit 300)':62} {statistics.median(lat) * 1000:8.1f} "
              f"{lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000:8.1f} {len(body['items']):6}")
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
