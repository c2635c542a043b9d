"""The hardened ESMTP session shared by the MX and submission listeners.

Owns the wire protocol on top of aiosmtpd's SMTP class: the command loop (line limits, a
deadline per command, an error budget, CRLF-only command lines), EHLO and its extensions
(PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, STARTTLS, AUTH, LIMITS), strict
MAIL/RCPT parsing (smtpd.syntax), a chunked DATA reader (only <CRLF>.<CRLF> ends DATA; bare CR
or LF anywhere in the data rejects the message; size and line caps with bounded memory),
STARTTLS that drops pipelined plaintext, and AUTH PLAIN/LOGIN (mixed in from smtpd.authn,
throttled by smtpd.limits).  It decides nothing about mail: subclasses (smtpd.mx,
smtpd.submission) answer `on_mail`, `on_rcpt` and `on_data` by calling core.  `reply_for()` is
the one translator from mailplat.errors to SMTP replies.
"""
from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import ipaddress
import itertools
import os
import ssl

from aiosmtpd.smtp import SMTP, Envelope

from .. import errors, logs
from . import syntax
from .flow import Closed as _Closed
from .authn import AuthCommands
from .limits import AuthThrottle, ConnectionLimiter

log = logs.get("mailplat.smtpd")

COMMAND_LIMIT = 512  # RFC 5321 4.5.3.1.4, CRLF included
COMMAND_LIMITS = {"MAIL": 1024, "AUTH": 12288}  # SIZE/BODY/SMTPUTF8/AUTH= params; RFC 4954
BODY_LINE_LIMIT = 1_048_576  # real mail exceeds 1,000 octets; this still bounds memory
READ_CHUNK = 65536
STREAM_LIMIT = 65536
MAX_CONNECTIONS = 2000
TRUSTED_IPS_KEPT = 4096  # client addresses whose smtp.trusted_networks answer is kept
RCPT_OVERSHOOT = 1000  # 452s past the recipient limit that do not count as errors
TEMP_FAIL = "451 4.3.0 Temporary server error, try again later"
_ids = itertools.count(1)
_prefix = os.urandom(3).hex()


def reply_for(exc: BaseException) -> str:
    """The SMTP reply for an error raised by core; anything unexpected is our bug: 451."""
    if isinstance(exc, errors.MailplatError):
        return exc.smtp_reply
    log.error("internal error in SMTP session", exc_info=exc)
    return TEMP_FAIL


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%")[0]).is_loopback
    except ValueError:
        return False


