"""Building and checking messages: addresses, header values, MIME composition.

Owns what a well-formed outgoing message is: address-list parsing with display names (the
email package's header parser), the refusal of CR/LF/NUL in anything that becomes a header,
composing MIME from the API's fields (text, html, amp-html, attachments, inline parts with
their Content-ID) with EmailMessage(policy=SMTP), and reading / completing the headers of a
message given as MIME (Message-Id and Date added when missing, the rest left byte for byte).
Used by core.send.submit(); nothing here touches the store.
"""
from __future__ import annotations

import base64
import datetime
import binascii
import email.header
import email.message
import email.utils
import mimetypes
import re
import secrets
import time
from dataclasses import dataclass
from email import policy
from email.parser import BytesHeaderParser

from ..errors import InputError

SMTP_POLICY = policy.SMTP.clone(max_line_length=998, refold_source="none")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,127}$")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # printable ASCII except ':'
# Headers the composer owns; h:<name> may not replace them.
RESERVED_HEADERS = {"content-type", "content-transfer-encoding", "mime-version", "from", "to",
                    "cc", "bcc", "content-disposition"}


@dataclass
class Attachment:
    filename: str
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class Addr:
    display: str
    address: str  # addr-spec, domain in lower case

    def formatted(self) -> str:
        return email.utils.formataddr((self.display, self.address)) if self.display else self.address


# -- checks -------------------------------------------------------------------------------------
def check_header_value(name: str, value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise InputError(f"'{name}' parameter contains a line break or NUL character, which a header may not carry")
    return value


def check_header_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise InputError(f"'h:{name[:40]}' is not a valid header name")
    return name


def ascii_domain(domain: str) -> str:
    """The domain in lower-case ASCII (IDNA for internationalised names)."""
    return (domain if domain.isascii() else domain.encode("idna").decode("ascii")).lower()


def valid_domain(domain: str) -> bool:
    try:
        name = ascii_domain(domain)
    except UnicodeError:
        return False
    labels = name.rstrip(".").split(".")
    return len(name) <= 253 and len(labels) >= 2 and all(_HOST_LABEL.match(l) for l in labels)


_OK_DEFECTS = ("empty element in address-list",)
# Fast path for the common shapes: `local@domain`, `<local@domain>`, `Name Words <local@domain>`
# with plain atoms only.  Anything else (quotes, comments, encoded words, groups, dots in
# names) goes through the email package's full RFC 5322 parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})+"
_SIMPLE = re.compile(rf"[ \t]*(?:({_ATEXT}(?:[ \t]+{_ATEXT})*)[ \t]*<({_DOT_ATOM})@({_DOMAIN})>"
                     rf"|<({_DOT_ATOM})@({_DOMAIN})>|({_DOT_ATOM})@({_DOMAIN}))[ \t]*")


_NOT_SIMPLE = re.compile(r'["()\\\[\]:;]|=\?')


def simple_addresses(value: str) -> list[Addr] | None:
    """The addresses of a plain list (a@b, <a@b>, Name <a@b>, comma-separated; domains
    lower-cased), or None when the value needs the full address parser."""
    if _NOT_SIMPLE.search(value):
        return None
    out = []
    for piece in value.split(","):
        if not piece.strip():
            continue
        m = _SIMPLE.fullmatch(piece)
        if m is None:
            return None
        display, l1, d1, l2, d2, l3, d3 = m.groups()
        local, domain = (l1, d1) if l1 else (l2, d2) if l2 else (l3, d3)
        if len(local) + len(domain) >= 320:
            return None
        out.append(Addr(display or "", f"{local}@{domain.lower()}"))
    return out


def parse_addresses(values, field: str) -> list[Addr]:
    """Addresses from one or more header-style strings (comma-separated, display names)."""
    out: list[Addr] = []
    for value in values:
        if value is None:
            continue
        value = str(value)
        check_header_value(field, value)
        if not value.strip():
            continue
        simple = simple_addresses(value)
        if simple is not None:
            out.extend(simple)
            continue
        try:
            header = SMTP_POLICY.header_factory("To", value)
            addresses = header.addresses
            defects = [d for d in header.defects if not any(ok in str(d) for ok in _OK_DEFECTS)]
        except Exception:  # noqa: BLE001 - the parser raises assorted errors on garbage
            raise InputError(f"{field} parameter is not a valid address. please check documentation") from None
        if defects or not addresses:
            raise InputError(f"{field} parameter is not a valid address. please check documentation")
        for a in addresses:
            if (not a.username or not a.domain or not a.username.isascii() or len(a.addr_spec) > 320
                    or any(c.isspace() for c in a.username) or not valid_domain(a.domain)):
                raise InputError(f"{field} parameter is not a valid address. please check documentation")
            local = a.addr_spec.rsplit("@", 1)[0]
            out.append(Addr(a.display_name or "", f"{local}@{ascii_domain(a.domain)}"))
    return out


def unique_recipients(addrs: list[Addr]) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in addrs:
        key = a.address.lower()
        if key not in seen:
            seen.add(key)
            out.append(a.address)
    return out


# -- ids and dates --------------------------------------------------------------------------------
def new_message_id(domain: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}.{secrets.token_hex(8)}@{domain}"


_last_date: tuple = (None, "")  # (whole second, its Date text): a second's messages share it


def rfc5322_date(ts: float) -> str:
    """'Thu, 26 Nov 2026 01:14:19 +0000' (UTC, explicit offset)."""
    global _last_date
    second = int(ts // 1)
    cached = _last_date  # one read: compose may run in threads too
    if cached[0] == second:
        return cached[1]
    text = email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.timezone.utc))
    _last_date = (second, text)
    return text


