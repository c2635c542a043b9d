"""IMAP answers computed from stored messages: FETCH response lines and SEARCH evaluation.

Owns the pure functions imapcmds.py runs (no store, no reactor; in a worker thread when they
parse MIME or cover many messages): rendering one message's FETCH items (flags, dates, sizes,
ENVELOPE/BODYSTRUCTURE via mime.py with a cache by body hash, the MIME parse done only when an
item needs it, BODY[...] sections and partials byte-exact) and evaluating a parsed SEARCH
program against a message row and, when the keys need it, its parsed body.
"""
from __future__ import annotations

import email.header
import email.utils
import time
from collections import OrderedDict

from . import mime


def _flags_bytes(flags) -> bytes:
    return b"(" + " ".join(flags).encode("ascii", "replace") + b")"


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _idate(ts: float) -> bytes:
    t = time.gmtime(ts)  # month names spelled out: strftime's %b follows the locale
    return ("%02d-%s-%04d %02d:%02d:%02d +0000" % (t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
                                                  t.tm_hour, t.tm_min, t.tm_sec)).encode()


# -- rendering (pure: runs in a worker thread) ------------------------------------------------
# Structure answers per body (blobs are immutable, so by SHA-256): repeat FETCHes of ENVELOPE
# and BODYSTRUCTURE need neither the body nor a MIME parse.
_STRUCT_CACHE: "OrderedDict[tuple[str, str], bytes]" = OrderedDict()
_STRUCT_MAX = 20_000
_STRUCT_ITEMS = {"ENVELOPE", "BODYSTRUCTURE", "BODY"}


def _structure(row, name: str, build) -> bytes:
    key = (row.blob, name)
    hit = _STRUCT_CACHE.get(key)
    if hit is None:
        hit = mime.encode(build())
        _STRUCT_CACHE[key] = hit
        if len(_STRUCT_CACHE) > _STRUCT_MAX:
            _STRUCT_CACHE.popitem(last=False)
    return hit


def structure_cached(items, rows) -> bool:
    """True when this FETCH needs a body only for cached structure items."""
    if items.sections or any(n in ("RFC822", "RFC822.HEADER", "RFC822.TEXT") for n in items.names):
        return False
    return all((r.blob, n) in _STRUCT_CACHE for r in rows for n in items.names if n in _STRUCT_ITEMS)


_PARSED = {"ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822.HEADER", "RFC822.TEXT"}


def needs_parse(items) -> bool:
    """Whether rendering these items may parse MIME (the whole message, BODY[] or RFC822, and
    its partials are plain slices of the stored bytes)."""
    return any(n in _PARSED for n in items.names) or any(s.part or s.text for s in items.sections)


def render_fetch(seq: int, row, data: bytes | None, items, uid_cmd: bool, with_modseq: bool) -> bytes:
    parts = []
    root = None

    def tree():  # parsed on first use only
        nonlocal root
        if root is None:
            root = mime.parse(data)
        return root

    names = list(items.names)
    if uid_cmd and "UID" not in names:
        names.insert(0, "UID")
    for n in names:
        if n == "UID":
            parts.append(b"UID %d" % row.uid)
        elif n == "FLAGS":
            parts.append(b"FLAGS " + _flags_bytes(row.flags))
        elif n == "INTERNALDATE":
            parts.append(b'INTERNALDATE "' + _idate(row.internal_date) + b'"')
        elif n == "RFC822.SIZE":
            parts.append(b"RFC822.SIZE %d" % row.size)
        elif n == "MODSEQ":
            pass
        elif n == "ENVELOPE":
            parts.append(b"ENVELOPE " + _structure(row, n, lambda: mime.envelope(tree())))
        elif n == "BODYSTRUCTURE":
            parts.append(b"BODYSTRUCTURE " + _structure(row, n, lambda: mime.bodystructure(tree(), True)))
        elif n == "BODY":
            parts.append(b"BODY " + _structure(row, n, lambda: mime.bodystructure(tree(), False)))
        elif n == "RFC822":
            parts.append(b"RFC822 " + _lit(data))
        elif n == "RFC822.HEADER":
            parts.append(b"RFC822.HEADER " + _lit(tree().header_bytes))
        elif n == "RFC822.TEXT":
            parts.append(b"RFC822.TEXT " + _lit(tree().body_bytes))
    for sec in items.sections:
        body = data if not (sec.part or sec.text) else mime.section_bytes(tree(), sec.part, sec.text, sec.fields)
        if sec.partial:
            start, length = sec.partial
            body = body[start:start + length]
        parts.append(sec.label + b" " + _lit(body))
    if with_modseq or "MODSEQ" in names:
        parts.append(b"MODSEQ (%d)" % row.modseq)
    return b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n"


