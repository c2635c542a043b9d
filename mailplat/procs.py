"""Further processes a service runs beside itself (relay.processes, smtp.processes).

Owns the mechanics only.  In the parent, `Children` starts each one (multiprocessing, spawned,
not forked: the parent already has threads), starts it again when it exits unexpectedly, and
on stop() sends SIGTERM and waits (bounded) before killing.  In the child, `child_main` sets up
logging, opens the store and runs the service's `body(ctx, stop)` until SIGTERM/SIGINT or
until the parent is gone.  The parent passes the configuration the child is to run with.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import signal
from typing import Awaitable, Callable

from . import logs
from .config import Config
from .core.context import Context
from .store.db import open_store

log = logs.get("mailplat.procs")
RESTART_DELAY = 1.0

Body = Callable[[Context, asyncio.Event], Awaitable[None]]


class Children:
    """`count` processes running `child_main(cfg, body)`; `body` must be a module-level
    coroutine function (the spawned child imports it by name)."""

    def __init__(self, name: str, count: int, cfg: Config, body: Body, stop_timeout: float):
        self.name = name
        self.cfg = cfg
        self.body = body
        self.stop_timeout = stop_timeout
        self.procs: list[multiprocessing.Process | None] = [None] * count
        self.stopping = False

    def start(self) -> None:
        for slot in range(len(self.procs)):
            self._start(slot)

    def _start(self, slot: int) -> None:
        if self.stopping:
            return
        proc = multiprocessing.get_context("spawn").Process(
            target=child_main, args=(self.cfg, self.body), name=f"mailplat-{self.name}-{slot + 2}",
            daemon=False)
        proc.start()
        self.procs[slot] = proc
        asyncio.get_running_loop().add_reader(proc.sentinel, self._exited, slot, proc)

    def _exited(self, slot: int, proc: multiprocessing.Process) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(proc.sentinel)
        proc.join()
        if self.stopping:
            return
        log.error("%s process %s exited (code %s); starting it again", self.name, proc.pid, proc.exitcode)
        loop.call_later(RESTART_DELAY, self._start, slot)

    async def stop(self) -> None:
        """SIGTERM to every child (each stops its service as the parent does), then wait."""
        self.stopping = True
        running = [p for p in self.procs if p is not None and p.is_alive()]
        for proc in running:
            asyncio.get_running_loop().remove_reader(proc.sentinel)
            proc.terminate()
        await asyncio.to_thread(self._join, running)

    def _join(self, procs: list[multiprocessing.Process]) -> None:
        for proc in procs:
            proc.join(self.stop_timeout)
            if proc.is_alive():
                log.warning("%s process %s did not stop; killing it", self.name, proc.pid)
                proc.kill()
                proc.join()


def child_main(cfg: Config, body: Body) -> None:
    logs.setup(cfg.log.level, cfg.log.format)
    asyncio.run(_child(cfg, body))


async def _child(cfg: Config, body: Body) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = multiprocessing.parent_process()
    if parent is not None:  # its sentinel becomes readable when the parent exits
        loop.add_reader(parent.sentinel, lambda: (loop.remove_reader(parent.sentinel), stop.set()))
    store = open_store(cfg.db_url, migrate=False)
    try:
        await body(Context(config=cfg, store=store), stop)
    finally:
        store.close()
