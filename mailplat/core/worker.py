"""The background worker loop shared by the inbound worker, the route worker and the hooks
outbox poster: run a pass, then sleep until woken (work committed in this process) or until
the poll interval passes (work committed by other processes), until told to stop.  A failing
pass is logged and retried; it never ends the worker."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from .. import logs

log = logs.get("mailplat.worker")


async def poll_loop(name: str, stopping: asyncio.Event, wake: asyncio.Event,
                    step: Callable[[], Awaitable[object]], poll: float,
                    min_pass: float = 0.0) -> None:
    """`min_pass` spaces passes at least that far apart, so that under load the wake-ups of
    many small commits are gathered into fuller passes."""
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        wake.clear()
        started = loop.time()
        try:
            await step()
        except Exception:  # noqa: BLE001 - keep the worker alive; the work stays queued
            log.exception("%s pass failed; will retry", name)
            await asyncio.sleep(1.0)
        try:
            await asyncio.wait_for(wake.wait(), poll)
        except asyncio.TimeoutError:
            pass
        rest = min_pass - (loop.time() - started)
        if rest > 0:
            await asyncio.sleep(rest)
