"""Relay throughput: N queued messages relayed to a local sink with DKIM-2048 signing, msgs/s.

Side by side, in the same run on this machine, a private Postfix instance (own config and
queue directories) relays the same number of messages to the same sink (Postfix's smtp-sink),
for the ratio.  Postfix here does not sign (no milter): mailplat's figure includes a 2048-bit
RSA DKIM signature per message, Postfix's does not.

mailplat: `mailplat serve api` creates the domain (with its 2048-bit key), N messages (one
recipient each) are queued through core.send.submit, the API stops, then `mailplat serve relay`
starts and is timed until every queue row is delivered (queue updated_at).
Postfix: messages are injected with smtp-source while its queue manager is disabled (they wait
in the incoming queue), then qmgr is enabled (postfix reload); timed until the queue is empty.

Rates, each N over an interval:
  at work         mailplat: its first claim (a leased row, polled every 10 ms) to its last
                  delivery; Postfix: `postfix reload` returned to the empty queue.  Both start
                  when the relay begins on the queue, leaving out starting Python and running
                  the reload script (which alone takes seconds here).  The first ratio printed.
  first to last   first delivery to last (Postfix: the queue first holding fewer than N files,
                  polled every 10 ms).  Leaves out Postfix's queue manager reading the queue
                  before its first delivery, and mailplat's first claim and load.
  wall            from starting the relay process / from running postconf and the reload.

Usage: .venv/bin/python bench/relay_throughput.py [N] [--size BYTES] [--no-postfix] [--sink py]
       [--processes P] [--no-dkim]
Needs: apt-get install postfix (smtp-sink, smtp-source); --sink py uses tests/smtpsink.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = str(ROOT / ".venv" / "bin" / "python")
# Connections to the one destination, the same for both: Postfix's default destination
# concurrency limit is 20; mailplat's relay.per_destination is set to match.
CONCURRENCY = 20

from tests.dnsserver import DnsServer  # noqa: E402
from tests.smtpsink import SmtpSink, free_port  # noqa: E402


def wait(pred, timeout, what, interval=0.05):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds so far of a process and its live children (relay.processes),
    all their threads, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
    return user, system


def start_sink(kind: str, port: int):
    if kind == "py":
        return SmtpSink(port=port).start()
    proc = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        import socket
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False
    wait(up, 10, "smtp-sink")
    return proc


def stop_sink(sink):
    if isinstance(sink, SmtpSink):
        sink.stop()
    else:
        sink.terminate()
        sink.wait()


def mailplat_run(work: Path, n: int, size: int, sink_port: int, dns: DnsServer, no_dkim: bool = False,
                 processes: int = 1) -> dict:
    data = work / "mailplat"
    sets = ["relay.allow_private_mx=true", f"relay.remote_port={sink_port}", "dns.nameserver=127.0.0.1",
            f"dns.port={dns.port}", "log.level=WARNING", f"relay.per_destination={CONCURRENCY}",
            f"relay.processes={processes}"]
    args = [PY, "-m", "mailplat.cli", "init", "--data-dir", str(data), "--hostname", "bench.localhost"]
    for name in ("api", "smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s"):
        args += [f"--{name}-port", "0"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    key = re.search(r"primary API key: (key-\S+)", out).group(1)
    api = subprocess.Popen([PY, "-m", "mailplat.cli", "serve", "--data-dir", str(data), "api"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait(lambda: (data / "ports.json").exists() and json.loads((data / "ports.json").read_text()), 60, "api")
        port = json.loads((data / "ports.json").read_text())["api"]
        import requests
        r = requests.post(f"http://127.0.0.1:{port}/v3/domains", auth=("api", key),
                          data={"name": "bench.test", "dkim_key_size": "2048"}, timeout=60)
        r.raise_for_status()
    finally:
        api.terminate()
        api.wait()
    dns.add("sink.test", "MX", "10 mx.sink.test.")
    dns.add("mx.sink.test", "A", "127.0.0.1")

    from mailplat import config as configmod
    from mailplat.core.context import Context
    from mailplat.core.send import SendRequest, submit
    from mailplat.store.db import Store
    cfg = configmod.load(data_dir=data)
    text = "".join(f"This is line {i:05d} of the benchmark message body, padded.\n"
                   for i in range(size // 60 + 1))[:size]

    from mailplat.core.options import Options
    opts = Options()
    if no_dkim:
        opts.dkim = False

    async def enqueue():
        store = Store(cfg.db_url)
        ctx = Context(config=cfg, store=store)
        try:
            for start in range(0, n, 200):
                await asyncio.gather(*(submit(ctx, SendRequest(
                    domain="bench.test", source="api", from_="Bench <bench@bench.test>",
                    to=[f"rcpt{i}@sink.test"], subject=f"Benchmark {i}", text=text, options=opts))
                    for i in range(start, min(n, start + 200))))
        finally:
            store.close()
    asyncio.run(enqueue())

    db = sqlite3.connect(str(data / "mailplat.db"))
    t0 = time.time()
    # RELAY_PROFILE=out.txt: sample the relay process with py-spy (on PATH or in .venv), all threads.
    profile = ([shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy"), "record", "-f", "raw", "-r", "200", "--nonblocking", "--threads", "-o",
                os.environ["RELAY_PROFILE"], "--"] if os.environ.get("RELAY_PROFILE") else [])
    relay = subprocess.Popen([*profile, PY, "-m", "mailplat.cli", "serve", "--data-dir", str(data), "relay"],
                             cwd=ROOT, stdout=open(work / "relay.log", "wb"), stderr=subprocess.STDOUT)
    pid = relay.pid if not profile else None
    try:
        def finished() -> int:
            return db.execute("select count(*) from queue_item where state != 'queued'").fetchone()[0]

        def started() -> bool:  # a row claimed (leased) or done: the relay is at work
            return db.execute("select 1 from queue_item where lease_owner is not null or state != 'queued' "
                              "limit 1").fetchone() is not None
        wait(started, 600, "mailplat's first claim", interval=0.01)
        t_work = time.time()
        # CPU per message: the relay process's CPU seconds (all threads) from its first
        # delivery to its last, over the messages delivered in between; start-up is left out.
        wait(lambda: finished() > 0, 600, "mailplat's first delivery")
        cpu0, done0 = (proc_cpu(pid), finished()) if pid else ((0.0, 0.0), 0)
        wait(lambda: finished() >= n, 1800, "mailplat to relay everything")
        wall = time.time() - t0
        user, system = (b - a for a, b in zip(cpu0, proc_cpu(pid))) if pid else (float("nan"),) * 2
        cpu, cpu_sys = (user + system) / max(1, n - done0), system / max(1, n - done0)
    finally:
        relay.send_signal(2 if profile else 15)
        relay.wait()
    states = dict(db.execute("select state, count(*) from queue_item group by state").fetchall())
    first, last = db.execute("select min(updated_at), max(updated_at) from queue_item where state='delivered'").fetchone()
    return {"states": states, "wall_s": wall, "rate_wall": n / wall, "cpu_per_msg": cpu, "sys_per_msg": cpu_sys,
            "rate_active": n / (last - first) if last and last > first else float("nan"),
            "rate_work": n / (last - t_work)}


def postfix_run(work: Path, n: int, size: int, sink_port: int) -> dict:
    pf = work / "postfix"
    port = free_port()
    for d in ("etc", "spool", "data"):
        (pf / d).mkdir(parents=True)
    shutil.chown(pf / "data", "postfix")
    master = Path("/etc/postfix/master.cf").read_text()
    # No chroot (the private queue has no /etc copies); smtpd on a high loopback port.
    master = re.sub(r"^([a-z][^ ]*\s+[a-z]+\s+[-yn]\s+[-yn]\s+)y(\s)", r"\1n\2", master, flags=re.M)
    master = re.sub(r"^smtp(\s+inet)", f"127.0.0.1:{port}\\1", master, flags=re.M)
    (pf / "etc" / "master.cf").write_text(master)
    (pf / "etc" / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {pf}/spool
data_directory = {pf}/data
myhostname = postfix-bench.localhost
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = sink.test
alias_maps =
alias_database =
smtp_dns_support_level = disabled
smtp_host_lookup = native
relayhost = [127.0.0.1]:{sink_port}
smtp_destination_concurrency_limit = {CONCURRENCY}
default_destination_concurrency_limit = {CONCURRENCY}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
maillog_file_prefixes = {pf}
maillog_file = {pf}/maillog
master_service_disable = qmgr.unix
# Injection happens while the queue manager is off, so nothing leaves: without this, Postfix's
# arrival flow control pauses each message 1 s (the untimed injection then takes minutes).
in_flow_delay = 0
""")
    cfg = ["-c", str(pf / "etc")]
    subprocess.run(["postfix", *cfg, "check"], check=True)
    subprocess.run(["postfix", *cfg, "start"], capture_output=True)  # status checked by up() below
    try:
        import socket

        def up():
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return True
            except OSError:
                return False
        wait(up, 20, "postfix smtpd")
        src = subprocess.run(["smtp-source", "-s", "10", "-m", str(n), "-l", str(size), "-f", "bench@bench.test",
                              "-t", "rcpt@sink.test", f"127.0.0.1:{port}"], capture_output=True, text=True)
        if src.returncode != 0:
            log = (pf / "maillog").read_text() if (pf / "maillog").exists() else ""
            raise SystemExit(f"smtp-source failed: {src.stderr.strip()}\n{log[-2000:]}")

        def queued():  # queue files (postqueue refuses a private config directory)
            return sum(len(files) for sub in ("maildrop", "incoming", "active", "deferred", "hold")
                       for _, _, files in os.walk(pf / "spool" / sub))
        wait(lambda: queued() >= n, 300, "postfix to queue everything")
        t0 = time.time()
        # Everything sits in the incoming queue (no queue manager yet); start it and time.
        subprocess.run(["postconf", *cfg, "-e", "master_service_disable="], check=True)
        subprocess.run(["postfix", *cfg, "reload"], check=True, capture_output=True)
        t_work = time.time()  # the reload is done: the queue manager starts on the queue now
        # Postfix logs to the second only: its first delivery is taken as the moment the queue
        # first holds fewer than n files (polled every 10 ms), for a figure like mailplat's.
        wait(lambda: queued() < n, 600, "postfix's first delivery", interval=0.01)
        t1 = time.time()
        wait(lambda: queued() == 0, 1800, "postfix to relay everything")
        t2 = time.time()
    finally:
        subprocess.run(["postfix", *cfg, "stop"], capture_output=True)
    return {"wall_s": t2 - t0, "rate_wall": n / (t2 - t0), "rate_active": n / (t2 - t1),
            "rate_work": n / (t2 - t_work)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=2000)
    ap.add_argument("--size", type=int, default=2048, help="body bytes")
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--no-dkim", action="store_true", help="mailplat without signing (for comparison)")
    ap.add_argument("--processes", type=int, default=1, help="relay.processes (connections stay 20 in all)")
    ap.add_argument("--sink", choices=["smtp-sink", "py"], default="smtp-sink")
    args = ap.parse_args()
    if args.sink == "smtp-sink" and not shutil.which("smtp-sink"):
        print("smtp-sink missing (apt-get install postfix); falling back to --sink py", file=sys.stderr)
        args.sink = "py"
    # A SIGTERM (timeout, kill) runs the clean-up below too: the private Postfix and the sink
    # are stopped instead of being left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="relay-bench."))
    os.chmod(work, 0o755)  # Postfix's own user must reach its data directory inside
    sink_port = free_port()
    sink = start_sink(args.sink, sink_port)
    dns = DnsServer()
    dns.start()
    try:
        mp = mailplat_run(work, args.n, args.size, sink_port, dns, args.no_dkim, args.processes)
        print(f"mailplat relay ({args.processes} process{'es' if args.processes > 1 else ''}), "
              f"{'no DKIM' if args.no_dkim else 'DKIM rsa-2048'}, {args.n} msgs of ~{args.size} B to {args.sink}: "
              f"{mp['rate_work']:.0f} msgs/s at work (first claim to last delivery), "
              f"{mp['rate_active']:.0f} msgs/s first to last delivery, {mp['rate_wall']:.0f} msgs/s "
              f"wall incl. start-up ({mp['wall_s']:.1f} s); relay CPU {mp['cpu_per_msg'] * 1000:.2f} ms/msg "
              f"({mp['sys_per_msg'] * 1000:.2f} system); "
              f"states {mp['states']}")
        if not args.no_postfix and shutil.which("postfix"):
            pf = postfix_run(work, args.n, args.size, sink_port)
            print(f"postfix relay, no DKIM, {args.n} msgs to {args.sink}: {pf['rate_work']:.0f} msgs/s at work "
                  f"(reload done to empty queue), {pf['rate_active']:.0f} msgs/s first to last delivery, "
                  f"{pf['rate_wall']:.0f} msgs/s wall incl. postconf and reload ({pf['wall_s']:.1f} s)")
            print(f"ratio mailplat/postfix: {mp['rate_work'] / pf['rate_work']:.2f}x at work, "
                  f"{mp['rate_active'] / pf['rate_active']:.2f}x first to last delivery, "
                  f"{mp['rate_wall'] / pf['rate_wall']:.2f}x wall")
    finally:
        dns.stop()
        stop_sink(sink)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