class Shared:
    """Per-process state every session sees: ctx, limiters, open sessions, stopping flag."""

    def __init__(self, ctx):
        self.ctx = ctx
        cfg = ctx.config
        self.hostname = cfg.server.hostname
        self.dev_mode = cfg.server.dev_mode
        self.max_size = cfg.smtp.max_message_bytes
        self.max_rcpt = cfg.smtp.max_recipients
        self.max_errors = cfg.smtp.max_errors
        self.timeout = cfg.smtp.command_timeout
        self.connections = ConnectionLimiter(cfg.smtp.max_connections_per_ip, MAX_CONNECTIONS)
        self.trusted_networks = [ipaddress.ip_network(n, strict=False) for n in cfg.smtp.trusted_networks]
        self._trusted_ips: dict[str, bool] = {}
        self.auth = AuthThrottle()
        # Trusted-network sender domains found to be ours and enabled: domain -> monotonic
        # expiry (smtpd.submission; positive answers only, see SENDING_DOMAIN_TTL there).
        self.sending_domains: dict[str, float] = {}
        self.sessions: set[Session] = set()
        self.stopping = False
        self.idle = asyncio.Event()

    def trusted(self, ip: str) -> bool:
        """Whether a client address is in config smtp.trusted_networks (answers kept per
        address: parsing it on every connection was a visible part of a submission)."""
        if not self.trusted_networks:
            return False
        known = self._trusted_ips.get(ip)
        if known is None:
            if len(self._trusted_ips) >= TRUSTED_IPS_KEPT:
                self._trusted_ips.clear()
            known = self._trusted_ips[ip] = self._in_trusted_networks(ip)
        return known

    def _in_trusted_networks(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        addr = getattr(addr, "ipv4_mapped", None) or addr
        return any(addr in net for net in self.trusted_networks)


class Session(AuthCommands, SMTP):
    """One SMTP connection.  Subclasses set `kind`, `offers_auth` and the on_* policy hooks."""

    kind = "smtp"
    offers_auth = False
    line_length_limit = STREAM_LIMIT  # the StreamReader limit; command limits are ours

    def __init__(self, shared: Shared, tls_context: ssl.SSLContext | None, implicit_tls: bool,
                 name: str | None = None):
        # SMTP.__init__ introspects the class and handler on every connection (inspect.getmembers)
        # to build tables this class does not use; set up only what the inherited connection
        # plumbing (connection_made/lost, timeouts, STARTTLS transport swap) reads.
        loop = asyncio.get_event_loop()
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.__ident__ = "ESMTP mailplat"
        self.event_handler = None
        self.hostname = shared.hostname
        self.tls_context = None if implicit_tls else tls_context
        self.require_starttls = False
        self.data_size_limit = shared.max_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self._timeout_duration = shared.timeout
        self._timeout_handle = None
        self._deadline: float | None = None  # loop time the current command is due by
        self._timer_armed = False
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._handle_hooks = {}
        self._auth_require_tls = True
        self.shared = shared
        if name:
            self.kind = name
        self.implicit_tls = implicit_tls
        self.secure = False
        self.ip = ""
        self.sid = ""
        self.refused = False
        self.in_data = False
        self.errors = 0
        self.overshoot = 0
        self.helo: str | None = None
        self.auth_login: str | None = None
        self.auth_domain: str | None = None
        self.trusted = False  # a submission client in smtp.trusted_networks (MAIL without AUTH)
        self.mail: syntax.Path | None = None
        self.rcpts: list[syntax.Path] = []

    # -- policy hooks (subclasses) --------------------------------------------------------
    async def on_mail(self, path: syntax.Path) -> str | None:
        return None

    async def on_rcpt(self, path: syntax.Path) -> str | None:
        return None

    async def on_data(self, raw: bytes) -> str:
        raise NotImplementedError

    # -- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        if not starttls:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.ip = str(peer[0])
            if self.shared.stopping or not self.shared.connections.acquire(self.ip):
                self.refused = True
                log.warning("connection refused: too many connections",
                            extra={"fields": {"peer": self.ip, "listener": self.kind}})
                transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
                transport.close()
                return
            self.sid = f"{_prefix}{next(_ids):x}"
            self.secure = transport.get_extra_info("ssl_object") is not None
            self.trusted = self.offers_auth and self.shared.trusted(self.ip)
            self.shared.sessions.add(self)
            self.shared.idle.clear()
        super().connection_made(transport)
        if starttls:
            self.secure = True
            self._reset_state(helo=True)

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return
        self.shared.connections.release(self.ip)
        self.shared.sessions.discard(self)
        if not self.shared.sessions:
            self.shared.idle.set()
        super().connection_lost(error)
        # asyncio keeps a peer's reset or broken pipe in the stream's "closed" future, which
        # nothing awaits: mark it seen, or a session still referenced when the process exits
        # logs it as "Future exception was never retrieved".
        closed = getattr(self, "_closed", None)
        if closed is not None and closed.done() and not closed.cancelled():
            closed.exception()

    def eof_received(self):
        # Let the command loop see EOF (it finishes the current reply) instead of cancelling it.
        reader = self._stream_reader
        if reader is not None:
            reader.feed_eof()
        return False if self.secure else True

    # The command deadline: one timer per session, moved lazily.  A call_later/cancel pair per
    # command (and per DATA chunk) was about 5% of a submission's event-loop CPU; now a command
    # only stores its deadline, and the timer, when it fires early, re-arms for the new one.
    def _reset_timeout(self, duration: float | None = None) -> None:
        """The client has `duration` (default smtp.command_timeout) seconds from now."""
        loop = self.loop
        self._deadline = deadline = loop.time() + (duration or self._timeout_duration)
        if not self._timer_armed:
            self._timer_armed = True
            self._timeout_handle = loop.call_at(deadline, self._timeout_due)

    def _pause_timeout(self) -> None:
        """No deadline until the next _reset_timeout (the time is ours, not the client's)."""
        self._deadline = None

    def _timeout_due(self) -> None:
        self._timer_armed = False
        deadline = self._deadline
        if deadline is None:
            return  # paused: the next _reset_timeout arms the timer again
        if deadline - self.loop.time() > 0.001:  # moved on since the timer was set
            self._timer_armed = True
            self._timeout_handle = self.loop.call_at(deadline, self._timeout_due)
            return
        self._timeout_cb()

    def _timeout_cb(self):
        log.info("session timed out", extra={"fields": {"peer": self.ip, "session": self.sid}})
        if self.transport is not None:
            self.transport.write(b"421 4.4.2 Timeout exceeded, closing connection\r\n")
            self.transport.close()

    def close_with(self, reply: str) -> None:
        if self.transport is not None:
            self.transport.write(reply.encode() + b"\r\n")
            self.transport.close()

    def _reset_state(self, helo: bool = False) -> None:
        self.mail = None
        self.rcpts = []
        self.envelope = Envelope()
        if helo:
            self.helo = None
            self.auth_login = None
            self.auth_domain = None

    async def push(self, status) -> None:
        data = status.encode("utf-8") if isinstance(status, str) else status
        if data[:1] in (b"4", b"5") and not data.startswith(b"421"):
            self.errors += 1
        self._writer.write(data + b"\r\n")
        await self._writer.drain()

    # -- the command loop -----------------------------------------------------------------
    async def _read_line(self, limit: int) -> bytes | None:
        """One CRLF line; None when it is over `limit` (the rest of it is read and dropped)."""
        reader = self._reader
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            while True:
                try:
                    await reader.readuntil(b"\n")
                    return None
                except asyncio.LimitOverrunError as more:
                    await reader.readexactly(more.consumed)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise _Closed() from None
        if len(line) > limit:
            return None
        return line

    async def _handle_client(self) -> None:
        logs.bind(peer=self.ip, session=self.sid, listener=self.kind)
        log.info("session start", extra={"fields": {"tls": self.secure}})
        try:
            await self.push(f"220 {self.hostname} ESMTP mailplat")
            while self.transport is not None:
                if self.shared.stopping and not self.in_data:
                    self.close_with("421 4.3.2 Service shutting down, try again later")
                    break
                self._reset_timeout()  # a deadline for the whole next command
                line = await self._read_line(max(COMMAND_LIMITS.values()))
                self._pause_timeout()  # the deadline is the client's, not ours
                verb = b""
                if line is not None:
                    verb = line.split(b" ", 1)[0].rstrip(b"\r\n").upper()
                    limit = COMMAND_LIMITS.get(verb.decode("ascii", "replace"), COMMAND_LIMIT)
                    if len(line) > limit:
                        line = None
                if line is None:
                    await self.push("500 5.5.2 Line too long")
                elif not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-2]:
                    await self.push("500 5.5.2 Command lines must end with CRLF")
                else:
                    await self._command(line[:-2])
                if self.errors >= self.shared.max_errors and self.transport is not None:
                    log.warning("too many errors, closing")
                    self.close_with("421 4.7.0 Too many errors, closing connection")
                    break
        except (_Closed, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug in a session must not kill the listener
            log.exception("session failed")
            self.close_with("421 4.3.0 Internal error, closing connection")
        finally:
            if self.transport is not None:
                self.transport.close()
            log.info("session end")

    async def _command(self, line: bytes) -> None:
        verb_b, _, arg_b = line.partition(b" ")
        try:
            verb = verb_b.decode("ascii").upper()
            arg = arg_b.decode("utf-8").strip(" ")
        except UnicodeDecodeError:
            await self.push("500 5.5.2 Invalid characters in command")
            return
        method = _COMMANDS.get(verb)
        if method is None:
            await self.push("500 5.5.2 Command not recognized")
            return
        try:
            await method(self, arg)
        except (_Closed, ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - translate, never a 5xx for our own bug
            await self.push(reply_for(exc))

    # -- commands ---------------------------------------------------------------------------
    def auth_available(self) -> bool:
        return self.offers_auth and (self.secure or (self.shared.dev_mode and is_loopback(self.ip)))

    async def cmd_EHLO(self, arg: str) -> None:
        if not arg or " " in arg:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._reset_state()
        self.helo = arg
        self.session.extended_smtp = True
        lines = [self.hostname, "PIPELINING", f"SIZE {self.shared.max_size}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self.secure:
            lines.append("STARTTLS")
        if self.auth_available():
            lines.append("AUTH PLAIN LOGIN")
        lines.append(f"LIMITS RCPTMAX={self.shared.max_rcpt}")
        out = "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}"
        await self.push(out)

    async def cmd_HELO(self, arg: str) -> None:
        if not arg or " " in arg:
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        self._reset_state()
        self.helo = arg
        self.session.extended_smtp = False
        await self.push(f"250 {self.hostname}")

    async def cmd_NOOP(self, arg: str) -> None:
        await self.push("250 2.0.0 OK")

    async def cmd_RSET(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._reset_state()
        await self.push("250 2.0.0 OK")

    async def cmd_QUIT(self, arg: str) -> None:
        await self.push("221 2.0.0 Bye")
        if self.transport is not None:
            self.transport.close()
        raise _Closed()

    async def cmd_VRFY(self, arg: str) -> None:
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def cmd_EXPN(self, arg: str) -> None:
        await self.push("502 5.5.1 EXPN not implemented")

    async def cmd_HELP(self, arg: str) -> None:
        await self.push("214 2.0.0 See RFC 5321")

    async def cmd_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.secure:
            await self.push("503 5.5.1 TLS already active")
            return
        if self.tls_context is None:
            await self.push("454 4.7.0 TLS not available")
            return
        # Plaintext pipelined after STARTTLS must never be read as if it came over TLS
        # (CVE-2011-0411 class): drop it.
        buffered = self._reader._buffer  # type: ignore[attr-defined]
        if buffered:
            log.warning("dropped plaintext pipelined after STARTTLS",
                        extra={"fields": {"bytes": len(buffered)}})
            buffered.clear()
        await self.push("220 2.0.0 Ready to start TLS")
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter,
                                                  server_side=True,
                                                  ssl_handshake_timeout=30.0)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed handshake ends the session
            log.info("TLS handshake failed: %s", exc.__class__.__name__)
            if self._original_transport is not None:
                self._original_transport.close()
            raise _Closed() from None

    async def cmd_MAIL(self, arg: str) -> None:
        if not self.helo:
            await self.push("503 5.5.1 Send EHLO or HELO first")
            return
        if self.mail is not None:
            await self.push("503 5.5.1 Nested MAIL command")
            return
        if self.offers_auth and self.auth_login is None and not self.trusted:
            await self.push("530 5.7.0 Authentication required")
            return
        try:
            path = syntax.parse(arg, "FROM", null_ok=True, smtputf8_offered=self.session.extended_smtp,
                                bad="501 5.1.7 Bad sender address syntax")
        except syntax.PathError as exc:
            await self.push(exc.reply)
            return
        if path.params and not self.session.extended_smtp:
            await self.push("501 5.5.4 ESMTP parameters need EHLO")
            return
        for name, value in path.params.items():
            if name == "SIZE":
                if not isinstance(value, str) or not value.isdigit() or len(value) > 20:
                    await self.push("501 5.5.4 Bad SIZE parameter")
                    return
                if int(value) > self.shared.max_size:
                    await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
                    return
            elif name == "BODY":
                if not isinstance(value, str) or value.upper() not in ("7BIT", "8BITMIME"):
                    await self.push("501 5.5.4 BODY must be 7BIT or 8BITMIME")
                    return
            elif name == "SMTPUTF8":
                if value is not True:
                    await self.push("501 5.5.4 SMTPUTF8 takes no value")
                    return
            elif name == "AUTH":
                continue  # RFC 4954: informational, ignored
            else:
                await self.push("555 5.5.4 MAIL FROM parameter not recognized")
                return
        if path.utf8 and "SMTPUTF8" not in path.params:
            await self.push("553 5.6.7 Non-ASCII address needs SMTPUTF8")
            return
        refusal = await self.on_mail(path)
        if refusal:
            await self.push(refusal)
            return
        self.mail = path
        self.envelope.mail_from = path.address
        await self.push("250 2.1.0 Sender OK")

    async def cmd_RCPT(self, arg: str) -> None:
        if self.mail is None:
            await self.push("503 5.5.1 Need MAIL command first")
            return
        if len(self.rcpts) >= self.shared.max_rcpt:
            await self.push("452 4.5.3 Too many recipients")
            # Like Postfix's recipient overshoot: a big list is not an error to hang up on.
            self.overshoot += 1
            if self.overshoot <= RCPT_OVERSHOOT:
                self.errors -= 1
            return
        postmaster = arg[3:].strip(" ").lower() if arg[:3].upper() == "TO:" else ""
        if postmaster == "<postmaster>" or postmaster.startswith("<postmaster> "):
            arg = f"TO:<postmaster@{self.hostname}>" + arg[3:].strip(" ")[12:]
        try:
            path = syntax.parse(arg, "TO", null_ok=False, smtputf8_offered=self.session.extended_smtp,
                                bad="501 5.1.3 Bad recipient address syntax")
        except syntax.PathError as exc:
            await self.push(exc.reply)
            return
        if path.params:
            await self.push("555 5.5.4 RCPT TO parameters not recognized")
            return
        if path.utf8 and "SMTPUTF8" not in self.mail.params:
            await self.push("553 5.6.7 Non-ASCII address needs SMTPUTF8")
            return
        refusal = await self.on_rcpt(path)
        if refusal:
            log.info("recipient refused", extra={"fields": {"rcpt": path.address[:320],
                                                            "reply": refusal[:3]}})
            await self.push(refusal)
            return
        self.rcpts.append(path)
        self.envelope.rcpt_tos.append(path.address)
        await self.push("250 2.1.5 Recipient OK")

    async def cmd_DATA(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.mail is None:
            await self.push("503 5.5.1 Need MAIL command first")
            return
        if not self.rcpts:
            await self.push("554 5.5.1 No valid recipients")
            return
        self.in_data = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            raw, problem = await self._read_data()
            self._pause_timeout()  # committing is our time, not the client's
            if problem:
                reply = problem
            else:
                try:
                    reply = await self.on_data(raw)
                except (_Closed, ConnectionError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - one translator
                    reply = reply_for(exc)
            self._reset_state()
            await self.push(reply)
        finally:
            self.in_data = False

    async def _read_data(self) -> tuple[bytes, str | None]:
        """Read the message up to <CRLF>.<CRLF> in chunks (no per-line work); unstuff dots.

        Returns (data, None) or (b"", reply) when the message is refused.  Over-size data and
        over-long lines are read to the end and dropped, so memory stays bounded.
        """
        reader = self._reader
        max_size = self.shared.max_size
        buf = bytearray(b"\r\n")  # the CRLF that ended DATA: a lone "." first line ends it
        scan = 0
        dropped = 0  # bytes dropped after a cap was hit
        line_len = 0
        problem = None
        while True:
            if reader.at_eof():
                raise _Closed()
            self._reset_timeout()  # progress keeps a big upload alive
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                raise _Closed()
            start = len(buf)
            buf += chunk
            end = buf.find(b"\r\n.\r\n", scan)
            if end >= 0:
                rest = bytes(buf[end + 5:])
                del buf[end + 2:]
                if rest:
                    reader._buffer[0:0] = rest  # type: ignore[attr-defined] - pipelined commands
                break
            nl = buf.rfind(b"\n", start)
            line_len = line_len + len(chunk) if nl < 0 else len(buf) - nl - 1
            if problem is None and line_len > BODY_LINE_LIMIT:
                problem = "500 5.5.2 Message line too long"
            if problem is None and len(buf) - 2 > max_size:
                problem = "552 5.3.4 Message size exceeds fixed maximum message size"
            if problem is not None:  # keep only what the terminator search needs
                dropped += len(buf) - 4
                buf = bytearray(buf[-4:])
            scan = max(0, len(buf) - 4)
        if problem is None and len(buf) - 2 > max_size:
            problem = "552 5.3.4 Message size exceeds fixed maximum message size"
        if problem is None:
            crlf = buf.count(b"\r\n")
            if buf.count(b"\r") != crlf or buf.count(b"\n") != crlf:
                problem = "554 5.6.0 Bare CR or LF in message data, use CRLF line endings"
        if problem is not None:
            log.info("message refused", extra={"fields": {"reply": problem[:9],
                                                          "bytes": len(buf) + dropped}})
            return b"", problem
        return bytes(buf).replace(b"\r\n.", b"\r\n")[2:], None


_COMMANDS = {name[4:]: getattr(Session, name) for name in dir(Session) if name.startswith("cmd_")}
