"""MIME structure of stored messages, by byte offsets, for IMAP FETCH.

Owns: splitting a message's exact bytes into a part tree (header block, body, children for
multipart and message/rfc822) without re-encoding anything, so BODY[1.2], BODY[HEADER] and
partial fetches return the stored octets; a part with its transfer encoding undone (BINARY,
RFC 3516); BODYSTRUCTURE, BODY and ENVELOPE values; and the
IMAP encoding of those values (NIL, numbers, quoted strings, literals for 8-bit or CR/LF).
Caps: nesting depth 64 and 1000 parts per message; past a cap a part is treated as opaque.
Used by imap.py (in a worker thread when parsing many messages).
"""
from __future__ import annotations

import binascii
import email.header
import email.utils
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email import policy

MAX_DEPTH = 64
MAX_PARTS = 1000
_HDR_END = re.compile(rb"\r?\n\r?\n")
_parser = BytesHeaderParser(policy=policy.compat32)


class Part:
    __slots__ = ("raw", "start", "body_start", "end", "children", "msg", "_headers", "encapsulated")

    def __init__(self, raw: bytes, start: int, end: int):
        self.raw, self.start, self.end = raw, start, end
        self.children: list[Part] = []
        self.encapsulated: Part | None = None  # message/rfc822 body
        if raw.startswith(b"\r\n", start) or raw.startswith(b"\n", start):
            self.body_start = start + (2 if raw.startswith(b"\r\n", start) else 1)
        else:
            m = _HDR_END.search(raw, start, end)
            self.body_start = m.end() if m else end
        self._headers: Message | None = None

    # -- bytes -------------------------------------------------------------------------------
    @property
    def header_bytes(self) -> bytes:
        return self.raw[self.start:self.body_start]

    @property
    def body_bytes(self) -> bytes:
        return self.raw[self.body_start:self.end]

    @property
    def size(self) -> int:
        return self.end - self.body_start

    @property
    def headers(self) -> Message:
        if self._headers is None:
            self._headers = _parser.parsebytes(self.header_bytes)
        return self._headers

    def content_type(self) -> tuple[str, str]:
        ctype = self.headers.get_content_type()
        main, _, sub = ctype.partition("/")
        return main, sub

    def header(self, name: str) -> bytes | None:
        v = self.headers.get(name)
        if v is None:
            return None
        return _unfold(_raw(v))

    def field_lines(self, names: tuple, negate: bool) -> bytes:
        """The header lines (with folding, byte-exact) whose names are (not) in `names`."""
        out = []
        current: list[bytes] = []
        keep = False
        for line in self.header_bytes.splitlines(keepends=True):
            if line in (b"\r\n", b"\n"):
                break
            if line[:1] in (b" ", b"\t") and current:
                current.append(line)
                continue
            if current and keep:
                out.extend(current)
            name = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
            keep = (name in names) != negate
            current = [line]
        if current and keep:
            out.extend(current)
        return b"".join(out) + b"\r\n"


def _raw(v) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape")
    # a field with 8-bit octets (raw UTF-8, RFC 6532) comes wrapped in a Header: its octets as stored
    return b"".join(s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
                    for s, _ in email.header.decode_header(v))


def _unfold(b: bytes) -> bytes:
    return re.sub(rb"\r?\n(?=[ \t])", b"", b).strip()


def parse(raw: bytes, start: int = 0, end: int | None = None, depth: int = 0, counter=None) -> Part:
    counter = counter if counter is not None else [0]
    end = len(raw) if end is None else end
    part = Part(raw, start, end)
    counter[0] += 1
    if depth >= MAX_DEPTH or counter[0] > MAX_PARTS:
        return part
    main, sub = part.content_type()
    if main == "multipart":
        boundary = part.headers.get_param("boundary")
        if isinstance(boundary, tuple):
            boundary = email.utils.collapse_rfc2231_value(boundary)
        if boundary:
            for s, e in _split_multipart(raw, part.body_start, end, _raw(boundary)):
                if counter[0] > MAX_PARTS:
                    break
                part.children.append(parse(raw, s, e, depth + 1, counter))
    elif main == "message" and sub == "rfc822":
        part.encapsulated = parse(raw, part.body_start, end, depth + 1, counter)
    return part


