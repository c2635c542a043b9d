"""SMTP client for outbound delivery (aiosmtplib): one connection to one remote MX, reused for
several transactions, with the domain's TLS policy applied.

Owns `connect(hosts, policy, ...)` (tries MX hosts in order and their addresses; STARTTLS per
mailauth.tlspolicy; never falls back to plaintext when TLS is required) and `Session.send()`
(MAIL/RCPT/DATA, RSET after a rejection so the connection can carry the next message).
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
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.email import quote_address

from ..mailauth.tlspolicy import TlsPolicy, client_context
from .mx import MxHost

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


class Session:
    def __init__(self, smtp: aiosmtplib.SMTP, host: str, tls: bool, verified: bool, policy: TlsPolicy):
        self.smtp = smtp
        self.host = host
        self.tls = tls
        self.verified = verified
        self.policy = policy
        self.usable = True
        self.sent = 0
        self.timeout = smtp.timeout  # relay.command_timeout

    @property
    def open(self) -> bool:
        """Fit for another transaction: no failure made it unusable and the remote has not
        closed it (an idle connection the remote timed out)."""
        return self.usable and self.smtp.is_connected

    async def send(self, sender: str, recipient: str, data: bytes) -> Accepted:
        """One transaction; `data` has CRLF line endings only (mailauth.dkim.normalize_crlf)."""
        started = time.monotonic()
        stage = "mail"
        encoding, mail_options = "ascii", ()
        if not (sender.isascii() and recipient.isascii()):
            # Internationalised address (RFC 6531): only to a server that offers SMTPUTF8.
            if not self.smtp.supports_extension("smtputf8"):
                await self._reset()
                raise DeliveryError(f"5.6.7 {self.host} does not support SMTPUTF8, needed for this address",
                                    553, stage="mail", mx_host=self.host, tls=self.tls, verified=self.verified)
            encoding, mail_options = "utf-8", (b"SMTPUTF8",)
        # One deadline, moved on at each command (relay.command_timeout per reply), instead of
        # aiosmtplib's wait_for() around every reply: the same limits for less work per message.
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as deadline:
                deadline.reschedule(loop.time() + self.timeout)
                reply = await self.smtp.execute_command(
                    b"MAIL", b"FROM:" + _path(sender).encode(encoding), *mail_options, timeout=None)
                if reply.code != 250:
                    raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)
                stage = "rcpt"
                deadline.reschedule(loop.time() + self.timeout)
                reply = await self.smtp.execute_command(b"RCPT", b"TO:" + _path(recipient).encode(encoding),
                                                        timeout=None)
                if reply.code not in (250, 251):
                    raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
                stage = "data"
                deadline.reschedule(loop.time() + self.timeout)
                reply = await self.smtp.execute_command(b"DATA", timeout=None)
                if reply.code != 354:
                    raise aiosmtplib.SMTPDataError(reply.code, reply.message)
                deadline.reschedule(loop.time() + self.timeout)
                # The content goes straight to the protocol: aiosmtplib's data() would run two
                # regular expressions over it to do what _data_payload does with str methods.
                # No await between the write and read_response: no reply can be missed.
                self.smtp.protocol.write(_data_payload(data))
                reply = await self.smtp.protocol.read_response(timeout=None)
                if reply.code != 250:
                    raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError,
                asyncio.TimeoutError) as exc:
            self.usable = False
            raise DeliveryError(f"Connection to {self.host} lost during {stage.upper()}: {exc}", 451,
                                stage=stage, mx_host=self.host, tls=self.tls, verified=self.verified) from exc
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:
                self.usable = False
            else:
                await self._reset()
            raise DeliveryError(exc.message, exc.code, stage=stage, mx_host=self.host, tls=self.tls,
                                verified=self.verified) from exc
        except aiosmtplib.SMTPException as exc:
            self.usable = False
            raise DeliveryError(f"SMTP error from {self.host} during {stage.upper()}: {exc}", 451,
                                stage=stage, mx_host=self.host, tls=self.tls, verified=self.verified) from exc
        self.sent += 1
        return Accepted(reply.code, reply.message, self.host, self.tls, self.verified,
                        round(time.monotonic() - started, 3))

    async def _reset(self) -> None:
        try:
            await self.smtp.rset()
        except NETWORK_ERRORS:
            self.usable = False

    async def close(self) -> None:
        self.usable = False
        try:
            if self.smtp.is_connected:
                await asyncio.wait_for(self.smtp.quit(), 5)
        except NETWORK_ERRORS:
            pass
        finally:
            self.smtp.close()


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
