"""The smtpd service: the MX (port 25), submission (587, STARTTLS) and submissions (465,
implicit TLS) listeners on one asyncio loop.

Owns binding the listeners (config.server.bind and the [smtp] ports; 0 picks a free port and
start() reports the real one), the TLS context (config tls cert/key via mailplat.tls), and an
orderly stop: stop accepting, let sessions in DATA finish (bounded wait), close the rest with
421.  Sessions (smtpd.protocol) hand mail to core through smtpd.mx and smtpd.submission.
"""
from __future__ import annotations

import asyncio
import time

from .. import logs, tls
from ..core.context import Context
from .mx import MxSession
from .protocol import Shared
from .submission import SubmissionSession

log = logs.get("mailplat.smtpd")

STOP_GRACE_SECONDS = 30.0


class Service:
    name = "smtpd"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.servers: list[asyncio.base_events.Server] = []
        self.shared: Shared | None = None

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
        listeners = [
            ("smtp", cfg.smtp.mx_port, lambda: MxSession(shared, tls_context, False), None),
            ("submission", cfg.smtp.submission_port,
             lambda: SubmissionSession(shared, tls_context, False), None),
        ]
        if tls_context is not None:
            listeners.append(("submissions", cfg.smtp.submissions_port,
                              lambda: SubmissionSession(shared, tls_context, True, "submissions"), tls_context))
        ports = {}
        for name, port, factory, ssl_ctx in listeners:
            server = await loop.create_server(factory, host=cfg.server.bind, port=port,
                                              backlog=1024, reuse_address=True, ssl=ssl_ctx,
                                              ssl_handshake_timeout=30.0 if ssl_ctx else None)
            self.servers.append(server)
            ports[name] = server.sockets[0].getsockname()[1]
        log.info("smtpd listening", extra={"fields": {"ports": ports}})
        return ports

    async def stop(self) -> None:
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


def create(ctx: Context) -> Service:
    return Service(ctx)
