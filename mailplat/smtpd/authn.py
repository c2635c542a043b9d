"""AUTH PLAIN and AUTH LOGIN for the submission listeners (RFC 4954, RFC 4616).

Owns the AUTH exchange: when AUTH may be used (EHLO seen, offered, no transaction, TLS or
loopback in dev mode), the 334 challenges (under the command deadline), base64 and UTF-8
decoding, and the throttle from smtpd.limits (an escalating delay on failures, 421 for an
address that failed too often).  Credentials go to core.auth.check_login, which says which
domain the login belongs to.  Neither the AUTH lines nor the secrets in them are ever logged.
Mixed into smtpd.protocol.Session.
"""
from __future__ import annotations

import asyncio
import binascii
from base64 import b64decode, b64encode

from .. import logs
from .flow import Closed as _Closed

log = logs.get("mailplat.smtpd")
AUTH_LINE_LIMIT = 12288  # RFC 4954 section 4


class AuthCommands:
    async def cmd_AUTH(self, arg: str) -> None:
        if not self.offers_auth or not self.helo or not self.session.extended_smtp:
            await self.push("503 5.5.1 AUTH not available")
            return
        if not self.auth_available():
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.auth_login is not None:
            await self.push("503 5.5.1 Already authenticated")
            return
        if self.mail is not None:
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        if self.shared.auth.refused(self.ip):
            log.warning("AUTH refused: too many failures from this address")
            self.close_with("421 4.7.0 Too many failed authentication attempts, try again later")
            raise _Closed()
        words = arg.split(" ")
        mech = words[0].upper() if words else ""
        if mech not in ("PLAIN", "LOGIN") or len(words) > 2:
            await self.push("504 5.5.4 Unrecognized authentication type" if len(words) <= 2
                            else "501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        initial = words[1] if len(words) == 2 else None
        creds = await (self._auth_plain(initial) if mech == "PLAIN" else self._auth_login(initial))
        if creds is None:
            return
        login, password = creds
        domain = await self._check_login(login, password)
        if domain is None:
            delay = self.shared.auth.failed(self.ip, login)
            log.warning("AUTH failed", extra={"fields": {"login": login[:320], "mechanism": mech}})
            if delay:
                await asyncio.sleep(delay)
            await self.push("535 5.7.8 Authentication credentials invalid")
            return
        self.shared.auth.succeeded(login)
        self.auth_login = login.lower()
        self.auth_domain = domain.lower()
        logs.bind(login=self.auth_login)
        log.info("AUTH succeeded", extra={"fields": {"mechanism": mech}})
        await self.push("235 2.7.0 Authentication successful")

    async def _check_login(self, login: str, password: str) -> str | None:
        from ..core import auth
        return await auth.check_login(self.shared.ctx.store, login, password)

    async def _challenge(self, prompt: bytes) -> bytes | None:
        """Send a 334 challenge and return the decoded answer, or None (reply already sent)."""
        await self.push(b"334 " + b64encode(prompt))
        self._reset_timeout()  # the answer is due within the command deadline too
        line = await self._read_line(AUTH_LINE_LIMIT)
        self._pause_timeout()
        return await self._decode_auth(line)

    async def _decode_auth(self, data) -> bytes | None:
        if data is None:
            await self.push("500 5.5.2 Line too long")
            return None
        if isinstance(data, str):
            data = data.encode("ascii", "replace")
        data = data.rstrip(b"\r\n")
        if data == b"*":
            await self.push("501 5.7.0 Authentication cancelled")
            return None
        if data == b"=":
            return b""
        try:
            return b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[str, str] | None:
        blob = await (self._decode_auth(initial) if initial is not None else self._challenge(b""))
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split authentication data")
            return None
        return await self._texts(parts[1], parts[2])

    async def _auth_login(self, initial: str | None) -> tuple[str, str] | None:
        login = await (self._decode_auth(initial) if initial is not None
                       else self._challenge(b"Username:"))
        if login is None:
            return None
        password = await self._challenge(b"Password:")
        if password is None:
            return None
        return await self._texts(login, password)

    async def _texts(self, login: bytes, password: bytes) -> tuple[str, str] | None:
        try:
            return login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            await self.push("501 5.5.2 Credentials must be UTF-8")
            return None
