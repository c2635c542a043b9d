"""IMAP syntax: the command tokenizer, modified UTF-7, sequence sets, FETCH items, SEARCH keys.

Owns turning a received command (lines and the literals between them, already size-checked
by imap.py) into tokens, iteratively (no recursion, nesting capped) so hostile input costs
bounded time and memory; and the strict modified UTF-7 codec for folder names (invalid
encodings are refused, never "repaired").  imap.py calls these and decides meaning.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field


class ParseError(Exception):
    """Bad syntax: answered with a tagged BAD."""


class Atom(bytes):
    pass


class Quoted(bytes):
    pass


class Literal(bytes):
    pass


# -- modified UTF-7 (RFC 3501 5.1.3) -------------------------------------------------------
def mutf7_decode(raw: bytes) -> str:
    """Strict: non-canonical or malformed encodings raise ParseError."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("mailbox name must be 7-bit (modified UTF-7)") from None
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "&":
            if not 0x20 <= ord(c) <= 0x7e:
                raise ParseError("control character in mailbox name")
            out.append(c)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ParseError("unterminated modified UTF-7 in mailbox name")
        chunk = text[i + 1:end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        if not re.fullmatch(r"[A-Za-z0-9+,]+", chunk):
            raise ParseError("invalid modified UTF-7 in mailbox name")
        b64 = chunk.replace(",", "/")
        try:
            data = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
            decoded = data.decode("utf-16-be")
        except (ValueError, UnicodeDecodeError):
            raise ParseError("invalid modified UTF-7 in mailbox name") from None
        if any(0x20 <= ord(ch) <= 0x7e for ch in decoded):
            raise ParseError("non-canonical modified UTF-7 in mailbox name")
        out.append(decoded)
    result = "".join(out)
    if mutf7_encode(result) != raw:
        raise ParseError("non-canonical modified UTF-7 in mailbox name")
    return result


def mutf7_encode(name: str) -> bytes:
    out, run = [], []

    def flush():
        if run:
            b = base64.b64encode("".join(run).encode("utf-16-be")).decode().rstrip("=")
            out.append("&" + b.replace("/", ",") + "-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7e:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out).encode("ascii")


# -- tokens --------------------------------------------------------------------------------
_ATOM_END = set(b' ()"{')
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"')


def tokenize(segments: list[bytes], literals: list[bytes], max_depth: int) -> list:
    """Tokens of a command.  `segments` are the line parts; after each segment but the last
    comes the literal announced at its end (already removed from the segment)."""
    root: list = []
    stack = [root]
    for n, seg in enumerate(segments):
        i, size = 0, len(seg)
        while i < size:
            c = seg[i]
            if c == 0x20:
                i += 1
            elif c == 0x28:  # (
                if len(stack) > max_depth:
                    raise ParseError("too deeply nested")
                new: list = []
                stack[-1].append(new)
                stack.append(new)
                i += 1
            elif c == 0x29:  # )
                if len(stack) == 1:
                    raise ParseError("unbalanced parenthesis")
                stack.pop()
                i += 1
            elif c == 0x22:  # "
                m = _QUOTED.match(seg, i)
                if not m:
                    raise ParseError("bad quoted string")
                stack[-1].append(Quoted(re.sub(rb'\\(["\\])', rb"\1", m.group(1))))
                i = m.end()
            elif c == 0x7b:  # { literal marker belongs at the end of a segment only
                raise ParseError("misplaced literal")
            elif c < 0x20 or c == 0x7f:
                raise ParseError("control character in command")
            else:
                j = i
                while j < size and seg[j] not in _ATOM_END:
                    if seg[j] == 0x5b:  # [ ... ] may hold spaces and parentheses
                        k = seg.find(b"]", j)
                        if k < 0:
                            raise ParseError("unbalanced [")
                        j = k + 1
                    elif seg[j] < 0x20 or seg[j] > 0x7e:
                        raise ParseError("invalid character in atom")
                    else:
                        j += 1
                stack[-1].append(Atom(seg[i:j]))
                i = j
        if n < len(literals):
            stack[-1].append(Literal(literals[n]) if isinstance(literals[n], bytes) else literals[n])
    if len(stack) != 1:
        raise ParseError("unbalanced parenthesis")
    return root


def astring(tok) -> bytes:
    if isinstance(tok, (Atom, Quoted, Literal)):
        return bytes(tok)
    if hasattr(tok, "read"):
        raise ParseError("string expected")
    raise ParseError("string expected")


def number(tok, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if not isinstance(tok, Atom) or not tok.isdigit() or len(tok) > 20:
        raise ParseError("number expected")
    n = int(tok)
    if not lo <= n <= hi:
        raise ParseError("number out of range")
    return n


# -- sequence sets ---------------------------------------------------------------------------
MAX_UID = 2**32 - 1


@dataclass
class SeqSet:
    ranges: list  # (lo, hi), None meaning "*"
    saved: bool = False  # "$": the messages the last SEARCH ... RETURN (SAVE) found (RFC 5182)

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        out = []
        for lo, hi in self.ranges:
            lo = largest if lo is None else lo
            hi = largest if hi is None else hi
            if lo > hi:
                lo, hi = hi, lo
            out.append((lo, hi))
        return out

    def contains(self, n: int, largest: int) -> bool:
        return any(lo <= n <= hi for lo, hi in self.resolve(largest))


def seqset(tok) -> SeqSet:
    if not isinstance(tok, Atom) or not tok or len(tok) > 100_000:
        raise ParseError("sequence set expected")
    if tok == b"$":
        return SeqSet([], saved=True)
    ranges = []
    for part in bytes(tok).split(b","):
        if part.count(b":") > 1:
            raise ParseError("bad sequence set")
        ends = part.split(b":")
        vals = []
        for e in ends:
            if e == b"*":
                vals.append(None)
            elif e.isdigit() and len(e) <= 10 and 0 < int(e) <= MAX_UID:
                vals.append(int(e))
            else:
                raise ParseError("bad sequence set")
        ranges.append((vals[0], vals[-1]))
    return SeqSet(ranges)


# -- FETCH items ------------------------------------------------------------------------------
@dataclass
class Section:
    part: tuple = ()
    text: str = ""  # "" | HEADER | TEXT | MIME | HEADER.FIELDS | HEADER.FIELDS.NOT
    fields: tuple = ()
    partial: tuple | None = None  # (start, length)
    peek: bool = False
    label: bytes = b""  # how to name it in the response
    binary: str = ""  # BINARY or BINARY.SIZE (RFC 3516): the part decoded, or its decoded size


@dataclass
class FetchItems:
    names: list = field(default_factory=list)  # FLAGS UID INTERNALDATE RFC822.SIZE ENVELOPE ...
    sections: list = field(default_factory=list)

    @property
    def needs_body(self) -> bool:
        return bool(self.sections) or any(n in ("ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822",
                                                "RFC822.HEADER", "RFC822.TEXT") for n in self.names)


_MACROS = {b"ALL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"],
           b"FAST": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"],
           b"FULL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"]}
_SIMPLE = {b"FLAGS", b"UID", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODYSTRUCTURE",
           b"BODY", b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT", b"MODSEQ"}
_SECTION = re.compile(rb"^(BODY|BODY\.PEEK)\[([^\]]*)\](?:<(\d{1,10})\.(\d{1,10})>)?$", re.I)
_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")
_BINARY = re.compile(rb"^(BINARY|BINARY\.PEEK|BINARY\.SIZE)\[((?:[1-9]\d{0,4}(?:\.[1-9]\d{0,4}){0,63})?)\]"
                     rb"(?:<(\d{1,10})\.(\d{1,10})>)?$", re.I)


def fetch_items(tok) -> FetchItems:
    items = FetchItems()
    atoms = tok if isinstance(tok, list) else [tok]
    if isinstance(tok, Atom) and tok.upper() in _MACROS:
        atoms = [Atom(a) for a in _MACROS[tok.upper()]]
    if not atoms:
        raise ParseError("empty fetch list")
    for a in atoms:
        if not isinstance(a, Atom):
            raise ParseError("bad fetch item")
        up = a.upper()
        if up in _SIMPLE:
            if up not in items.names:
                items.names.append(up.decode())
            continue
        m = _SECTION.match(a)
        if m:
            items.sections.append(_section(m))
            continue
        m = _BINARY.match(a)
        if not m:
            raise ParseError("unknown fetch item")
        items.sections.append(_binary_section(m))
    return items


def _binary_section(m) -> Section:
    kind = m.group(1).upper()
    if kind == b"BINARY.SIZE" and m.group(3) is not None:
        raise ParseError("BINARY.SIZE takes no partial range")
    nums = tuple(int(n) for n in m.group(2).split(b".")) if m.group(2) else ()
    sec = Section(part=nums, peek=kind != b"BINARY", binary="SIZE" if kind == b"BINARY.SIZE" else "BINARY")
    sec.label = (b"BINARY.SIZE[" if sec.binary == "SIZE" else b"BINARY[") + m.group(2) + b"]"
    if m.group(3) is not None:
        sec.partial = (int(m.group(3)), int(m.group(4)))
        sec.label += b"<%d>" % sec.partial[0]
    return sec


def _section(m) -> Section:
    peek = m.group(1).upper() == b"BODY.PEEK"
    spec = m.group(2)
    sec = Section(peek=peek)
    if m.group(3) is not None:
        sec.partial = (int(m.group(3)), int(m.group(4)))
    head, _, rest = spec.partition(b" ")
    parts = head.split(b".") if head else []
    nums = []
    while parts and parts[0].isdigit():
        n = int(parts.pop(0)) if len(parts[0]) <= 5 else 0
        if n < 1:
            raise ParseError("bad section part")
        nums.append(n)
    if len(nums) > 64:
        raise ParseError("section too deep")
    sec.part = tuple(nums)
    text = b".".join(parts).upper()
    if text not in (b"", b"HEADER", b"TEXT", b"MIME", b"HEADER.FIELDS", b"HEADER.FIELDS.NOT"):
        raise ParseError("bad section")
    if text == b"MIME" and not nums:
        raise ParseError("MIME needs a part number")
    sec.text = text.decode()
    if text.startswith(b"HEADER.FIELDS"):
        rest = rest.strip()
        if not (rest.startswith(b"(") and rest.endswith(b")")):
            raise ParseError("header list expected")
        names = rest[1:-1].split()
        if not names or len(names) > 200:
            raise ParseError("header list expected")
        cleaned = []
        for n in names:
            n = n.strip(b'"')
            if not _FIELD.match(n):
                raise ParseError("bad header name")
            cleaned.append(n.decode().lower())
        sec.fields = tuple(cleaned)
        label_fields = b" (" + b" ".join(x.encode().upper() for x in cleaned) + b")"
    else:
        if rest.strip():
            raise ParseError("bad section")
        label_fields = b""
    label = b".".join([str(n).encode() for n in nums] + ([text] if text else []))
    sec.label = b"BODY[" + label + label_fields + b"]"
    if sec.partial:
        sec.label += b"<%d>" % sec.partial[0]
    return sec


# -- SEARCH keys ------------------------------------------------------------------------------
_NOARG = {b"ALL", b"ANSWERED", b"DELETED", b"DRAFT", b"FLAGGED", b"NEW", b"OLD", b"RECENT",
          b"SEEN", b"UNANSWERED", b"UNDELETED", b"UNDRAFT", b"UNFLAGGED", b"UNSEEN"}
_STRARG = {b"BCC", b"BODY", b"CC", b"FROM", b"SUBJECT", b"TEXT", b"TO", b"KEYWORD", b"UNKEYWORD"}
_DATEARG = {b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE"}
_NUMARG = {b"LARGER", b"SMALLER", b"MODSEQ", b"OLDER", b"YOUNGER"}  # OLDER, YOUNGER: WITHIN (RFC 5032)
MAX_SEARCH_KEYS = 1000
MAX_SEARCH_DEPTH = 60


def search_keys(tokens: list) -> tuple:
    """A search program: ("AND", [keys]) built iteratively from the token list."""
    count = 0

    def one(toks, i, depth=0):
        nonlocal count
        count += 1
        if count > MAX_SEARCH_KEYS or depth > MAX_SEARCH_DEPTH:
            raise ParseError("search too complex")
        if i >= len(toks):
            raise ParseError("search key expected")
        t = toks[i]
        if isinstance(t, list):
            return ("AND", many(t, depth + 1)), i + 1
        if not isinstance(t, Atom):
            raise ParseError("search key expected")
        up = t.upper()
        if up in _NOARG:
            return (up.decode(),), i + 1
        if up in _STRARG:
            return (up.decode(), astring(_arg(toks, i + 1))), i + 2
        if up in _DATEARG:
            return (up.decode(), _date(_arg(toks, i + 1))), i + 2
        if up in _NUMARG:
            return (up.decode(), number(_arg(toks, i + 1))), i + 2
        if up == b"HEADER":
            return ("HEADER", astring(_arg(toks, i + 1)), astring(_arg(toks, i + 2))), i + 3
        if up == b"UID":
            return ("UID", seqset(_arg(toks, i + 1))), i + 2
        if up == b"NOT":
            k, j = one(toks, i + 1, depth + 1)
            return ("NOT", k), j
        if up == b"OR":
            a, j = one(toks, i + 1, depth + 1)
            b, j = one(toks, j, depth + 1)
            return ("OR", a, b), j
        return ("SEQ", seqset(t)), i + 1

    def many(toks, depth=0):
        keys, i = [], 0
        while i < len(toks):
            k, i = one(toks, i, depth)
            keys.append(k)
        if not keys:
            raise ParseError("empty search")
        return keys

    return ("AND", many(tokens))


def _arg(toks, i):
    if i >= len(toks):
        raise ParseError("search argument missing")
    return toks[i]


_MONTHS = {m: i for i, m in enumerate(
    [b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT", b"NOV", b"DEC"], 1)}


def _date(tok) -> tuple[int, int, int]:
    m = re.fullmatch(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})", astring(tok))
    if not m or m.group(2).upper() not in _MONTHS:
        raise ParseError("bad date")
    return int(m.group(3)), _MONTHS[m.group(2).upper()], int(m.group(1))
