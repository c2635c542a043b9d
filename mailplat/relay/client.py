"""SMTP client for outbound delivery (aiosmtplib): one connection to one remote MX, reused for
several transactions, with the domain's TLS policy applied.

Owns `connect(hosts, policy, ...)` (tries MX hosts in order and their addresses; STARTTLS per
mailauth.tlspolicy; never falls back to plaintext when TLS is required) and `Session.send()`
(MAIL/RCPT/DATA, in one write to a server that offers PIPELINING; RSET after a rejection so the
connection can carry the next message).  aiosmtplib opens the connection; the session then
reads replies itself, since aiosmtplib takes one reply per command written.
Failures come back as `DeliveryError` with the remote code, its enhanced status code and
whether the connection is still usable; relay.outcome decides what they mean.
After STARTTLS, aiosmtplib discards any plaintext the server sent ahead of the handshake
(RFC 3207 4.2 injection defence) and we say EHLO again.
"""
from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.email import quote_address

from ..mailauth.tlspolicy import TlsPolicy, client_context
from .mx import MxHost

MAX_REPLY = 64 * 1024  # bytes of one unfinished reply; more is a broken or hostile server
INLINE_BYTES = 256 * 1024  # larger messages are scanned or copied in a thread, not on the loop
MAX_UNREAD = 16        # whole replies nobody asked for yet; more is a broken or hostile server
NETWORK_ERRORS = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ssl.SSLError, EOFError)
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_PLAIN_ADDRESS = re.compile(r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                            r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)?\Z")


def enhanced_code(message: str) -> str:
    m = _ENHANCED.match(message or "")
    return ".".join(m.groups()) if m else ""


def _path(address: str) -> str:
    """`<address>` for MAIL FROM / RCPT TO.  A plain dot-atom address (nearly every one) is
    taken as it is; anything else goes through aiosmtplib's own parsing and checks, which
    would leave a plain one unchanged anyway."""
    return f"<{address}>" if _PLAIN_ADDRESS.match(address) else quote_address(address)


async def whole_message(fn, data: bytes):
    """fn(data) for work over a whole message: on the event loop when the message is at most
    INLINE_BYTES (cheaper than a thread hop), else in a thread so the loop is never held up."""
    return fn(data) if len(data) <= INLINE_BYTES else await asyncio.to_thread(fn, data)


