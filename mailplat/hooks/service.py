"""The hooks service: the route/list worker and the outbox poster.

Runs core.routejobs (inbound messages through routes, lists and spam verdicts) and the outbox
(signed HTTP posts with retries: route forward(), store(notify=), webhooks later) until
stopped; stop() lets the current pass finish.  Binds no port.
"""
from __future__ import annotations

import asyncio

from ..core import routejobs, webhooks
from ..core.context import Context
from . import outbox


class HooksService:
    name = "hooks"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> dict[str, int]:
        routejobs.OUTBOX_WAKERS.append(outbox.wake)
        self.tasks = [asyncio.create_task(routejobs.run(self.ctx, self.stopping), name="route-worker"),
                      asyncio.create_task(outbox.run(self.ctx, self.stopping), name="outbox-poster"),
                      asyncio.create_task(webhooks.run_retention(self.ctx, self.stopping), name="event-retention")]
        return {}

    async def stop(self) -> None:
        self.stopping.set()
        routejobs.wake()
        outbox.wake()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if outbox.wake in routejobs.OUTBOX_WAKERS:
            routejobs.OUTBOX_WAKERS.remove(outbox.wake)


def create(ctx: Context) -> HooksService:
    return HooksService(ctx)
