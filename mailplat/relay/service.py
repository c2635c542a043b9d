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

from .. import logs
from ..config import Config
from ..core.context import Context
from ..procs import Children
from .worker import STOP_TIMEOUT, Worker

log = logs.get("mailplat.relay")


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
        # Its leased rows go back to the queue when the leases run out (as after kill -9).
        self.children = Children("relay", ctx.config.relay.processes - 1, self.cfg, child_body,
                                 STOP_TIMEOUT + 10)

    async def start(self) -> dict[str, int]:
        await self.worker.start()
        self.children.start()
        return {}

    async def stop(self) -> None:
        await asyncio.gather(self.children.stop(), self.worker.stop())


async def child_body(ctx: Context, stop) -> None:
    """A further relay process: its own worker on the same store, until told to stop."""
    worker = Worker(ctx)
    await worker.start()
    await stop.wait()
    await worker.stop()


def create(ctx: Context) -> Service:
    return Service(ctx)
