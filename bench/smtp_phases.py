"""Where a submission's time goes, seen from the client: per-step latency of trusted-network
submissions (connect and banner, EHLO, MAIL, RCPT, DATA, the body up to its 250, QUIT), one
message per connection as smtp-source sends them, with --sessions concurrent clients.

Point it at a running submission port that trusts 127.0.0.0/8 and hosts bench.test, e.g. the
one `KEEP=1 SKIP_POSTFIX=1 PATHS=submission bash bench/smtp_accept.sh 200` leaves running
(its port is in <work dir>/mailplat/ports.json, "submission").

    .venv/bin/python bench/smtp_phases.py PORT [--sessions 10] [--count 3000] [--size 1024]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import time

STEPS = (("ehlo", b"EHLO client.test\r\n"), ("mail", b"MAIL FROM:<bench@bench.test>\r\n"),
         ("rcpt", b"RCPT TO:<sink@relay.test>\r\n"), ("data", b"DATA\r\n"), ("body", None),
         ("quit", b"QUIT\r\n"))


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if line[3:4] != b"-":
            return line


async def main(args) -> None:
    body = (b"From: <bench@bench.test>\r\nTo: <sink@relay.test>\r\nSubject: phases\r\n\r\n"
            + (b"x" * 70 + b"\r\n") * max(1, args.size // 72) + b".\r\n")
    latency = collections.defaultdict(list)
    left = args.count

    async def session() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
            await reply(reader)
            now = time.perf_counter()
            latency["connect+banner"].append(now - t)
            for name, command in STEPS:
                t = now
                writer.write(body if command is None else command)
                line = await reply(reader)
                now = time.perf_counter()
                latency[name].append(now - t)
                if line[:1] not in b"23":
                    raise SystemExit(f"{name}: {line!r}")
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(args.sessions)))
    print(f"{args.count / (time.perf_counter() - start):.0f} msg/s, {args.sessions} sessions, {args.size} B")
    for name, values in latency.items():
        values.sort()
        print(f"  {name:15s} mean {statistics.mean(values) * 1e3:6.2f} ms  p50 {values[len(values) // 2] * 1e3:6.2f}"
              f"  p90 {values[len(values) * 9 // 10] * 1e3:6.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--size", type=int, default=1024)
    asyncio.run(main(ap.parse_args()))