def _split_multipart(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    delim = b"--" + boundary
    pat = re.compile(rb"(?:^|(?<=\n))" + re.escape(delim) + rb"(--)?[ \t]*(?:\r?\n|$)", re.M)
    spans, prev_body = [], None
    for m in pat.finditer(raw, start, end):
        if prev_body is not None:
            # The CRLF before a delimiter belongs to the delimiter.
            stop = m.start()
            if raw[stop - 2:stop] == b"\r\n":
                stop -= 2
            elif raw[stop - 1:stop] == b"\n":
                stop -= 1
            spans.append((prev_body, max(prev_body, stop)))
        if m.group(1):
            prev_body = None
            break
        prev_body = m.end()
    if prev_body is not None:  # no closing delimiter: the last part runs to the end
        spans.append((prev_body, end))
    return spans


# -- sections ---------------------------------------------------------------------------------
class NoSuchPart(Exception):
    pass


def find_part(root: Part, nums: tuple) -> Part:
    part = root
    for n in nums:
        if part.encapsulated is not None:
            part = part.encapsulated
        if part.children:
            if n > len(part.children):
                raise NoSuchPart()
            part = part.children[n - 1]
        elif n == 1:
            continue  # a single-part body is its own part 1
        else:
            raise NoSuchPart()
    return part


def section_bytes(root: Part, part_nums: tuple, text: str, fields: tuple) -> bytes:
    try:
        part = find_part(root, part_nums)
    except NoSuchPart:
        return b""
    if text == "MIME":
        return part.header_bytes if part_nums else b""
    if text in ("HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        msg = part if not part_nums else part.encapsulated
        if msg is None:
            return b""
        if text == "HEADER":
            return msg.header_bytes
        if text == "TEXT":
            return msg.body_bytes
        return msg.field_lines(fields, text.endswith(".NOT"))
    if not part_nums:
        return root.raw[root.start:root.end]
    return part.body_bytes


class UnknownCTE(Exception):
    """BINARY: a Content-Transfer-Encoding we cannot undo (answered NO [UNKNOWN-CTE])."""


def decoded_bytes(root: Part, part_nums: tuple) -> bytes:
    """BINARY[part]: the part's body with its Content-Transfer-Encoding undone; BINARY[] is the
    whole message as stored."""
    if not part_nums:
        return root.raw[root.start:root.end]
    try:
        part = find_part(root, part_nums)
    except NoSuchPart:
        return b""
    body = part.body_bytes
    cte = (part.header("content-transfer-encoding") or b"7bit").strip().lower()
    if cte in (b"7bit", b"8bit", b"binary"):
        return body
    try:
        if cte == b"base64":
            return binascii.a2b_base64(body)
        if cte == b"quoted-printable":
            return binascii.a2b_qp(body)
    except binascii.Error:
        raise UnknownCTE("undecodable base64") from None
    raise UnknownCTE(cte.decode("ascii", "replace")[:40])


# -- BODYSTRUCTURE and ENVELOPE ---------------------------------------------------------------
def _params(part: Part, header: str = "content-type") -> list | None:
    params = part.headers.get_params(header=header) or []
    out = []
    for k, v in params[1:]:
        if isinstance(v, tuple):
            v = email.utils.collapse_rfc2231_value(v)
        out += [_raw(k).upper(), _raw(v)]
    return out or None


def _disposition(part: Part):
    v = part.headers.get("content-disposition")
    if v is None:
        return None
    kind = _raw(v).split(b";", 1)[0].strip().upper()
    return [kind, _params(part, "content-disposition")]


def _lines(b: bytes) -> int:
    return b.count(b"\n") + (1 if b and not b.endswith(b"\n") else 0)


def bodystructure(part: Part, extended: bool, depth: int = 0) -> list:
    main, sub = part.content_type()
    if part.children and depth < MAX_DEPTH:
        out: list = [bodystructure(c, extended, depth + 1) for c in part.children]
        out.append(sub.upper().encode())
        if extended:
            out += [_params(part), _disposition(part), part.header("content-language"),
                    part.header("content-location")]
        return out
    if main == "multipart":  # no parts found: describe as opaque text
        main, sub = "text", "plain"
    params = _params(part)
    if params is None and main == "text":
        params = [b"CHARSET", b"US-ASCII"]
    out = [main.upper().encode(), sub.upper().encode(), params, part.header("content-id"),
           part.header("content-description"),
           (part.header("content-transfer-encoding") or b"7BIT").upper(), part.size]
    if part.encapsulated is not None and depth < MAX_DEPTH:
        enc = part.encapsulated
        out += [envelope(enc), bodystructure(enc, extended, depth + 1), _lines(part.body_bytes)]
    elif main == "text":
        out.append(_lines(part.body_bytes))
    if extended:
        out += [part.header("content-md5"), _disposition(part), part.header("content-language"),
                part.header("content-location")]
    return out


def _split_groups(text: str) -> list[tuple[str | None, str]]:
    """[(group name or None, address list text)], splitting RFC 5322 groups (`name: a, b;`)
    at top level (outside quotes, comments and angle brackets)."""
    out: list[tuple[str | None, str]] = []
    buf: list[str] = []
    group: str | None = None
    depth_comment = 0
    in_quote = in_angle = escaped = False
    last_comma = 0
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and (in_quote or depth_comment):
            escaped = True
        elif in_quote:
            in_quote = ch != '"'
        elif ch == '"' and not depth_comment:
            in_quote = True
        elif ch == "(":
            depth_comment += 1
        elif ch == ")" and depth_comment:
            depth_comment -= 1
        elif depth_comment:
            pass
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle and group is None:
            last_comma = len(buf)
        elif ch == ":" and not in_angle and group is None:
            out.append((None, "".join(buf[:last_comma])))
            group, buf = "".join(buf[last_comma + 1 if last_comma else 0:]).strip(), []
            last_comma = 0
            continue
        elif ch == ";" and group is not None:
            out.append((group, "".join(buf)))
            group, buf = None, []
            continue
        buf.append(ch)
    out.append((group, "".join(buf)))
    return out


def _enc(s: str):
    return s.encode("utf-8", "surrogateescape") if s else None


def _mailboxes(text: str) -> list:
    out = []
    for disp, addr in email.utils.getaddresses([text]):
        if not addr and not disp:
            continue
        local, _, host = addr.rpartition("@") if "@" in addr else (addr, "", "")
        out.append([_enc(disp), None, _enc(local) or b"", _enc(host)])
    return out


def _addresses(part: Part, name: str):
    values = part.headers.get_all(name)
    if not values:
        return None
    text = ", ".join(_raw(v).decode("utf-8", "surrogateescape") for v in values)
    out = []
    for group, members in _split_groups(text):
        if group is None:
            out += _mailboxes(members)
        else:  # RFC 3501: (NIL NIL "group" NIL) members (NIL NIL NIL NIL)
            out.append([None, None, _enc(group.strip()) or b"", None])
            out += _mailboxes(members)
            out.append([None, None, None, None])
    return out or None


def envelope(part: Part) -> list:
    return [part.header("date"), part.header("subject"), _addresses(part, "from"),
            _addresses(part, "sender") or _addresses(part, "from"),
            _addresses(part, "reply-to") or _addresses(part, "from"),
            _addresses(part, "to"), _addresses(part, "cc"), _addresses(part, "bcc"),
            part.header("in-reply-to"), part.header("message-id")]


# -- encoding ---------------------------------------------------------------------------------
_SAFE_QUOTED = re.compile(rb'^[\x20-\x7e]*$')


def encode(value) -> bytes:
    """IMAP wire form of nested lists, bytes, ints and None (iterative)."""
    out: list[bytes] = []
    stack = [(value, True)]
    while stack:
        v, first = stack.pop()
        if isinstance(v, _Close):
            out.append(b")")
            continue
        if not first:
            out.append(b" ")
        if v is None:
            out.append(b"NIL")
        elif isinstance(v, bool):
            out.append(b"NIL")
        elif isinstance(v, int):
            out.append(str(v).encode())
        elif isinstance(v, (bytes, bytearray)):
            out.append(string(bytes(v)))
        elif isinstance(v, str):
            out.append(string(v.encode("utf-8")))
        elif isinstance(v, (list, tuple)):
            out.append(b"(")
            stack.append((_CLOSE, True))
            for i, item in reversed(list(enumerate(v))):
                stack.append((item, i == 0))
        else:
            out.append(string(str(v).encode()))
    return b"".join(out)


class _Close:
    pass


_CLOSE = _Close()


def string(b: bytes) -> bytes:
    if _SAFE_QUOTED.match(b) and len(b) < 1000:
        return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(b) + b
