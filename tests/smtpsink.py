"""A target SMTP server on loopback for tests: the stand-in for a remote MX.

aiosmtpd's Controller in a thread.  It records every transaction (`sink.messages`: envelope
sender, recipients, the raw bytes received, whether the session was under TLS, which
connection carried it) and answers as scripted:
    sink = SmtpSink(); sink.start()                  # plaintext, no STARTTLS, 127.0.0.1:<free>
    sink = SmtpSink(host="127.0.0.5", port=p)        # any loopback address: one port, many MXes
    sink = SmtpSink(tls_context=ctx); sink.start()   # offers STARTTLS with that certificate
    sink.data_replies = ["451 4.3.0 Try later"]      # next DATA replies, in order; then 250
    sink.rcpt_replies["bad@x.test"] = "550 5.1.1 No such user"
    sink.stall_data()  /  sink.unstall()              # hold DATA replies until released
    SmtpSink(tls_context=ctx, starttls_injection=b"250 fake\r\n")  # STARTTLS injection attack
    sink.wait_count(3)                                # wait until 3 messages were accepted
    SmtpSink(idle_timeout=0.5)                        # close a connection idle that long (421)
    SmtpSink(pipelining=False)                        # EHLO without PIPELINING (offered by default)
    sink.drop_on_mail_after = 1                       # hang up at MAIL after 1 message per connection
    sink.connections / sink.closed                    # sessions opened / ended so far
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    connection: int
    at: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler:
    def __init__(self, sink: "SmtpSink"):
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.sink.pipelining:  # aiosmtpd reads commands in order, however they arrive
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.sink.drop_on_mail_after and self.sink.per_session.get(id(session), 0) >= self.sink.drop_on_mail_after:
            server.transport.close()  # hang up without a word, as a remote timing out at that moment
            return "421 4.4.2 Closing"  # not seen: the connection is already closed
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.sink.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        sink = self.sink
        with sink.lock:
            sink.data_commands += 1
        while sink._stall.is_set():
            sink.stalled_sessions.add(id(session))
            await asyncio.sleep(0.02)
        with sink.lock:
            if sink.data_replies:
                reply = sink.data_replies.pop(0)
                if reply:
                    sink.rejected += 1
                    return reply
            sink.per_session[id(session)] = sink.per_session.get(id(session), 0) + 1
            sink.messages.append(Received(
                mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""), tls=session.ssl is not None,
                connection=id(session), at=time.time()))
        return "250 2.0.0 OK queued"

    async def handle_QUIT(self, server, session, envelope):
        sink = self.sink
        while sink._stall_quit.is_set():
            sink.quitting.add(id(session))
            await asyncio.sleep(0.02)
        return "221 Bye"


class _CountingSMTP(SMTP):
    """Counts sessions opened and ended on the sink (event_handler is its _Handler)."""

    def connection_made(self, transport):
        super().connection_made(transport)
        with self.event_handler.sink.lock:
            self.event_handler.sink.connections += 1

    def connection_lost(self, error):
        super().connection_lost(error)
        with self.event_handler.sink.lock:
            self.event_handler.sink.closed += 1


class _InjectingSMTP(_CountingSMTP):
    """Sends `injection` as plaintext right behind '220 Ready to start TLS' (the STARTTLS
    response-injection attack a client must defeat by discarding its buffer)."""
    injection = b""

    async def push(self, status):
        await super().push(status)
        if self.injection and isinstance(status, str) and status.startswith("220 Ready to start TLS"):
            self._writer.write(self.injection)
            await self._writer.drain()


class _Controller(Controller):
    def __init__(self, *args, injection: bytes = b"", **kwargs):
        self.injection = injection
        super().__init__(*args, **kwargs)

    def factory(self):
        if not self.injection:
            return _CountingSMTP(self.handler, **self.SMTP_kwargs)
        server = _InjectingSMTP(self.handler, **self.SMTP_kwargs)
        server.injection = self.injection
        return server


class SmtpSink:
    def __init__(self, tls_context=None, hostname: str = "mx.sink.test", port: int | None = None,
                 host: str = "127.0.0.1", starttls_injection: bytes = b"", idle_timeout: float = 300,
                 pipelining: bool = True):
        self.host = host
        self.pipelining = pipelining
        self.drop_on_mail_after = 0  # > 0: hang up at MAIL once a connection carried that many
        self.per_session: dict[int, int] = {}  # messages accepted, by session
        self.idle_timeout = idle_timeout
        self.connections = 0  # sessions that reached the greeting
        self.closed = 0       # sessions that ended, whoever ended them
        self.starttls_injection = starttls_injection
        self.port = port or free_port()
        self.tls_context = tls_context
        self.hostname = hostname
        self.messages: list[Received] = []
        self.data_replies: list[str | None] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_commands = 0
        self.rejected = 0
        self.stalled_sessions: set[int] = set()
        self.lock = threading.Lock()
        self._stall = threading.Event()
        self._stall_quit = threading.Event()
        self.quitting: set[int] = set()  # sessions held in QUIT by stall_quit
        self.controller: Controller | None = None

    def start(self) -> "SmtpSink":
        kwargs = {}
        if self.tls_context is not None:
            kwargs = {"tls_context": self.tls_context, "require_starttls": False}
        self.controller = _Controller(_Handler(self), hostname=self.host, port=self.port,
                                      injection=self.starttls_injection,
                                     server_hostname=self.hostname, ready_timeout=10,
                                     data_size_limit=60 * 1024 * 1024, timeout=self.idle_timeout,
                                     **kwargs)
        self.controller.start()
        # The controller's own readiness probe connected once: not a session to count.
        from tests.support import wait_for
        wait_for(lambda: self.closed >= self.connections, timeout=10, what="the readiness probe to end")
        with self.lock:
            self.connections = self.closed = 0
        return self

    def stop(self) -> None:
        self._stall.clear()
        self._stall_quit.clear()
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- scripting ---------------------------------------------------------------------------
    def stall_data(self) -> None:
        self._stall.set()

    def stall_quit(self) -> None:
        """Hold every QUIT unanswered (a client closing its session waits) until unstall()."""
        self._stall_quit.set()

    def unstall(self) -> None:
        self._stall.clear()
        self._stall_quit.clear()

    # -- inspection --------------------------------------------------------------------------
    def to(self, recipient: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if recipient.lower() in (r.lower() for r in m.rcpt_tos)]

    def count(self) -> int:
        with self.lock:
            return len(self.messages)

    def wait_count(self, n: int, timeout: float = 20.0) -> list[Received]:
        from tests.support import wait_for
        wait_for(lambda: self.count() >= n, timeout=timeout, what=f"{n} messages at the sink")
        with self.lock:
            return list(self.messages)