def strip_brackets(message_id: str) -> str:
    return message_id.strip().strip("<>").strip()


# -- composing from fields ---------------------------------------------------------------------------
def guess_type(filename: str, given: str | None) -> tuple[str, str]:
    ctype = (given or "").split(";")[0].strip().lower()
    if not _MIME_TYPE.match(ctype):
        ctype = mimetypes.guess_type(filename or "")[0] or "application/octet-stream"
    maintype, _, subtype = ctype.partition("/")
    if maintype in ("multipart", "message"):
        # Files travel base64-encoded, which these types may not be (RFC 2046).
        return "application", "octet-stream"
    return maintype, subtype


def _header(name: str, value: str) -> bytes:
    """One header field, RFC 2047-encoded when not ASCII, folded to stay well under 998."""
    if value.isascii() and len(value) + len(name) < 900:
        return f"{name}: {value}\r\n".encode("ascii")
    if value.isascii():
        return f"{name}: {_fold_ascii(value, len(name) + 2)}\r\n".encode("ascii")
    encoded = email.header.Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}\r\n".encode("ascii")


def _fold_ascii(value: str, used: int) -> str:
    out, line = [], ""
    for word in value.split(" "):
        if line and used + len(line) + 1 + len(word) > 78:
            out.append(line)
            line, used = word, 1
        else:
            line = f"{line} {word}" if line else word
    out.append(line)
    return "\r\n ".join(out)


def _address_header(name: str, addrs: list[Addr]) -> bytes:
    parts = [email.utils.formataddr((a.display, a.address), charset="utf-8") if a.display else a.address
             for a in addrs]
    return f"{name}: " .encode() + ",\r\n ".join(parts).encode("ascii") + b"\r\n"


def _boundary() -> str:
    return f"=_mailplat_{secrets.token_hex(12)}"


# Bytes that quoted-printable text leaves as they are wherever they stand: printable ASCII but
# "=", the space (a line's last character is the only place a space is encoded) and LF.
_QP_LITERAL = bytes(range(33, 61)) + bytes(range(62, 127)) + b" \n"


