"""The relay service (`mailplat serve relay`): outbound delivery from the queue.

Owns the service lifecycle only: start() runs relay.worker's loop and binds no port; stop()
stops claiming, releases the leases of rows not yet started and lets in-flight deliveries
finish (bounded; anything cut short is retried after its lease).  The work itself is in
relay.worker (scheduling), relay.mx, relay.client, relay.outcome.

With `relay.processes` = N > 1 the service also starts N - 1 further relay processes
(multiprocessing, spawned, not forked: this process already has threads) that run the same
loop on the same store.  Rendering, signing and the SMTP dialogue are CPU work under one
interpreter lock per process; more processes use more cores.  They share the queue exactly as
separately started relays do (store.queue leases: no row is sent twice), and relay.workers
and relay.per_destination, which are totals, are divided between them.  A process that exits
unexpectedly is started again; each one stops when this service stops or this process dies.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import multiprocessing
import signal

from .. import logs
from ..config import Config
from ..core.context import Context
from ..store.db import open_store
from .worker import STOP_TIMEOUT, Worker

log = logs.get("mailplat.relay")
RESTART_DELAY = 1.0


def share(cfg: Config) -> Config:
    """The configuration one of `relay.processes` processes runs with: its part of the totals."""
    n = cfg.relay.processes
    if n <= 1:
        return cfg
    relay = dataclasses.replace(cfg.relay, workers=math.ceil(cfg.relay.workers / n),
                                per_destination=math.ceil(cfg.relay.per_destination / n))
    return dataclasses.replace(cfg, relay=relay)


class Service:
    name = "relay"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = share(ctx.config)
        self.worker = Worker(dataclasses.replace(ctx, config=self.cfg))
        self.children: list[multiprocessing.Process | None] = [None] * (ctx.config.relay.processes - 1)
        self.stopping = False

    async def start(self) -> dict[str, int]:
        await self.worker.start()
        for slot in range(len(self.children)):
            self._start_child(slot)
        return {}

    def _start_child(self, slot: int) -> None:
        if self.stopping:
            return
        proc = multiprocessing.get_context("spawn").Process(
            target=child_main, args=(self.cfg,), name=f"mailplat-relay-{slot + 2}", daemon=False)
        proc.start()
        self.children[slot] = proc
        asyncio.get_running_loop().add_reader(proc.sentinel, self._child_exited, slot, proc)

    def _child_exited(self, slot: int, proc: multiprocessing.Process) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(proc.sentinel)
        proc.join()
        if self.stopping:
            return
        # Its leased rows go back to the queue when the leases run out (as after kill -9).
        log.error("relay process %s exited (code %s); starting it again", proc.pid, proc.exitcode)
        loop.call_later(RESTART_DELAY, self._start_child, slot)

    async def stop(self) -> None:
        self.stopping = True
        running = [p for p in self.children if p is not None and p.is_alive()]
        for proc in running:
            asyncio.get_running_loop().remove_reader(proc.sentinel)
            proc.terminate()  # SIGTERM: the child stops as this worker does
        await self.worker.stop()
        await asyncio.to_thread(_join, running, STOP_TIMEOUT + 10)


def _join(procs: list[multiprocessing.Process], timeout: float) -> None:
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            log.warning("relay process %s did not stop; killing it", proc.pid)
            proc.kill()
            proc.join()


def child_main(cfg: Config) -> None:
    """A further relay process: its own store connection and worker, until SIGTERM/SIGINT or
    until the process that started it is gone."""
    logs.setup(cfg.log.level, cfg.log.format)
    asyncio.run(_child(cfg))


async def _child(cfg: Config) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = multiprocessing.parent_process()
    if parent is not None:  # its sentinel becomes readable when the parent exits
        loop.add_reader(parent.sentinel, lambda: (loop.remove_reader(parent.sentinel), stop.set()))
    store = open_store(cfg.db_url, migrate=False)
    worker = Worker(Context(config=cfg, store=store))
    try:
        await worker.start()
        await stop.wait()
        await worker.stop()
    finally:
        store.close()


def create(ctx: Context) -> Service:
    return Service(ctx)
