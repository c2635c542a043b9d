"""The mailaccess service: IMAP (143 STARTTLS, 993 implicit TLS) and POP3 (110 STLS, 995
implicit TLS) listeners on Twisted's asyncio reactor, plus the inbound worker.

Owns binding and stopping the four listeners (port 0 = any free port; the bound ports are
returned by start()) and running core.receive.run_inbound_worker: mail accepted by the MX
reaches mailboxes only while a mailaccess service runs somewhere on the store.  Protocols live
in imap.py and pop3.py.
"""
from __future__ import annotations

import asyncio

from .. import logs
from ..core import receive
from ..core.context import Context
from . import realm

log = logs.get("mailplat.mailaccess")


class Service:
    name = "mailaccess"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.listeners = []
        self.factories = []
        self.stopping = asyncio.Event()
        self.worker: asyncio.Task | None = None

    async def start(self) -> dict[str, int]:
        from twisted.internet import reactor  # installed on this loop by the supervisor
        from .imap import IMAPFactory
        from .pop3 import POP3Factory
        cfg = self.ctx.config
        tls = realm.tls_options(self.ctx)
        throttle = realm.LoginThrottle()
        limits = realm.ConnectionLimits()
        bind = cfg.server.bind
        ports = {}
        specs = [("imap", IMAPFactory, cfg.mailaccess.imap_port, False),
                 ("imaps", IMAPFactory, cfg.mailaccess.imaps_port, True),
                 ("pop3", POP3Factory, cfg.mailaccess.pop3_port, False),
                 ("pop3s", POP3Factory, cfg.mailaccess.pop3s_port, True)]
        for name, factory_cls, port, implicit in specs:
            factory = factory_cls(self.ctx, tls, implicit, throttle, limits)
            if implicit:
                lp = reactor.listenSSL(port, factory, tls, backlog=1024, interface=bind)
            else:
                lp = reactor.listenTCP(port, factory, backlog=1024, interface=bind)
            self.listeners.append(lp)
            self.factories.append(factory)
            ports[name] = lp.getHost().port
        self.worker = asyncio.get_running_loop().create_task(
            receive.run_inbound_worker(self.ctx, self.stopping))
        log.info("mailaccess listening", extra={"fields": ports})
        return ports

    async def stop(self) -> None:
        for lp in self.listeners:
            await _deferred(lp.stopListening())
        # Let commands in progress finish (up to 10 s), then say goodbye to every session.
        sessions = [s for f in self.factories for s in list(getattr(f, "sessions", ()))]
        for _ in range(200):
            if not any(_busy(s) for s in sessions):
                break
            await asyncio.sleep(0.05)
        for s in sessions:
            if not s._closed:
                s.close(b"Server shutting down")
        self.stopping.set()
        receive.wake()
        if self.worker is not None:
            try:
                await asyncio.wait_for(self.worker, 30)
            except asyncio.TimeoutError:
                self.worker.cancel()


def _busy(session) -> bool:
    """A command is running (an IDLE wait does not count)."""
    if session._closed or getattr(session, "_idle_done", None) is not None:
        return False
    return bool(getattr(session, "_busy", False) or getattr(session, "paused", False))


async def _deferred(d):
    if d is None:
        return None
    return await d.asFuture(asyncio.get_running_loop())


def create(ctx: Context) -> Service:
    return Service(ctx)
