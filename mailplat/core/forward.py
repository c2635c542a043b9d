"""Route forward() bodies: an inbound message turned into the fields and the multipart/form-data
POST a Mailgun route receiver expects (and the parsed JSON of a stored message).

Owns parsing the message (transcoded to UTF-8 first), the fields (recipient, sender, from,
subject, body-plain made from HTML when there is no text part, stripped-text and
stripped-signature by mail-parser-reply, body-html, stripped-html, attachment-count,
attachment-1..N as files, message-headers as an ordered JSON list, content-id-map, every MIME
header as its own field, timestamp/token/signature) and the `mime` variant (recipient, sender,
from, subject, body-mime).  Parsing is capped (depth, parts); callers run it in a worker thread.
core.routejobs calls `build` and hands the bytes to the hooks outbox; the stored-messages API
calls `parsed`.
"""
from __future__ import annotations

import base64
import email
import json
import secrets
from email import policy
from email.message import EmailMessage
from html.parser import HTMLParser
from urllib.parse import urlsplit

MAX_PARTS = 1000
MAX_DEPTH = 64


# -- multipart/form-data encoding ------------------------------------------------------------------
def _quote_param(value: str) -> str:
    return (value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D")
            .replace("\n", "%0A").replace("\x00", ""))


def encode_multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) for text fields and (field, filename, content type, bytes) files."""
    boundary = "mailplat-" + secrets.token_hex(16)
    out = bytearray()
    for name, value in fields:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{_quote_param(name)}\"\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\n\r\n").encode("utf-8")
        out += value.encode("utf-8", "replace") + b"\r\n"
    for name, filename, ctype, data in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{_quote_param(name)}\"; "
                f"filename=\"{_quote_param(filename)}\"\r\nContent-Type: {ctype}\r\n\r\n").encode("utf-8")
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


# -- parsing -----------------------------------------------------------------------------------------
def _text(part) -> str:
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _header_text(value) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a malformed header is posted as its raw text
        return ""


def _walk(msg, depth=0, out=None):
    out = [] if out is None else out
    if depth > MAX_DEPTH or len(out) > MAX_PARTS:
        return out
    out.append(msg)
    if msg.is_multipart():
        payload = msg.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                _walk(sub, depth + 1, out)
    return out


class _QuoteStripper(HTMLParser):
    """Re-emits HTML without <blockquote> subtrees and the usual quoted-reply containers."""

    QUOTE_CLASSES = ("gmail_quote", "yahoo_quoted", "moz-cite-prefix")
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.out: list[str] = []
        self.skip_depth = 0

    def _quoted(self, tag, attrs) -> bool:
        if tag == "blockquote":
            return True
        cls = dict(attrs).get("class") or ""
        return any(c in cls for c in self.QUOTE_CLASSES)

    def handle_starttag(self, tag, attrs):
        if self.skip_depth:
            if tag not in self.VOID:
                self.skip_depth += 1
            return
        if self._quoted(tag, attrs) and tag not in self.VOID:
            self.skip_depth = 1
            return
        self.out.append(self.get_starttag_text() or "")

    def handle_startendtag(self, tag, attrs):
        if not self.skip_depth:
            self.out.append(self.get_starttag_text() or "")

    def handle_endtag(self, tag):
        if self.skip_depth:
            if tag not in self.VOID:
                self.skip_depth -= 1
            return
        self.out.append(f"</{tag}>")

    def handle_data(self, data):
        if not self.skip_depth:
            self.out.append(data)

    def handle_entityref(self, name):
        if not self.skip_depth:
            self.out.append(f"&{name};")

    def handle_charref(self, name):
        if not self.skip_depth:
            self.out.append(f"&#{name};")

    def handle_comment(self, data):
        pass

    def handle_decl(self, decl):
        if not self.skip_depth:
            self.out.append(f"<!{decl}>")


def strip_html(html: str) -> str:
    p = _QuoteStripper()
    try:
        p.feed(html)
        p.close()
    except Exception:  # noqa: BLE001 - unparseable HTML: post it as it is
        return html
    return "".join(p.out)


def html_to_text(html: str) -> str:
    import html2text
    h = html2text.HTML2Text()
    h.body_width = 0
    h.ignore_images = True
    return h.handle(html).strip() + "\n"


def strip_reply(text: str) -> tuple[str, str]:
    """(stripped text, stripped signature) of a plain-text body."""
    try:
        from mailparser_reply import EmailReplyParser
        mail = EmailReplyParser(languages=["en", "de", "fr", "es", "it", "nl"]).read(text)
        if mail.replies:
            first = mail.replies[0]
            return (first.body or "").strip(), (first.signatures or "").strip()
    except Exception:  # noqa: BLE001 - no stripping is better than no post
        pass
    return text.strip(), ""


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)


def transcode(raw: bytes) -> bytes:
    """The message with every text part re-encoded as UTF-8 (for body-mime)."""
    try:
        msg = parse(raw)
        changed = False
        for part in _walk(msg):
            if part.is_multipart() or part.get_content_maintype() != "text":
                continue
            charset = (part.get_content_charset() or "us-ascii").lower()
            if charset in ("utf-8", "us-ascii", "ascii"):
                continue
            text = _text(part)
            del part["Content-Transfer-Encoding"]
            part.set_payload(base64.encodebytes(text.encode("utf-8")).decode("ascii"))
            part.set_param("charset", "utf-8")
            part["Content-Transfer-Encoding"] = "base64"
            changed = True
        if not changed:
            return raw
        return msg.as_bytes(policy=policy.SMTP)
    except Exception:  # noqa: BLE001 - broken MIME is posted as received
        return raw


def parsed(raw: bytes, recipient: str, sender: str) -> tuple[list[tuple[str, str]], list[tuple[str, str, str, bytes]], dict, list]:
    """(fields, files, content-id map, headers) of an inbound message, in Mailgun's names."""
    msg = parse(raw)
    base = [("recipient", recipient), ("sender", sender),
            ("from", _header_text(msg.get("From", ""))), ("subject", _header_text(msg.get("Subject", "")))]
    headers = [(name, _header_text(value)) for name, value in msg.items()]
    plain = html = None
    others: dict[str, str] = {}
    files: list[tuple[str, str, str, bytes]] = []
    cid_map: dict[str, str] = {}
    for part in _walk(msg):
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        filename = part.get_filename()
        ctype = part.get_content_type()
        if part.get_content_maintype() == "text" and disposition != "attachment" and not filename:
            sub = part.get_content_subtype()
            if sub == "plain" and plain is None:
                plain = _text(part)
            elif sub == "html" and html is None:
                html = _text(part)
            elif sub not in ("plain", "html") and f"body-{sub}" not in others:
                others[f"body-{sub}"] = _text(part)
            continue
        n = len(files) + 1
        name = f"attachment-{n}"
        payload = part.get_payload(decode=True) or b""
        files.append((name, filename or f"attachment-{n}", ctype, payload))
        cid = part.get("Content-ID")
        if cid:
            cid_map[str(cid).strip()] = name
    if plain is None:
        plain = html_to_text(html) if html is not None else ""
        stripped_text, stripped_sig = strip_reply(html_to_text(strip_html(html)) if html is not None else "")
    else:
        stripped_text, stripped_sig = strip_reply(plain)
    fields = base + [("body-plain", plain), ("stripped-text", stripped_text),
                     ("stripped-signature", stripped_sig)]
    if html is not None:
        fields += [("body-html", html), ("stripped-html", strip_html(html))]
    fields += sorted(others.items())
    return fields, files, cid_map, headers


def build(raw: bytes, recipient: str, sender: str, url: str, signature: dict,
          extra: list[tuple[str, str]] = ()) -> tuple[bytes, str]:
    """The body and content type of the forward() POST to `url`."""
    sig = [("timestamp", signature["timestamp"]), ("token", signature["token"]),
           ("signature", signature["signature"])]
    if urlsplit(url).path.rstrip("/").endswith("mime"):
        msg = parse(raw)
        base = [("recipient", recipient), ("sender", sender),
                ("from", _header_text(msg.get("From", ""))), ("subject", _header_text(msg.get("Subject", "")))]
        return encode_multipart(base + [("body-mime", transcode(raw).decode("utf-8", "replace"))]
                                + list(extra) + sig, [])
    fields, files, cid_map, headers = parsed(raw, recipient, sender)
    fields += [("attachment-count", str(len(files))),
               ("message-headers", json.dumps([[n, v] for n, v in headers], ensure_ascii=False)),
               ("content-id-map", json.dumps(cid_map, ensure_ascii=False))]
    fields += list(extra)
    taken = {f[0] for f in fields} | {"timestamp", "token", "signature"}
    fields += [(n, v) for n, v in headers if n not in taken]
    return encode_multipart(fields + sig, files)
