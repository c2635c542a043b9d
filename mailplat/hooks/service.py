"""The hooks service: signed webhook and route-forward deliveries from the outbox.

Nothing is queued for it yet (webhooks and routes arrive with their issues), so it starts and
stops cleanly and binds no port.
"""
from __future__ import annotations

from ..core.context import Context


class HooksService:
    name = "hooks"

    def __init__(self, ctx: Context):
        self.ctx = ctx

    async def start(self) -> dict[str, int]:
        return {}

    async def stop(self) -> None:
        return None


def create(ctx: Context) -> HooksService:
    return HooksService(ctx)