def _soft_broken(lines: list[str]) -> bytes | None:
    """binascii.b2a_qp(istext=True) of these lines joined by LF, with CRLF line ends, for text
    that only needs soft line breaks (ASCII lines too long for 7bit); None when anything in it
    needs encoding.  The same bytes, without the per-byte C loop that is a fifth of a 10 KB
    send's CPU: a line over 76 characters becomes 75-character pieces ending in "=", the last
    piece keeping up to 76."""
    for line in lines:
        if line[-1:] == " " or line == ".":  # encoded as =20 / =2E by b2a_qp
            return None
    if "\n".join(lines).encode("ascii").translate(None, _QP_LITERAL):
        return None
    out = []
    for line in lines:
        n = len(line)
        if n <= 76:
            out.append(line)
            continue
        pieces = (n - 2) // 75  # pieces of 75 before a last one of 2..76 characters
        out.append("=\r\n".join([line[i:i + 75] for i in range(0, pieces * 75, 75)] + [line[pieces * 75:]]))
    return "\r\n".join(out).encode("ascii")


def _text_part(text: str, subtype: str) -> bytes:
    data = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = data.split("\n")
    if data.isascii() and all(len(line) <= 998 for line in lines):
        body, cte = data.replace("\n", "\r\n").encode("ascii"), "7bit"
    else:
        body = data.isascii() and _soft_broken(lines)
        if not body:
            body = binascii.b2a_qp(data.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
        cte = "quoted-printable"
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode() + body


def _param(name: str, value: str) -> str:
    if value.isascii():
        return f'{name}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
    return f"{name}*={email.utils.encode_rfc2231(value, 'utf-8')}"


def _file_part(att: Attachment, inline: bool) -> bytes:
    maintype, subtype = guess_type(att.filename, att.content_type)
    filename = att.filename or ("inline" if inline else "attachment")
    check_header_value("filename", filename)
    head = [f"Content-Type: {maintype}/{subtype}; {_param('name', filename)}",
            f"Content-Disposition: {'inline' if inline else 'attachment'}; {_param('filename', filename)}",
            "Content-Transfer-Encoding: base64"]
    if inline:
        cid = filename if filename.isascii() else email.header.Header(filename, "utf-8").encode()
        head.append(f"Content-ID: <{cid}>")
    # Files travel as base64, so what arrives is exactly what was uploaded.
    return ("\r\n".join(head) + "\r\n\r\n").encode() + base64.encodebytes(att.data).replace(b"\n", b"\r\n")


def _multipart(subtype: str, parts: list[bytes]) -> bytes:
    b = _boundary()
    out = [f'Content-Type: multipart/{subtype}; boundary="{b}"\r\n\r\n'.encode()]
    for part in parts:
        out.append(f"--{b}\r\n".encode())
        out.append(part)
        if not part.endswith(b"\r\n"):
            out.append(b"\r\n")
    out.append(f"--{b}--\r\n".encode())
    return b"".join(out)


def compose(*, from_: str, to: list[Addr], cc: list[Addr], subject: str | None, text: str | None,
            html: str | None, amp_html: str | None, attachments: list[Attachment],
            inline: list[Attachment], headers: list[tuple[str, str]], message_id: str,
            date: float) -> bytes:
    """One MIME message from the API's fields (bytes, CRLF line endings).

    Built directly (header encoding, quoted-printable and base64 from the standard library):
    the email package's object model costs about a millisecond per message on this path."""
    head: list[bytes] = []
    from_addrs = parse_addresses([from_], "from")
    head.append(_address_header("From", from_addrs[:1]))
    if to:
        head.append(_address_header("To", to))
    if cc:
        head.append(_address_header("Cc", cc))
    if subject is not None:
        head.append(_header("Subject", subject))
    extra = {name.lower() for name, _ in headers}
    if "date" not in extra:
        head.append(_header("Date", rfc5322_date(date)))
    if "message-id" not in extra:
        head.append(_header("Message-Id", f"<{message_id}>"))
    for name, value in headers:
        head.append(_header(name, value))
    head.append(b"MIME-Version: 1.0\r\n")

    bodies = [_text_part(b, s) for s, b in (("plain", text), ("x-amp-html", amp_html)) if b is not None]
    loose_inline = list(inline)
    if html is not None:
        html_part = _text_part(html, "html")
        if inline:
            html_part = _multipart("related", [html_part] + [_file_part(a, True) for a in inline])
            loose_inline = []
        bodies.append(html_part)
    if not bodies:
        bodies = [_text_part("", "plain")]
    body = bodies[0] if len(bodies) == 1 else _multipart("alternative", bodies)
    files = [_file_part(a, True) for a in loose_inline] + [_file_part(a, False) for a in attachments]
    if files:
        body = _multipart("mixed", [body] + files)
    return b"".join(head) + body


# -- messages given as MIME -----------------------------------------------------------------------
_HEADER_END = re.compile(rb"\r?\n\r?\n")


# A header line as email's compat32 FeedParser takes it: a non-empty name of printable ASCII
# but ":", then ":" (its headerRE also takes "From " lines and empty names: see header_items).
_FIELD_START = re.compile(rb"[!-9;-~]+:")


def header_items(block: bytes) -> list[tuple[bytes, bytes]] | None:
    """The fields of a header block (CRLF lines, without the blank line that ends it) as
    (name, value) byte pairs, exactly as email's compat32 parser records them: the value is
    what follows the first ":" without its leading blanks, folded lines kept with their CRLF,
    the last CRLF dropped.  None when the block has anything that parser treats specially
    (a line ending other than CRLF, a first line that is a continuation, a "From " envelope
    line, an empty field name, a line that is not a field, which would end the headers):
    callers then run the parser itself.  A few microseconds where the parser takes ~50."""
    if block[-2:] != b"\r\n":
        return None
    crlf = block.count(b"\r\n")
    if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
        return None
    out: list[tuple[bytes, bytes]] = []
    name = b""
    parts: list[bytes] = []
    match = _FIELD_START.match
    for line in block[:-2].split(b"\r\n"):
        first = line[:1]
        if first == b" " or first == b"\t":
            if not name:
                return None
            parts.append(line)
            continue
        m = match(line)
        if m is None:
            return None
        if name:
            out.append((name, b"\r\n".join(parts)))
        end = m.end()
        name = line[:end - 1]
        parts = [line[end:].lstrip(b" \t")]
    if name:
        out.append((name, b"\r\n".join(parts)))
    return out


def read_headers(raw: bytes):
    """The header part of a raw message as an email.message.Message (the body is not read:
    the parser would otherwise walk every body line even in headers-only mode).

    An ASCII header block that header_items can split (nearly every message) is turned into
    the same Message without the parser, which cost a tenth of an SMTP submission's CPU."""
    m = _HEADER_END.search(raw, 0, 1 << 20)
    if m is not None and m.end() - m.start() == 4:
        block = raw[:m.start() + 2]
        items = header_items(block) if block.isascii() else None
        if items is not None:
            msg = email.message.Message(policy=policy.compat32)
            msg._headers = [(n.decode("ascii"), v.decode("ascii")) for n, v in items]
            msg.set_payload("")
            return msg
    return BytesHeaderParser(policy=policy.compat32).parsebytes(raw[:m.end()] if m else raw[:1 << 20])


def decoded(msg, name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    if isinstance(value, str) and "=?" not in value:
        return value.strip()  # no encoded words: what make_header(decode_header()) gives back
    try:
        return str(email.header.make_header(email.header.decode_header(str(value)))).strip()
    except Exception:  # noqa: BLE001 - malformed encoded-words: keep the raw text
        return str(value).strip()


def decoded_filename(part) -> str:
    name = part.get_filename() or ""
    return str(email.header.make_header(email.header.decode_header(name))) if "=?" in name else name


def complete_mime(raw: bytes, domain: str, now: float) -> tuple[bytes, str, object]:
    """Add Message-Id and Date when missing; everything else stays byte for byte.

    Returns (bytes, message id without brackets, parsed headers)."""
    headers = read_headers(raw)
    nl = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    prefix = b""
    mid = strip_brackets(str(headers.get("Message-Id", "") or ""))
    if not mid or any(c in mid for c in " \t\r\n<>") or "@" not in mid:
        if headers.get("Message-Id") is not None:
            raise InputError("message has a malformed Message-Id header")
        mid = new_message_id(domain, now)
        prefix += b"Message-Id: <" + mid.encode() + b">" + nl
    if headers.get("Date") is None:
        prefix += b"Date: " + rfc5322_date(now).encode() + nl
    return prefix + raw, mid, headers

