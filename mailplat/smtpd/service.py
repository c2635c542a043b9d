"""The smtpd service: the MX (port 25), submission (587, STARTTLS) and submissions (465,
implicit TLS) listeners on one asyncio loop.

Owns binding the listeners (config.server.bind and the [smtp] ports; 0 picks a free port and
start() reports the real one), the TLS context (config tls cert/key via mailplat.tls), and an
orderly stop: stop accepting, let sessions in DATA finish (bounded wait), close the rest with
421.  Sessions (smtpd.protocol) hand mail to core through smtpd.mx and smtpd.submission.

With `smtp.processes` = N > 1 the submission listeners are bound with SO_REUSEPORT and N - 1
further processes (mailplat.procs) bind the same ports and serve them too, each with its own
interpreter and store writer: the kernel spreads new connections between the processes, and
a submission is CPU work under one interpreter lock per process.  The MX listener stays in
this process (accepting inbound mail is one row per message: one process keeps up).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

from .. import logs, tls
from ..core.context import Context
from ..procs import Children
from .mx import MxSession
from .protocol import Shared
from .submission import SubmissionSession

log = logs.get("mailplat.smtpd")

STOP_GRACE_SECONDS = 30.0


class Service:
    name = "smtpd"

    def __init__(self, ctx: Context, submission_only: bool = False):
        self.ctx = ctx
        self.submission_only = submission_only  # a further process of smtp.processes
        self.servers: list[asyncio.base_events.Server] = []
        self.shared: Shared | None = None
        self.children: Children | None = None

    async def start(self) -> dict[str, int]:
        cfg = self.ctx.config
        loop = asyncio.get_running_loop()
        shared = self.shared = Shared(self.ctx)
        tls_context = None
        if cfg.tls_cert.is_file() and cfg.tls_key.is_file():
            tls_context = tls.server_context(cfg.tls_cert, cfg.tls_key)
        else:
            log.warning("no TLS certificate: STARTTLS and port 465 are unavailable",
                        extra={"fields": {"cert": str(cfg.tls_cert)}})
        listeners = [] if self.submission_only else [
            ("smtp", cfg.smtp.mx_port, lambda: MxSession(shared, tls_context, False), None)]
        listeners.append(("submission", cfg.smtp.submission_port,
                          lambda: SubmissionSession(shared, tls_context, False), None))
        if tls_context is not None:
            listeners.append(("submissions", cfg.smtp.submissions_port,
                              lambda: SubmissionSession(shared, tls_context, True, "submissions"), tls_context))
        shared_ports = cfg.smtp.processes > 1
        ports = {}
        for name, port, factory, ssl_ctx in listeners:
            server = await loop.create_server(factory, host=cfg.server.bind, port=port,
                                              backlog=1024, reuse_address=True, ssl=ssl_ctx,
                                              reuse_port=shared_ports and name != "smtp",
                                              ssl_handshake_timeout=30.0 if ssl_ctx else None)
            self.servers.append(server)
            ports[name] = server.sockets[0].getsockname()[1]
        log.info("smtpd listening", extra={"fields": {"ports": ports}})
        if shared_ports and not self.submission_only:
            # The further processes bind the ports this one got (config 0 means "any free one").
            smtp = dataclasses.replace(cfg.smtp, submission_port=ports["submission"],
                                       submissions_port=ports.get("submissions", cfg.smtp.submissions_port))
            self.children = Children("smtpd", cfg.smtp.processes - 1, dataclasses.replace(cfg, smtp=smtp),
                                     child_body, STOP_GRACE_SECONDS + 10)
            self.children.start()
        return ports

    async def stop(self) -> None:
        if self.children is not None:
            await asyncio.gather(self.children.stop(), self._stop())
        else:
            await self._stop()

    async def _stop(self) -> None:
        shared = self.shared
        for server in self.servers:
            server.close()
        if shared is None:
            return
        shared.stopping = True
        # Sessions between commands are told 421 now; sessions in DATA finish their message
        # (and its commit) first, then close themselves.
        for session in list(shared.sessions):
            if not session.in_data:
                session.close_with("421 4.3.2 Service shutting down, try again later")
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while shared.sessions and time.monotonic() < deadline:
            shared.idle.clear()
            try:
                await asyncio.wait_for(shared.idle.wait(), timeout=deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        for session in list(shared.sessions):
            log.warning("closing a session still open at shutdown",
                        extra={"fields": {"peer": session.ip, "session": session.sid}})
            if session.transport is not None:
                session.transport.abort()
        for server in self.servers:
            await server.wait_closed()


async def child_body(ctx: Context, stop: asyncio.Event) -> None:
    """A further smtpd process: the submission listeners only, until told to stop."""
    service = Service(ctx, submission_only=True)
    await service.start()
    await stop.wait()
    await service.stop()


def create(ctx: Context) -> Service:
    return Service(ctx)