def _lit(b: bytes) -> bytes:
    return b"{%d}\r\n" % len(b) + b


def _contains(hay: bytes, needle: bytes) -> bool:
    return needle.lower() in hay.lower()


def _header_text(part, name: str) -> bytes:
    vals = part.headers.get_all(name) or []
    out = []
    for v in vals:
        raw = mime._raw(v)
        out.append(raw)
        try:
            decoded = str(email.header.make_header(email.header.decode_header(raw.decode("utf-8", "surrogateescape"))))
            out.append(decoded.encode("utf-8", "surrogateescape"))
        except Exception:  # noqa: BLE001 - undecodable words are matched raw only
            pass
    return b"\n".join(out)


def _day(ts: float) -> tuple:
    return time.gmtime(ts)[:3]


_FLAG_KEYS = {"ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True), "DRAFT": ("\\Draft", True),
              "FLAGGED": ("\\Flagged", True), "SEEN": ("\\Seen", True),
              "UNANSWERED": ("\\Answered", False), "UNDELETED": ("\\Deleted", False),
              "UNDRAFT": ("\\Draft", False), "UNFLAGGED": ("\\Flagged", False), "UNSEEN": ("\\Seen", False)}
_CONSTANT_KEYS = {"ALL": True, "OLD": True, "NEW": False, "RECENT": False}


def evaluate(key, seq: int, row, root, max_seq: int, max_uid: int) -> bool:
    op = key[0]
    flags = row.flags
    if op == "AND":
        return all(evaluate(k, seq, row, root, max_seq, max_uid) for k in key[1])
    if op == "OR":
        return (evaluate(key[1], seq, row, root, max_seq, max_uid)
                or evaluate(key[2], seq, row, root, max_seq, max_uid))
    if op == "NOT":
        return not evaluate(key[1], seq, row, root, max_seq, max_uid)
    flag_key = _FLAG_KEYS.get(op)
    if flag_key is not None:
        flag, present = flag_key
        return (flag in flags) == present
    if op in _CONSTANT_KEYS:
        return _CONSTANT_KEYS[op]
    if op == "SEQ":
        return key[1].contains(seq, max_seq)
    if op == "UID":
        return key[1].contains(row.uid, max_uid)
    if op == "KEYWORD":
        return key[1].decode("ascii", "replace") in flags
    if op == "UNKEYWORD":
        return key[1].decode("ascii", "replace") not in flags
    if op == "LARGER":
        return row.size > key[1]
    if op == "SMALLER":
        return row.size < key[1]
    if op == "MODSEQ":
        return row.modseq >= key[1]
    if op in ("BEFORE", "ON", "SINCE"):
        d = _day(row.internal_date)
        return {"BEFORE": d < key[1], "ON": d == key[1], "SINCE": d >= key[1]}[op]
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        try:
            sent = email.utils.parsedate_to_datetime(root.header("date").decode("ascii", "replace"))
            d = (sent.year, sent.month, sent.day)
        except (TypeError, ValueError, AttributeError, IndexError):
            return False
        return {"SENTBEFORE": d < key[1], "SENTON": d == key[1], "SENTSINCE": d >= key[1]}[op]
    if op in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        return _contains(_header_text(root, op.lower()), key[1])
    if op == "HEADER":
        name = key[1].decode("ascii", "replace").lower()
        if not key[2]:
            return root.headers.get(name) is not None
        return _contains(_header_text(root, name), key[2])
    if op == "BODY":
        return _contains(root.body_bytes, key[1])
    if op == "TEXT":
        return _contains(root.raw, key[1])
    return False


_CONTENT_KEYS = {"FROM", "TO", "CC", "BCC", "SUBJECT", "HEADER", "BODY", "TEXT", "SENTBEFORE",
                 "SENTON", "SENTSINCE"}


def _needs_content(key) -> bool:
    stack = [key]
    while stack:
        k = stack.pop()
        if k[0] in _CONTENT_KEYS:
            return True
        if k[0] == "AND":
            stack.extend(k[1])
        elif k[0] in ("OR", "NOT"):
            stack.extend(x for x in k[1:])
    return False


def search_chunk(key, items, blobs, max_seq, max_uid) -> list[tuple[int, int, int]]:
    out = []
    for seq, row in items:
        root = mime.parse(blobs[row.blob]) if blobs is not None else None
        if evaluate(key, seq, row, root, max_seq, max_uid):
            out.append((seq, row.uid, row.modseq))
    return out
