"""The submission listeners' policy (587 with STARTTLS, 465 with implicit TLS).

Owns what an authenticated client may do: MAIL needs AUTH first (530 5.7.0), and both the
envelope sender and the From: header must be in the domain the login belongs to (550 5.7.1).
At end of DATA the X-Mailgun-* headers are read and stripped by core.options.from_headers and
the message goes down the one send path, core.send.submit(); 250 is said only after it returns,
i.e. after the message and its queue rows are committed.
"""
from __future__ import annotations

from email.parser import HeaderParser
from email.policy import compat32
from email.utils import getaddresses

import idna

from .. import logs
from . import syntax
from .protocol import Session

log = logs.get("mailplat.smtpd.submission")

NOT_OWNED = "550 5.7.1 Sender address not owned by the authenticated user"
_headers = HeaderParser(policy=compat32)


def _header_block(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def from_domains(raw: bytes) -> list[str]:
    """Domains of the addresses in the From: header(s) of a message."""
    msg = _headers.parsestr(_header_block(raw).decode("utf-8", "replace"))
    values = [str(v) for v in msg.get_all("From", [])]
    domains = []
    for _name, addr in getaddresses(values):
        domain = addr.rpartition("@")[2].strip().lower() if "@" in addr else ""
        if not domain.isascii():
            try:
                domain = idna.encode(domain, uts46=True).decode("ascii")
            except idna.IDNAError:
                domain = ""
        domains.append(domain)
    return domains


class SubmissionSession(Session):
    kind = "submission"
    offers_auth = True

    async def on_mail(self, path: syntax.Path) -> str | None:
        if path.domain != self.auth_domain:
            log.warning("sender outside the login's domain",
                        extra={"fields": {"sender": path.address[:320]}})
            return NOT_OWNED
        return None

    async def on_rcpt(self, path: syntax.Path) -> str | None:
        if path.literal:
            return "550 5.7.1 Address literals are not accepted"
        return None

    async def on_data(self, raw: bytes) -> str:
        from ..core import options, send
        opts, user_variables, stripped = options.from_headers(raw)
        if any(d != self.auth_domain for d in from_domains(stripped)):
            log.warning("From: header outside the login's domain")
            return NOT_OWNED
        req = send.SendRequest(domain=self.auth_domain, source="smtp", mime=stripped,
                               recipients=[r.address for r in self.rcpts],
                               sender=self.mail.address, options=opts,
                               user_variables=user_variables)
        result = await send.submit(self.shared.ctx, req)
        logs.event(log, "submitted message accepted", message_id=result.message_id,
                   rcpts=len(self.rcpts), size=len(raw))
        return f"250 2.0.0 Ok: queued as {result.message_id}"
