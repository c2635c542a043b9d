"""Strict parsing of the MAIL FROM / RCPT TO arguments (RFC 5321 section 4.1.2, RFC 6531).

Owns the path grammar: `<` [source route `:`] mailbox `>` followed by ESMTP parameters.
aiosmtpd's own parser accepts `MAIL FROM:<a@b` (no `>`) and other near-misses, so the smtpd
protocol parses with this module instead.  Source routes are accepted and dropped, as RFC 5321
section 4.1.1.3 asks: only the final mailbox counts.  Parse results are handed back to
smtpd.protocol, which decides the reply.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import idna

MAX_PATH = 256
MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1, enforced for recipients; senders (VERP/SRS return paths
# often exceed it, and Postfix accepts them) are bounded by MAX_PATH only
MAX_DOMAIN = 255

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8 = r"\u0080-\U0010ffff"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_ULABEL = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9{_UTF8}\-]{{0,61}}[A-Za-z0-9{_UTF8}])?"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_QUOTED_U = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
_IPV4 = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"
_LITERAL = rf"\[(?:{_IPV4}|IPv6:[0-9A-Fa-f:.]{{2,45}})\]"


def _path_re(utf8: bool) -> re.Pattern:
    atext = _ATEXT + (_UTF8 if utf8 else "")
    label = _ULABEL if utf8 else _LABEL
    domain = rf"{label}(?:\.{label})*"
    atom = rf"[{atext}]+"
    local = rf"(?:{atom}(?:\.{atom})*|{_QUOTED_U if utf8 else _QUOTED})"
    route = rf"@{domain}(?:,@{domain})*:"
    return re.compile(rf"<(?P<route>{route})?(?P<local>{local})@(?P<domain>{domain}|{_LITERAL})>")


_PATH_ASCII = _path_re(False)
_PATH_UTF8 = _path_re(True)
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*(?:=[\x21-\x3c\x3e-\x7e]+)?\Z")


class PathError(ValueError):
    """The argument is not a valid path; `.reply` says why, with an enhanced code."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


@dataclass
class Path:
    address: str  # local@domain, domain lower-cased (A-labels for IDNs); "" for the null path
    local: str = ""
    domain: str = ""
    literal: bool = False  # domain is an address literal [1.2.3.4]
    utf8: bool = False  # non-ASCII somewhere in the address
    params: dict[str, str | bool] = field(default_factory=dict)


def parse(arg: str, keyword: str, *, null_ok: bool, smtputf8_offered: bool,
          bad: str) -> Path:
    """Parse `FROM:<path> params` (keyword "FROM") or `TO:<path> params` (keyword "TO").

    `bad` is the reply for a malformed address (501 5.1.7 for senders, 501 5.1.3 for
    recipients).  Raises PathError carrying the reply to send.
    """
    head = arg[: len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise PathError(f"501 5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>")
    rest = arg[len(keyword) + 1:].lstrip(" ")
    if not rest.startswith("<"):
        raise PathError(bad)
    if rest.startswith("<>"):
        if not null_ok:
            raise PathError(bad)
        path = Path(address="")
        tail = rest[2:]
    else:
        utf8 = not rest.isascii()
        if utf8 and not smtputf8_offered:
            raise PathError(bad)
        m = (_PATH_UTF8 if utf8 else _PATH_ASCII).match(rest)
        if m is None:
            raise PathError(bad)
        tail = rest[m.end():]
        local, domain = m.group("local"), m.group("domain")
        if len(m.group(0)) - len(m.group("route") or "") > MAX_PATH or len(domain) > MAX_DOMAIN \
                or (keyword == "TO" and len(local) > MAX_LOCAL):
            raise PathError(f"{bad[:9]} Address too long")
        literal = domain.startswith("[")
        if not literal:
            domain = domain.lower()
            if not domain.isascii():
                try:
                    domain = idna.encode(domain, uts46=True).decode("ascii")
                except idna.IDNAError:
                    raise PathError(bad) from None
        path = Path(address=f"{local}@{domain}", local=local, domain=domain, literal=literal,
                    utf8=utf8)
    if tail and not tail.startswith(" "):
        raise PathError(bad)
    for word in tail.split():
        if not _PARAM.match(word):
            raise PathError("501 5.5.4 Bad ESMTP parameter syntax")
        name, eq, value = word.partition("=")
        name = name.upper()
        if name in path.params:
            raise PathError("501 5.5.4 Duplicate ESMTP parameter")
        path.params[name] = value if eq else True
    return path
