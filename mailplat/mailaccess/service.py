"""The mailaccess service (being built).

Nothing is queued for it yet (webhooks and routes arrive with their issues), so it starts and
stops cleanly and binds no port.
"""
from __future__ import annotations

from ..core.context import Context


class Service:
    name = "mailaccess"

    def __init__(self, ctx: Context):
        self.ctx = ctx

    async def start(self) -> dict[str, int]:
        return {}

    async def stop(self) -> None:
        return None


def create(ctx: Context) -> Service:
    return Service(ctx)
