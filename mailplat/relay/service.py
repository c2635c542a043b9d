"""The relay service (`mailplat serve relay`): outbound delivery from the queue.

Owns the service lifecycle only: start() runs relay.worker's loop and binds no port; stop()
stops claiming, releases the leases of rows not yet started and lets in-flight deliveries
finish (bounded; anything cut short is retried after its lease).  The work itself is in
relay.worker (scheduling), relay.mx, relay.client, relay.outcome.
"""
from __future__ import annotations

from ..core.context import Context
from .worker import Worker


class Service:
    name = "relay"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.worker = Worker(ctx)

    async def start(self) -> dict[str, int]:
        await self.worker.start()
        return {}

    async def stop(self) -> None:
        await self.worker.stop()


def create(ctx: Context) -> Service:
    return Service(ctx)
