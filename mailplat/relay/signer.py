"""DKIM signing in helper processes (`relay.signing_processes` per relay process).

Owns `SignerPool`, the relay's side, and `main()`, the helper (`python -m mailplat.relay.signer`).
Signing is CPU work, and most of it is pure Python (dkimpy's parsing, canonicalisation and
folding).  Run in the relay's own threads, it competes with the event loop for one interpreter
lock: every reply from a remote MX then waits for the lock, and the relay's CPU per message
doubled (bench/relay_throughput.py).  A helper has its own interpreter, so it signs on another
core while the relay's loop keeps talking SMTP.

The relay sends each helper the exact bytes to sign (mailauth.dkim.canonical_lines) with the
domain, selector and private key, and gets back the DKIM-Signature header, which it puts in
front of those bytes.  Frames on the helper's stdin and stdout: a 4-byte big-endian length, then
a pickled tuple (both ends are this module, in processes this relay started); the helper's
first frame is empty and says it is ready, which the relay's start waits for.  A helper answers
in order, so each one's waiting requests form a FIFO; a request goes to the helper with the
fewest waiting.  Requests carry no secrets on disk or in argv; the key travels over the pipe.

A helper that exits fails its waiting requests with `SignerUnavailable`: the relay then signs
those in a thread as it does with no helpers, so no message waits for a retry.  A dead helper
is started again at the next request, at most once per RESTART_DELAY seconds.  A helper exits
when its stdin closes (the relay stopped or died); it ignores SIGINT and SIGTERM so that a
relay finishing its deliveries on shutdown still has it.
"""
from __future__ import annotations

import asyncio
import pickle
import signal
import struct
import sys
import time
from collections import deque

from .. import logs

log = logs.get("mailplat.relay")

_LEN = struct.Struct(">I")
RESTART_DELAY = 1.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
# Bytes queued for one helper before a request waits for the pipe to drain.
HIGH_WATER = 1 << 20


class SignerUnavailable(Exception):
    """No helper could sign this message (it exited); sign it some other way."""


class SigningFailed(Exception):
    """The helper could not sign (an unusable key, say); the message says why."""


class _Helper:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.waiting: deque[asyncio.Future] = deque()
        self.alive = True
        self.ready = asyncio.Event()  # the helper has imported what it signs with
        self.reader: asyncio.Task | None = None


class SignerPool:
    def __init__(self, processes: int):
        self.slots: list[_Helper | None] = [None] * processes
        self.restart_at = 0.0
        self.closed = False

    async def start(self) -> None:
        """Start the helpers and wait (bounded) until they are ready to sign, so the relay
        does not lease rows it cannot yet prepare."""
        helpers = [await self._start(slot) for slot in range(len(self.slots))]
        waits = [h.ready.wait() for h in helpers if h is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), READY_TIMEOUT)
        except asyncio.TimeoutError:
            log.error("DKIM signing processes not ready after %s s; messages wait for them", READY_TIMEOUT)

    async def _start(self, slot: int) -> _Helper | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE)
        except OSError as exc:
            log.error("starting a DKIM signing process failed: %s", exc)
            return None
        helper = _Helper(proc)
        helper.reader = asyncio.create_task(self._read(helper), name="dkim-signer-reader")
        self.slots[slot] = helper
        return helper

    async def _pick(self) -> _Helper:
        alive = [h for h in self.slots if h is not None and h.alive]
        if len(alive) < len(self.slots) and not self.closed and time.monotonic() >= self.restart_at:
            self.restart_at = time.monotonic() + RESTART_DELAY
            for slot, helper in enumerate(self.slots):
                if helper is None or not helper.alive:
                    started = await self._start(slot)
                    if started is not None:
                        alive.append(started)
        if not alive:
            raise SignerUnavailable("no DKIM signing process is running")
        return min(alive, key=lambda h: len(h.waiting))

    async def signature(self, message: bytes, domain: str, selector: str, pem: str | bytes) -> bytes:
        """The DKIM-Signature header for `message` (mailauth.dkim.canonical_lines output)."""
        if self.closed:
            raise SignerUnavailable("the signing processes are stopped")
        helper = await self._pick()
        frame = pickle.dumps((message, domain, selector, pem), protocol=pickle.HIGHEST_PROTOCOL)
        waiter = asyncio.get_running_loop().create_future()
        helper.waiting.append(waiter)
        stdin = helper.proc.stdin
        try:
            stdin.write(_LEN.pack(len(frame)) + frame)
            if stdin.transport.get_write_buffer_size() > HIGH_WATER:
                await stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            # The pipe is gone: the reader sees EOF and fails every waiting request.
            log.debug("writing to a DKIM signing process failed: %s", exc)
        ok, value = await waiter
        if not ok:
            raise SigningFailed(value)
        return value

    async def _read(self, helper: _Helper) -> None:
        stdout = helper.proc.stdout
        try:
            if _LEN.unpack(await stdout.readexactly(_LEN.size))[0] != 0:
                raise ConnectionError("the helper did not say it was ready")
            helper.ready.set()
            while True:
                size = _LEN.unpack(await stdout.readexactly(_LEN.size))[0]
                reply = pickle.loads(await stdout.readexactly(size))
                waiter = helper.waiting.popleft()
                if not waiter.done():  # its caller may have been cancelled
                    waiter.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            helper.alive = False
            helper.ready.set()  # nobody waits for a helper that is gone
            while helper.waiting:
                waiter = helper.waiting.popleft()
                if not waiter.done():
                    waiter.set_exception(SignerUnavailable("the DKIM signing process exited"))
            code = await helper.proc.wait()
            if not self.closed:
                log.error("DKIM signing process %s exited (code %s); its messages are signed in the "
                          "relay until it is started again", helper.proc.pid, code)

    async def close(self) -> None:
        self.closed = True
        helpers = [h for h in self.slots if h is not None]
        for helper in helpers:
            if helper.proc.stdin and not helper.proc.stdin.is_closing():
                helper.proc.stdin.close()
        for helper in helpers:
            try:
                await asyncio.wait_for(helper.proc.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                helper.proc.kill()
                await helper.proc.wait()
            if helper.reader is not None:
                await asyncio.gather(helper.reader, return_exceptions=True)


def main() -> int:
    """The helper: sign what arrives on stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..mailauth.dkim import signature_header
    read, out = sys.stdin.buffer.read, sys.stdout.buffer
    out.write(_LEN.pack(0))  # ready: an empty frame
    out.flush()
    while True:
        head = read(_LEN.size)
        if len(head) < _LEN.size:
            return 0
        body = read(_LEN.unpack(head)[0])
        try:
            message, domain, selector, pem = pickle.loads(body)
            reply = (True, signature_header(message, domain, selector, pem))
        except Exception as exc:  # noqa: BLE001 - reported to the relay, which decides
            reply = (False, f"{exc.__class__.__name__}: {exc}")
        frame = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_LEN.pack(len(frame)) + frame)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
