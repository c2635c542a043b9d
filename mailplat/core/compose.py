"""Building and checking messages: addresses, header values, MIME composition.

Owns what a well-formed outgoing message is: address-list parsing with display names (the
email package's header parser), the refusal of CR/LF/NUL in anything that becomes a header,
composing MIME from the API's fields (text, html, amp-html, attachments, inline parts with
their Content-ID) with EmailMessage(policy=SMTP), and reading / completing the headers of a
message given as MIME (Message-Id and Date added when missing, the rest left byte for byte).
Used by core.send.submit(); nothing here touches the store.
"""
from __future__ import annotations

import email.utils
import mimetypes
import re
import secrets
import time
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser

from ..errors import InputError

SMTP_POLICY = policy.SMTP.clone(max_line_length=998, refold_source="none")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
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
    if any(c in value for c in "\r\n\x00"):
        raise InputError(f"'{name}' parameter contains a line break or NUL character, which a header may not carry")
    return value


def check_header_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise InputError(f"'h:{name[:40]}' is not a valid header name")
    return name


def valid_domain(domain: str) -> bool:
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return False
    labels = ascii_domain.rstrip(".").split(".")
    return len(ascii_domain) <= 253 and len(labels) >= 2 and all(_HOST_LABEL.match(l) for l in labels)


_OK_DEFECTS = ("empty element in address-list",)


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
            out.append(Addr(a.display_name or "", f"{a.username}@{a.domain.lower()}"
                            if '"' not in a.addr_spec else a.addr_spec.rsplit("@", 1)[0] + "@" + a.domain.lower()))
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


def strip_brackets(message_id: str) -> str:
    return message_id.strip().strip("<>").strip()


# -- composing from fields ---------------------------------------------------------------------------
def guess_type(filename: str, given: str | None) -> tuple[str, str]:
    ctype = (given or "").split(";")[0].strip().lower()
    if not ctype or "/" not in ctype:
        ctype = mimetypes.guess_type(filename or "")[0] or "application/octet-stream"
    maintype, _, subtype = ctype.partition("/")
    return maintype, subtype


def _add_file(part: EmailMessage, att: Attachment, inline: bool) -> None:
    maintype, subtype = guess_type(att.filename, att.content_type)
    filename = att.filename or "attachment"
    check_header_value("filename", filename)
    kwargs = {"filename": filename}
    if inline:
        kwargs["cid"] = f"<{filename}>"
        kwargs["disposition"] = "inline"
    # Files travel as bytes (base64), so what arrives is exactly what was uploaded.
    part.add_attachment(att.data, maintype=maintype, subtype=subtype, **kwargs)


def _with_related(body: EmailMessage, inline: list[Attachment]) -> None:
    for att in inline:
        maintype, subtype = guess_type(att.filename, att.content_type)
        filename = att.filename or "inline"
        check_header_value("filename", filename)
        body.add_related(att.data, maintype=maintype, subtype=subtype,
                         cid=f"<{filename}>", filename=filename, disposition="inline")


def compose(*, from_: str, to: list[Addr], cc: list[Addr], subject: str | None, text: str | None,
            html: str | None, amp_html: str | None, attachments: list[Attachment],
            inline: list[Attachment], headers: list[tuple[str, str]], message_id: str,
            date: float) -> bytes:
    """One MIME message from the API's fields (bytes, CRLF line endings)."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = from_
    if to:
        msg["To"] = ", ".join(a.formatted() for a in to)
    if cc:
        msg["Cc"] = ", ".join(a.formatted() for a in cc)
    if subject is not None:
        msg["Subject"] = subject
    extra_ids = {name.lower() for name, _ in headers}
    if "date" not in extra_ids:
        msg["Date"] = email.utils.formatdate(date, localtime=False, usegmt=False)
    if "message-id" not in extra_ids:
        msg["Message-Id"] = f"<{message_id}>"
    for name, value in headers:
        msg[name] = value

    bodies = [(s, b) for s, b in (("plain", text), ("x-amp-html", amp_html), ("html", html)) if b is not None]
    if not bodies:
        bodies = [("plain", "")]
    first_sub, first_body = bodies[0]
    msg.set_content(first_body, subtype=first_sub)
    for sub, body in bodies[1:]:
        msg.add_alternative(body, subtype=sub)
    if inline:
        if msg.is_multipart():
            html_part = next((p for p in msg.iter_parts() if p.get_content_subtype() == "html"), None)
        else:
            html_part = msg if msg.get_content_subtype() == "html" else None
        if html_part is None:
            # No html to relate to: inline files travel as inline attachments.
            for att in inline:
                _add_file(msg, att, inline=True)
        else:
            _with_related(html_part, inline)
    for att in attachments:
        _add_file(msg, att, inline=False)
    return msg.as_bytes(policy=SMTP_POLICY)


# -- messages given as MIME -----------------------------------------------------------------------
def read_headers(raw: bytes):
    """The header part of a raw message as an email.message.Message (body not parsed)."""
    return BytesHeaderParser(policy=policy.compat32).parsebytes(raw[:1 << 20])


def decoded(msg, name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value)))).strip()
    except Exception:  # noqa: BLE001 - malformed encoded-words: keep the raw text
        return str(value).strip()


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
        prefix += b"Date: " + email.utils.formatdate(now).encode() + nl
    return prefix + raw, mid, headers


import email.header  # noqa: E402  (used by `decoded`)