def _data_payload(data: bytes) -> bytes:
    """DATA content from a message whose line endings are all CRLF: lines that start with "."
    get another (RFC 5321 4.5.2), then the ending line."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class DeliveryError(Exception):
    """An attempt that did not end in 2xx.  `code` is the remote reply code (or ours: 451 for
    connection trouble, 550/556 for DNS verdicts); `stage` says where it happened."""

    def __init__(self, message: str, code: int = 451, *, stage: str = "connect", mx_host: str = "",
                 tls: bool = False, verified: bool = False, tls_policy: bool = False):
        super().__init__(message)
        self.message = message
        self.code = code
        self.enhanced = enhanced_code(message)
        self.stage = stage
        self.mx_host = mx_host
        self.tls = tls
        self.verified = verified
        self.tls_policy = tls_policy  # failed because the TLS policy could not be met

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


@dataclass
class Accepted:
    code: int
    message: str
    mx_host: str
    tls: bool
    verified: bool
    session_seconds: float

    @property
    def enhanced(self) -> str:
        return enhanced_code(self.message)


class _Replies(asyncio.Protocol):
    """The reading side of a session once aiosmtplib has opened it: whole SMTP replies, queued
    in order, so that several commands may be written before their replies are read."""

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.buffer = bytearray()
        self.lines: list[bytes] = []
        self.replies: deque[tuple[int, str]] = deque()
        self.waiter: asyncio.Future | None = None
        self.wanted = 0
        self.ended: str = ""  # why no more replies will come

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while (end := self.buffer.find(b"\n", start)) != -1:
            line = bytes(self.buffer[start:end + 1])
            start = end + 1
            self.lines.append(line)
            if line[3:4] == b"-":
                continue
            code = line[:3]
            if not code.isdigit():
                self.end(f"malformed reply line {line[:80]!r}", broken=True)
                return
            self.replies.append((int(code), "\n".join(
                part[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape") for part in self.lines)))
            self.lines = []
        del self.buffer[:start]
        if len(self.buffer) + sum(map(len, self.lines)) > MAX_REPLY:
            self.end("reply too long", broken=True)
        elif len(self.replies) > MAX_UNREAD:
            self.end("more replies than commands", broken=True)
        else:
            self._wake()

    def eof_received(self) -> bool:
        self.end("connection closed by the remote")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.end(f"connection lost: {exc}" if exc else "connection closed")

    def end(self, why: str, broken: bool = False) -> None:
        """No more replies: close the connection and wake whoever waits.  A server that broke
        the protocol has its queued replies dropped: none of them can be trusted."""
        self.ended = self.ended or why
        if broken:
            self.replies.clear()
        self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done() and (
                len(self.replies) >= self.wanted or self.ended):
            self.waiter.set_result(None)

    async def read(self, n: int) -> list[tuple[int, str]]:
        """The next `n` replies; fewer only when the connection ended first."""
        while len(self.replies) < n and not self.ended:
            self.waiter = asyncio.get_running_loop().create_future()
            self.wanted = n
            await self.waiter
        return [self.replies.popleft() for _ in range(min(n, len(self.replies)))]


class _Refused(Exception):
    def __init__(self, stage: str, code: int, message: str):
        super().__init__(message)
        self.stage, self.code, self.message = stage, code, message


class _Lost(Exception):
    def __init__(self, stage: str, why: str):
        super().__init__(why)
        self.stage = stage


_STAGES = ("mail", "rcpt", "data")
_ACCEPTS = ((250,), (250, 251), (354,))


class Session:
    """One connection to one MX host, for any number of transactions.

    aiosmtplib opens it (greeting, EHLO, STARTTLS with its defences); then the session reads
    replies itself (_Replies) so that MAIL, RCPT and DATA go out in one write when the server
    offers PIPELINING (RFC 2920): two round trips per message instead of four."""

    def __init__(self, smtp: aiosmtplib.SMTP, host: str, tls: bool, verified: bool, policy: TlsPolicy):
        self.host = host
        self.tls = tls
        self.verified = verified
        self.policy = policy
        self.usable = True
        self.sent = 0
        self.timeout = smtp.timeout  # relay.command_timeout, per reply
        self.pipelining = smtp.supports_extension("pipelining")
        self.smtputf8 = smtp.supports_extension("smtputf8")
        transport = smtp.protocol.transport
        self.conn = _Replies(transport)
        transport.set_protocol(self.conn)  # aiosmtplib's protocol sees nothing more

    @property
    def open(self) -> bool:
        """Fit for another transaction: no failure made it unusable and the remote has not
        closed it (an idle connection the remote timed out)."""
        return self.usable and not self.conn.ended

    def _fail(self, stage: str, message: str, code: int = 451) -> DeliveryError:
        return DeliveryError(message, code, stage=stage, mx_host=self.host, tls=self.tls, verified=self.verified)

    async def _replies(self, n: int, stage: int) -> list[tuple[int, str]]:
        """`n` replies, the first to the command of _STAGES[stage]; _Lost if they do not all
        come within relay.command_timeout each."""
        try:
            async with asyncio.timeout(self.timeout * n):
                got = await self.conn.read(n)
        except TimeoutError:
            self.conn.end("timed out")
            raise _Lost(_STAGES[min(stage + len(self.conn.replies), 2)], "timed out waiting for a reply") from None
        if len(got) < n:
            raise _Lost(_STAGES[min(stage + len(got), 2)], self.conn.ended)
        return got

    def _no_success(self, code: int, stage: str) -> None:
        """A reply that is neither the one expected nor a refusal (4xx, 5xx) breaks the protocol."""
        if not 400 <= code < 600:
            self.conn.end(f"unexpected reply {code} to {stage.upper()}", broken=True)
            raise _Lost(stage, self.conn.ended)

    async def _start(self, commands: list[bytes]) -> None:
        """MAIL, RCPT, DATA: in one write when pipelining, else one by one until a refusal.
        Raises _Refused for the first refusal."""
        if self.pipelining:
            self.conn.transport.write(b"".join(commands))
            replies = await self._replies(3, 0)
        else:
            replies = []
            for i, command in enumerate(commands):
                self.conn.transport.write(command)
                replies += await self._replies(1, i)
                if replies[-1][0] not in _ACCEPTS[i]:
                    break
        for i, (code, message) in enumerate(replies):
            if code not in _ACCEPTS[i]:
                self._no_success(code, _STAGES[i])
                if len(replies) == 3 and replies[2][0] == 354:
                    # DATA was taken although an earlier command was refused: send an empty
                    # message's end so the server leaves the data state, and forget its reply.
                    self.conn.transport.write(b".\r\n")
                    await self._replies(1, 2)
                raise _Refused(_STAGES[i], code, message)

    async def send(self, sender: str, recipient: str, data: bytes) -> Accepted:
        """One transaction; `data` has CRLF line endings only (mailauth.dkim.normalize_crlf)."""
        started = time.monotonic()
        encoding, mail_option = "ascii", b""
        if not (sender.isascii() and recipient.isascii()):
            # Internationalised address (RFC 6531): only to a server that offers SMTPUTF8.
            if not self.smtputf8:
                raise self._fail("mail", f"5.6.7 {self.host} does not support SMTPUTF8, needed for this address", 553)
            encoding, mail_option = "utf-8", b" SMTPUTF8"
        mail, rcpt = _path(sender).encode(encoding), _path(recipient).encode(encoding)
        for stage, path in (("mail", mail), ("rcpt", rcpt)):
            if b"\r" in path or b"\n" in path:
                raise self._fail(stage, "5.1.3 Line break in an address", 553)
        try:
            await self._start([b"MAIL FROM:" + mail + mail_option + b"\r\n", b"RCPT TO:" + rcpt + b"\r\n",
                               b"DATA\r\n"])
            self.conn.transport.write(await whole_message(_data_payload, data))
            [(code, message)] = await self._replies(1, 2)
            if code != 250:
                self._no_success(code, "data")
                raise _Refused("data", code, message)
        except _Lost as exc:
            self.usable = False
            raise self._fail(exc.stage, f"Connection to {self.host} lost during {exc.stage.upper()}: {exc}") from None
        except _Refused as exc:
            if exc.code == 421:
                self.usable = False
            else:
                await self._reset()
            raise self._fail(exc.stage, exc.message, exc.code) from None
        self.sent += 1
        return Accepted(code, message, self.host, self.tls, self.verified, round(time.monotonic() - started, 3))

    async def _command(self, command: bytes) -> tuple[int, str] | None:
        if self.conn.ended:
            return None
        self.conn.transport.write(command)
        try:
            return (await self._replies(1, 0))[0]
        except _Lost:
            return None

    async def _reset(self) -> None:
        if await self._command(b"RSET\r\n") is None:
            self.usable = False

    async def close(self) -> None:
        self.usable = False
        try:
            async with asyncio.timeout(5):
                await self._command(b"QUIT\r\n")
        except TimeoutError:
            pass
        finally:
            self.conn.transport.close()


class _TlsUnavailable(Exception):
    pass


async def _open(address: str, host: str, port: int, policy: TlsPolicy, *, ca_file: str,
                helo: str, connect_timeout: float, command_timeout: float,
                try_starttls: bool = True) -> Session:
    smtp = aiosmtplib.SMTP(hostname=address, port=port, local_hostname=helo, timeout=command_timeout,
                           start_tls=False, use_tls=False)
    await smtp.connect(timeout=connect_timeout)
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()
    if not try_starttls:
        return Session(smtp, host, False, False, policy)
    if not smtp.supports_extension("starttls"):
        if policy.require_tls:
            smtp.close()
            raise _TlsUnavailable(f"TLS is required (require_tls) but {host} does not offer STARTTLS")
        return Session(smtp, host, False, False, policy)
    try:
        await smtp.starttls(server_hostname=host, tls_context=client_context(policy, ca_file),
                            timeout=command_timeout)
        await smtp.ehlo()
    except NETWORK_ERRORS as exc:
        smtp.close()
        detail = _tls_detail(exc)
        raise _TlsUnavailable(f"STARTTLS with {host} failed: {detail}") from exc
    return Session(smtp, host, True, policy.verify, policy)


def _tls_detail(exc: BaseException) -> str:
    seen = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verification failed ({seen.verify_message})"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen})"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or exc.__class__.__name__


async def connect(hosts: list[MxHost], policy: TlsPolicy, *, port: int, ca_file: str, helo: str,
                  connect_timeout: float, command_timeout: float) -> Session:
    """A session with the first MX host (by preference) that answers and meets the policy."""
    problems: list[str] = []
    tls_problem = False
    greeting_code = 0
    kw = dict(ca_file=ca_file, helo=helo, connect_timeout=connect_timeout, command_timeout=command_timeout)
    for host in hosts:
        for address in host.addresses:
            try:
                return await _open(address, host.name, port, policy, **kw)
            except _TlsUnavailable as exc:
                if policy.require_tls:
                    problems.append(str(exc))
                    tls_problem = True
                    break  # this host cannot meet the policy; try the next MX
                # Opportunistic TLS failed: deliver over plaintext on a fresh connection.
                try:
                    return await _open(address, host.name, port, policy, try_starttls=False, **kw)
                except NETWORK_ERRORS as again:
                    problems.append(f"{host.name} [{address}]: {again}")
            except aiosmtplib.SMTPResponseException as exc:
                greeting_code = exc.code
                problems.append(f"{host.name} [{address}] said {exc.code} {exc.message}")
            except NETWORK_ERRORS as exc:
                problems.append(f"{host.name} [{address}]: {exc or exc.__class__.__name__}")
    message = "; ".join(problems) or "no MX host to try"
    if tls_problem:
        raise DeliveryError(message, 451, stage="tls", mx_host=hosts[0].name if hosts else "",
                            tls_policy=True)
    # A 5xx greeting is the remote refusing us; keep it temporary unless every host said 5xx.
    code = greeting_code if greeting_code >= 500 and len(problems) == sum(len(h.addresses) for h in hosts) else 451
    raise DeliveryError(message, code, stage="connect", mx_host=hosts[0].name if hosts else "")
