"""Wake-ups between the mailplat processes of one host (the systemd units of each service,
smtp.processes, relay.processes): a process whose commit made work for a service pokes that
service's processes at once, instead of leaving the work to their next poll.

Owns the mechanism only.  A listening process binds a Unix datagram socket
<data_dir>/run/<topic>.<pid>.<token> and calls its callback on the event loop when a datagram
arrives; `poke(data_dir, topic)` sends one byte to every listener of `topic` but this
process's own (which in-process wakers already reach).  Best effort by design: a full socket
is skipped (its owner is being woken anyway), a dead process's socket is removed, and polling
stays the backstop, so a lost poke costs latency, never mail.  Topics: "queue" (rows for the
relay: core.send) and "inbound" (jobs for the inbound worker: core.receive).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from . import logs

log = logs.get("mailplat.triggers")
RESCAN_SECONDS = 1.0  # how long a list of listeners is trusted (a new listener polls meanwhile)

_lock = threading.Lock()
_own: set[str] = set()  # socket paths this process listens on
_peers: dict[tuple[str, str], tuple[float, list[str]]] = {}  # (run dir, topic) -> (listed at, paths)
_sender: socket.socket | None = None


def run_dir(data_dir) -> Path:
    return Path(data_dir) / "run"


class Listener:
    """A topic's socket, read on the running event loop; close() removes it."""

    def __init__(self, data_dir, topic: str, callback: Callable[[], None]):
        self.topic = topic
        directory = run_dir(data_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = str(directory / f"{topic}.{os.getpid()}.{secrets.token_hex(4)}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(self.path)
        self.callback = callback
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._ready)
        with _lock:
            _own.add(self.path)
            _peers.pop((str(directory), topic), None)

    def _ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv(64):
                pass
        log.debug("woken by another process", extra={"fields": {"topic": self.topic}})
        self.callback()

    def close(self) -> None:
        with _lock:
            _own.discard(self.path)
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def listen(data_dir, topic: str, callback: Callable[[], None]) -> Listener | None:
    """A Listener, or None (logged) when the socket cannot be made: the caller then relies on
    polling alone (a data dir path too long for a Unix socket, a read-only data dir)."""
    try:
        return Listener(data_dir, topic, callback)
    except OSError as exc:
        log.warning("no wake-up socket for %s (polling only): %s", topic, exc)
        return None


def poke(data_dir, topic: str) -> None:
    """Wake every other process listening on `topic` (any thread; a few microseconds each)."""
    global _sender
    directory = str(run_dir(data_dir))
    now = time.monotonic()
    with _lock:
        listed = _peers.get((directory, topic))
        if listed is None or now - listed[0] > RESCAN_SECONDS:
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                names = []
            prefix = topic + "."
            paths = [p for p in (os.path.join(directory, n) for n in names if n.startswith(prefix))
                     if p not in _own]
            _peers[(directory, topic)] = listed = (now, paths)
        if _sender is None:
            _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            _sender.setblocking(False)
        for path in list(listed[1]):
            try:
                _sender.sendto(b"!", path)
            except BlockingIOError:
                pass  # its queue is full: that process is being woken already
            except (ConnectionRefusedError, FileNotFoundError):
                listed[1].remove(path)  # its process is gone
                with contextlib.suppress(OSError):
                    os.unlink(path)
            except OSError as exc:
                log.warning("wake-up of %s failed: %s", path, exc)
