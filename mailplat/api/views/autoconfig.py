"""Mail client autoconfiguration, so a user types only address and password: Thunderbird's
autoconfig (/.well-known/autoconfig/mail/config-v1.1.xml and /mail/config-v1.1.xml
?emailaddress=...) and Outlook's autodiscover (POST /autodiscover/autodiscover.xml).  Public
endpoints; every value is XML-escaped.  Host names and ports come from config."""
from __future__ import annotations

import re
from xml.sax.saxutils import escape

from aiohttp import web

from ...core.context import Context
from ..forms import query
from ..middleware import public

_ADDR = re.compile(r"^[^\s@<>\"]{1,64}@[A-Za-z0-9.-]{1,253}$")
_MAX_BODY = 64 * 1024
_XML = {"Content-Type": "application/xml; charset=utf-8", "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store"}


def _address(value) -> str:
    value = (value or "").strip()
    return value if _ADDR.match(value) else ""


def setup(app: web.Application, ctx: Context) -> None:
    cfg = ctx.config
    host = cfg.server.hostname
    ma, smtp = cfg.mailaccess, cfg.smtp

    def bound(name: str, configured: int) -> int:
        # Ports bound in this process win over the configured ones (0 means "any free port").
        return ctx.ports.get(name) or configured

    def thunderbird(address: str) -> str:
        domain = address.rpartition("@")[2] if address else host
        e = escape
        servers = [("incomingServer", "imap", bound("imaps", ma.imaps_port), "SSL"),
                   ("incomingServer", "imap", bound("imap", ma.imap_port), "STARTTLS"),
                   ("incomingServer", "pop3", bound("pop3s", ma.pop3s_port), "SSL"),
                   ("incomingServer", "pop3", bound("pop3", ma.pop3_port), "STARTTLS"),
                   ("outgoingServer", "smtp", bound("submissions", smtp.submissions_port), "SSL"),
                   ("outgoingServer", "smtp", bound("submission", smtp.submission_port), "STARTTLS")]
        parts = ['<?xml version="1.0" encoding="UTF-8"?>', '<clientConfig version="1.1">',
                 f'  <emailProvider id="{e(domain, {chr(34): "&quot;"})}">',
                 f"    <domain>{e(domain)}</domain>",
                 f"    <displayName>{e(domain)}</displayName>",
                 f"    <displayShortName>{e(domain)}</displayShortName>"]
        for tag, kind, port, sock in servers:
            parts += [f'    <{tag} type="{kind}">', f"      <hostname>{e(host)}</hostname>",
                      f"      <port>{int(port)}</port>", f"      <socketType>{sock}</socketType>",
                      "      <username>%EMAILADDRESS%</username>",
                      "      <authentication>password-cleartext</authentication>", f"    </{tag}>"]
        parts += ["  </emailProvider>", "</clientConfig>", ""]
        return "\n".join(parts)

    @public
    async def autoconfig(request: web.Request) -> web.Response:
        address = _address(query(request).str("emailaddress"))
        return web.Response(text=thunderbird(address), headers=_XML)

    @public
    async def autodiscover(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > _MAX_BODY:
            return web.Response(status=413, text="Request too large")
        body = await request.content.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            return web.Response(status=413, text="Request too large")
        m = re.search(rb"<EMailAddress>\s*([^<]{1,320}?)\s*</EMailAddress>", body, re.I)
        address = _address(m.group(1).decode("utf-8", "replace")) if m else ""
        e = escape
        protos = [("IMAP", bound("imaps", ma.imaps_port), "on"), ("POP3", bound("pop3s", ma.pop3s_port), "on"),
                  ("SMTP", bound("submissions", smtp.submissions_port), "on")]
        parts = ['<?xml version="1.0" encoding="utf-8"?>',
                 '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">',
                 '  <Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a">',
                 "    <Account>", "      <AccountType>email</AccountType>",
                 "      <Action>settings</Action>"]
        for kind, port, ssl in protos:
            parts += ["      <Protocol>", f"        <Type>{kind}</Type>", f"        <Server>{e(host)}</Server>",
                      f"        <Port>{int(port)}</Port>", f"        <LoginName>{e(address)}</LoginName>",
                      "        <DomainRequired>off</DomainRequired>", "        <SPA>off</SPA>",
                      f"        <SSL>{ssl}</SSL>", "        <AuthRequired>on</AuthRequired>",
                      "      </Protocol>"]
        parts += ["    </Account>", "  </Response>", "</Autodiscover>", ""]
        return web.Response(text="\n".join(parts), headers=_XML)

    app.router.add_get("/.well-known/autoconfig/mail/config-v1.1.xml", autoconfig)
    app.router.add_get("/mail/config-v1.1.xml", autoconfig)
    app.router.add_post("/autodiscover/autodiscover.xml", autodiscover)
    app.router.add_post("/Autodiscover/Autodiscover.xml", autodiscover)
