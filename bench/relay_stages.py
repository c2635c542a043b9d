"""The relay's CPU per message, stage by stage, in one process with no lock contention.

A fresh SQLite store in a temporary directory gets one domain (2048-bit DKIM key) and --count
queued 2 KB messages (one recipient each, through core.send.submit).  Then each stage of the
relay's work runs alone over all of them and its CPU time per message is printed:

  claim+load   queue.claim_sync and relay.worker._load_jobs_sync, BATCH (20) rows a call
  prepare      render for the recipient and DKIM-sign (mailauth.dkim.sign), as the relay does
  send         relay.client.Session.send over one connection to smtp-sink (client side only)
  outcome      relay.outcome.delivered_sync, 20 deliveries a transaction

The sum is a floor for the relay's CPU per message; bench/relay_throughput.py measures the
whole relay under load (where the interpreter lock and thread hand-offs add to it).

    .venv/bin/python -W ignore bench/relay_stages.py [--count 2000]
Needs smtp-sink (apt-get install postfix); without it, tests/smtpsink.py stands in.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailplat import config as configmod  # noqa: E402
from mailplat.core import domains  # noqa: E402
from mailplat.core.context import Context  # noqa: E402
from mailplat.core.send import SendRequest, submit  # noqa: E402
from mailplat.core import render  # noqa: E402
from mailplat.mailauth import dkim as dkimsign  # noqa: E402
from mailplat.mailauth.tlspolicy import TlsPolicy  # noqa: E402
from mailplat.relay import client, outcome, worker  # noqa: E402
from mailplat.relay.mx import MxHost  # noqa: E402
from mailplat.store import queue  # noqa: E402
from mailplat.store.db import open_store  # noqa: E402
from tests.smtpsink import SmtpSink, free_port  # noqa: E402

DOMAIN = "bench.test"
BATCH = 20  # rows a claim takes: what a busy relay with the default 20 workers claims at a time


def cpu_us(fn, n: int) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) / n * 1e6


def prepare(job: worker.Job) -> bytes:
    """What the relay does to a copy before sending it, in this one thread."""
    data = render.for_recipient(job.message, job.raw, job.item.recipient, tracking=job.tracking)
    d, selector, pem = job.signing
    return dkimsign.sign(data, d, selector, pem)


def start_sink(port: int):
    if shutil.which("smtp-sink"):
        proc = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc, proc.terminate
    sink = SmtpSink(port=port).start()
    return sink, sink.stop


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = configmod.load(data_dir=Path(tmp), env={}, check_files=False)
        store = open_store(f"sqlite:///{tmp}/bench.db")
        ctx = Context(config=cfg, store=store)
        await domains.create_domain(ctx, DOMAIN, {"dkim_key_size": "2048"})
        text = "".join(f"This is line {i:05d} of the benchmark message body, padded.\n" for i in range(35))[:2048]
        for start in range(0, count, 200):
            await asyncio.gather(*(submit(ctx, SendRequest(
                domain=DOMAIN, source="api", from_=f"Bench <bench@{DOMAIN}>", to=[f"rcpt{i}@sink.test"],
                subject=f"Benchmark {i}", text=text)) for i in range(start, min(count, start + 200))))

        jobs: list[worker.Job] = []

        def claim_load():
            db = store.db
            while True:
                with db.atomic("IMMEDIATE"):
                    ids = queue.claim_sync("bench", time.time(), 300, BATCH)
                if not ids:
                    return
                with db.atomic():
                    jobs.extend(worker._load_jobs_sync(ids))
        t_claim = cpu_us(claim_load, count)
        assert len(jobs) == count, len(jobs)

        prepared: list[bytes] = []
        t_prepare = cpu_us(lambda: prepared.extend(prepare(job) for job in jobs), count)

        port = free_port()
        sink, stop = start_sink(port)
        try:
            for _ in range(100):
                try:
                    session = await client.connect([MxHost("sink.test", 10, ["127.0.0.1"])], TlsPolicy(),
                                                   port=port, ca_file="", helo="bench.localhost",
                                                   connect_timeout=5, command_timeout=30)
                    break
                except client.DeliveryError:
                    await asyncio.sleep(0.05)
            results = []
            start = time.process_time()
            for job, data in zip(jobs, prepared):
                results.append(await session.send(job.mail_from, job.item.recipient, data))
            t_send = (time.process_time() - start) / count * 1e6
            await session.close()
        finally:
            stop()

        def record():
            for i in range(0, count, 20):
                with store.db.atomic("IMMEDIATE"):
                    outcome.delivered_sync(
                        [(job.item, outcome.Result(code=r.code, message=r.message, mx_host=r.mx_host))
                         for job, r in zip(jobs[i:i + 20], results[i:i + 20])], time.time())
        t_outcome = cpu_us(record, count)
        store.close()
    total = t_claim + t_prepare + t_send + t_outcome
    print(f"relay stages, {count} x 2 KB, DKIM rsa-2048, SQLite, one thread, CPU us per message:")
    for name, value in (("claim+load", t_claim), ("prepare", t_prepare), ("send", t_send),
                        ("outcome", t_outcome), ("sum", total)):
        print(f"  {name:12s} {value:7.0f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    asyncio.run(main(ap.parse_args().count))
