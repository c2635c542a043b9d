"""The submission listeners' policy (587 with STARTTLS, 465 with implicit TLS).

Owns what a submitting client may do: MAIL needs AUTH first (530 5.7.0), and both the
envelope sender and the From: header must be in the domain the login belongs to (550 5.7.1).
A client in config smtp.trusted_networks may submit without AUTH (as Postfix's mynetworks),
but only with an envelope sender in one of our enabled domains (core.send.check_sending_domain;
anything else is 550 5.7.1, so never an open relay); that domain then plays the login's part.
A domain found ours is remembered for SENDING_DOMAIN_TTL seconds (Shared.sending_domains): a
trusted client sends many messages, and the store read per MAIL cost a thread hop each time.
Only positive answers are kept, so a domain created a moment ago is accepted at once; a domain
disabled or deleted within the TTL still gets its mail refused at end of DATA, where the send
transaction checks the domain again before it commits (core.send).
At end of DATA the X-Mailgun-* headers are read and stripped by core.options.from_headers and
the message goes down the one send path, core.send.submit(); 250 is said only after it returns,
i.e. after the message and its queue rows are committed.
"""
from __future__ import annotations

import time
from email.parser import HeaderParser
from email.policy import compat32
from email.utils import getaddresses

import idna

from .. import errors, logs
from ..core import compose, options, send
from . import syntax
from .protocol import Session, reply_for

log = logs.get("mailplat.smtpd.submission")

NOT_OWNED = "550 5.7.1 Sender address not owned by the authenticated user"
NOT_OURS = "550 5.7.1 Sender domain not hosted here: authenticate to send for other domains"
FROM_NOT_SENDERS = "550 5.7.1 From: header outside the envelope sender's domain"
_headers = HeaderParser(policy=compat32)
SENDING_DOMAIN_TTL = 5.0
SENDING_DOMAINS_MAX = 1000


def _header_block(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def from_domains(raw: bytes) -> list[str]:
    """Domains of the addresses in the From: header(s) of a message."""
    block = _header_block(raw)
    items = compose.header_items(block)  # the parser's own fields, without the parser
    if items is not None:
        values = [v.decode("utf-8", "replace") for n, v in items if n.lower() == b"from"]
    else:
        msg = _headers.parsestr(block.decode("utf-8", "replace"))
        values = [str(v) for v in msg.get_all("From", [])]
    domains = []
    for value in values:  # the plain shapes (a@b, <a@b>, Name <a@b>) without email.utils
        simple = compose.simple_addresses(value) if all(p.strip() for p in value.split(",")) else None
        if simple is None:
            break
        domains.extend(a.address.rpartition("@")[2] for a in simple)
    else:
        return domains
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

    def _sending_domain(self) -> str | None:
        """The domain this transaction sends for: the login's, or the trusted sender's."""
        if self.auth_login is not None:
            return self.auth_domain
        return self.mail.domain if self.mail is not None else None

    async def on_mail(self, path: syntax.Path) -> str | None:
        if self.auth_login is None:  # a trusted network's client (protocol said 530 otherwise)
            return await self._trusted_sender(path)
        if path.domain != self.auth_domain:
            log.warning("sender outside the login's domain",
                        extra={"fields": {"sender": path.address[:320]}})
            return NOT_OWNED
        return None

    async def _trusted_sender(self, path: syntax.Path) -> str | None:
        refusal = None
        if not path.domain or path.literal:
            refusal = NOT_OURS
        else:
            known = self.shared.sending_domains
            now = time.monotonic()
            if known.get(path.domain, 0.0) <= now:
                try:
                    await send.check_sending_domain(self.shared.ctx, path.domain)
                except (errors.NotFound, errors.ForbiddenError):
                    known.pop(path.domain, None)
                    refusal = NOT_OURS
                except Exception as exc:  # noqa: BLE001 - the one translator
                    return reply_for(exc)
                else:
                    if len(known) >= SENDING_DOMAINS_MAX:
                        known.clear()
                    known[path.domain] = now + SENDING_DOMAIN_TTL
        if refusal:
            log.warning("trusted-network sender refused: not one of our domains",
                        extra={"fields": {"sender": path.address[:320]}})
            return refusal
        log.info("trusted-network submission without AUTH",
                 extra={"fields": {"sender": path.address[:320]}})
        return None

    async def on_rcpt(self, path: syntax.Path) -> str | None:
        if path.literal:
            return "550 5.7.1 Address literals are not accepted"
        return None

    async def on_data(self, raw: bytes) -> str:
        domain = self._sending_domain()
        opts, user_variables, stripped = options.from_headers(raw)
        if any(d != domain for d in from_domains(stripped)):
            log.warning("From: header outside the sender's domain")
            return NOT_OWNED if self.auth_login is not None else FROM_NOT_SENDERS
        req = send.SendRequest(domain=domain, source="smtp", mime=stripped,
                               recipients=[r.address for r in self.rcpts],
                               sender=self.mail.address, options=opts,
                               user_variables=user_variables)
        result = await send.submit(self.shared.ctx, req)
        logs.event(log, "submitted message accepted", message_id=result.message_id,
                   rcpts=len(self.rcpts), size=len(raw), trusted_network=self.auth_login is None)
        return f"250 2.0.0 Ok: queued as {result.message_id}"
