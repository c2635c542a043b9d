"""IMAP answers computed from stored messages: FETCH response lines and SEARCH evaluation.

Owns the pure functions imapcmds.py runs (no store, no reactor; in a worker thread when they
parse MIME or cover many messages): rendering one message's FETCH items (flags, dates, sizes,
ENVELOPE/BODYSTRUCTURE via mime.py with a cache by body hash, the MIME parse done only when an
item needs it, BODY[...] sections and partials byte-exact, BINARY[...] decoded) and evaluating a
parsed SEARCH program against a message row and, when the keys need it, its parsed body; the
SORT keys of a message (RFC 5256, with DISPLAYFROM/DISPLAYTO of RFC 5957) and the THREAD trees
(ORDEREDSUBJECT and REFERENCES, RFC 5256).
"""
from __future__ import annotations

import email.header
import email.utils
import re
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
    return any(n in _PARSED for n in items.names) or any(s.part or s.text or s.binary for s in items.sections)


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
        if sec.binary:
            parts.append(_binary(tree(), sec))
            continue
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


def _binary(root, sec) -> bytes:
    """BINARY[...] (a literal8 when the decoded bytes hold NUL) or BINARY.SIZE[...] (RFC 3516)."""
    data = mime.decoded_bytes(root, sec.part)
    if sec.binary == "SIZE":
        return sec.label + b" %d" % len(data)
    if sec.partial:
        data = data[sec.partial[0]:sec.partial[0] + sec.partial[1]]
    return sec.label + (b" ~" if b"\0" in data else b" ") + _lit(data)


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
    if op == "OLDER":  # WITHIN (RFC 5032): seconds before now, by internal date
        return row.internal_date < time.time() - key[1]
    if op == "YOUNGER":
        return row.internal_date >= time.time() - key[1]
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


# -- SORT (RFC 5256; DISPLAYFROM and DISPLAYTO from RFC 5957) ----------------------------------
_BLOB = r"\[[^\[\]]*\][ \t]*"
_LEADER = re.compile(r"^(?:[ \t]+|(?:%s)*(?:re|fwd?)[ \t]*(?:%s)?:)" % (_BLOB, _BLOB), re.I)
_LEADING_BLOB = re.compile(r"^" + _BLOB)
_TRAILER = re.compile(r"(?:[ \t]+|\(fwd\))$", re.I)


def base_subject(subject: str) -> str:
    """RFC 5256 2.1: the subject without Re:/Fwd: leaders, [blob]s, (fwd) trailers and [Fwd: ...]."""
    s = " ".join(subject.split())
    while True:
        while (t := _TRAILER.sub("", s, count=1)) != s:
            s = t
        while True:
            t = _LEADER.sub("", s, count=1)
            if t == s:
                m = _LEADING_BLOB.match(s)
                if m and s[m.end():]:
                    t = s[m.end():]
            if t == s:
                break
            s = t
        if s[:5].lower() == "[fwd:" and s.endswith("]"):
            s = s[5:-1]
            continue
        return s


def _decoded(root, name: str) -> str:
    v = root.headers.get(name)
    if v is None:
        return ""
    raw = mime._raw(v).decode("utf-8", "surrogateescape")
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except Exception:  # noqa: BLE001 - undecodable words are taken as they are
        return raw


def _casemap(s: str) -> bytes:
    """i;ascii-casemap: compare octets with ASCII letters folded."""
    return s.encode("utf-8", "surrogateescape").upper()


def _sort_value(name: str, row, root):
    if name == "ARRIVAL":
        return row.internal_date
    if name == "SIZE":
        return row.size
    if name == "DATE":
        try:
            return email.utils.parsedate_to_datetime(_decoded(root, "date")).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return row.internal_date
    if name == "SUBJECT":
        return _casemap(base_subject(_decoded(root, "subject")))
    header = {"FROM": "from", "TO": "to", "CC": "cc", "DISPLAYFROM": "from", "DISPLAYTO": "to"}[name]
    addrs = email.utils.getaddresses([_decoded(root, header)])
    display, addr = addrs[0] if addrs else ("", "")
    if name.startswith("DISPLAY"):
        return _casemap(display or addr)
    return _casemap(addr.rpartition("@")[0] if "@" in addr else addr)


def sort_chunk(criteria: list[tuple[str, bool]], items, blobs) -> list[tuple[int, int, tuple]]:
    """[(seq, uid, the message's value for each criterion)]."""
    out = []
    for seq, row in items:
        root = mime.parse(blobs.get(row.blob, b"")) if blobs is not None else None
        out.append((seq, row.uid, tuple(_sort_value(name, row, root) for name, _ in criteria)))
    return out


# -- THREAD (RFC 5256) ----------------------------------------------------------------------------
_MSGID = re.compile(r"<([^<>\s]+)>")


class ThreadMsg:
    __slots__ = ("seq", "uid", "date", "subject", "reply", "msgid", "refs")

    def __init__(self, seq: int, row, root):
        raw_subject = " ".join(_decoded(root, "subject").split())
        base = base_subject(raw_subject)
        self.seq, self.uid = seq, row.uid
        self.date = _sort_value("DATE", row, root)
        self.subject = _casemap(base)
        self.reply = base != raw_subject  # a Re:/Fwd: leader or (fwd) trailer came off
        ids = _MSGID.findall(_decoded(root, "message-id"))
        self.msgid = ids[0] if ids else None
        self.refs = _MSGID.findall(_decoded(root, "references"))
        if not self.refs:
            self.refs = _MSGID.findall(_decoded(root, "in-reply-to"))[:1]


def thread_chunk(items, blobs) -> list[ThreadMsg]:
    return [ThreadMsg(seq, row, mime.parse(blobs.get(row.blob, b""))) for seq, row in items]


class _Node:
    __slots__ = ("msg", "parent", "children")

    def __init__(self, msg=None):
        self.msg, self.parent, self.children = msg, None, []

    def key(self):
        m = self.msg if self.msg is not None else (self.children[0].key() if self.children else None)
        return (m.date, m.seq) if isinstance(m, ThreadMsg) else m

    def adopt(self, child: "_Node") -> None:
        if child.parent is not None:
            child.parent.children.remove(child)
        child.parent = self
        self.children.append(child)


def _is_ancestor(a: _Node, b: _Node | None) -> bool:
    """`a` is `b` or above it (a walk up from `b`, skipped when `a` has no children)."""
    if not a.children:
        return a is b
    while b is not None:
        if b is a:
            return True
        b = b.parent
    return False


def _below(roots: list[_Node]) -> list[_Node]:
    """Every node under `roots`, parents before children (no recursion: reply chains are long)."""
    out, stack = [], list(roots)
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children)
    return out


def _sort_tree(roots: list[_Node]) -> list[_Node]:
    """Siblings by sent date (an empty container by its first child's), then sequence number."""
    for n in reversed(_below(roots)):
        n.children.sort(key=_Node.key)
    return sorted(roots, key=_Node.key)


def thread_orderedsubject(msgs: list[ThreadMsg]) -> list[_Node]:
    """Threads of one base subject each: the earliest message the parent of all the others."""
    groups: dict[bytes, list[ThreadMsg]] = {}
    for m in sorted(msgs, key=lambda m: (m.date, m.seq)):
        groups.setdefault(m.subject, []).append(m)
    roots = []
    for group in groups.values():
        root = _Node(group[0])
        for m in group[1:]:
            root.adopt(_Node(m))
        roots.append(root)
    return sorted(roots, key=_Node.key)


def thread_references(msgs: list[ThreadMsg]) -> list[_Node]:
    """RFC 5256 REFERENCES: links from Message-ID/References/In-Reply-To, empty containers
    pruned, then root threads of one base subject gathered together."""
    table: dict = {}
    order: list[_Node] = []

    def node(mid) -> _Node:
        n = table.get(mid)
        if n is None:
            n = table[mid] = _Node()
            order.append(n)
        return n

    for m in sorted(msgs, key=lambda m: m.seq):
        mid = m.msgid
        if mid is None or (mid in table and table[mid].msg is not None):
            mid = ("unique", m.seq)  # no Message-ID, or a duplicate: a container of its own
        this = node(mid)
        this.msg = m
        prev = None
        for ref in m.refs:
            cur = node(ref)
            if prev is not None and cur.parent is None and not _is_ancestor(cur, prev):
                prev.adopt(cur)
            prev = cur
        if this.parent is not None:
            this.parent.children.remove(this)
            this.parent = None
        if prev is not None and not _is_ancestor(this, prev):
            prev.adopt(this)

    # empty containers give way to their children, except at the top with several children
    tops = [n for n in order if n.parent is None]
    for n in reversed(_below(tops)):
        kids = []
        for c in n.children:
            kids += [c] if c.msg is not None else c.children
        n.children = kids
        for c in kids:
            c.parent = n
    roots = []
    for n in tops:
        roots += [n] if n.msg is not None or len(n.children) > 1 else n.children
    for r in roots:
        r.parent = None
    roots = _sort_tree(roots)

    def first(n: _Node) -> ThreadMsg:
        return n.msg if n.msg is not None else n.children[0].msg

    by_subject: dict[bytes, _Node] = {}
    for r in roots:
        subj = first(r).subject
        if not subj:
            continue
        old = by_subject.get(subj)
        if old is None or (r.msg is None and old.msg is not None) or \
                (old.msg is not None and r.msg is not None and old.msg.reply and not r.msg.reply):
            by_subject[subj] = r
    merged: list[_Node] = []
    for r in roots:
        subj = first(r).subject
        keep = by_subject.get(subj) if subj else None
        if keep is None or keep is r:
            merged.append(r)
            continue
        if keep.msg is None and r.msg is None:
            for c in list(r.children):
                keep.adopt(c)
        elif keep.msg is None:
            keep.adopt(r)
        elif r.msg is not None and r.msg.reply and not keep.msg.reply:
            keep.adopt(r)
        else:  # both replies or neither: siblings under a new empty container
            dummy = _Node()
            if keep in merged:
                merged[merged.index(keep)] = dummy
            else:
                roots[roots.index(keep)] = dummy
            dummy.adopt(keep)
            dummy.adopt(r)
            by_subject[subj] = dummy
    return _sort_tree(merged)


def render_threads(roots: list[_Node], uid: bool) -> bytes:
    """* THREAD (2)(3 6 (4 23)(44 7 96)) ..."""
    def members(n: _Node) -> bytes:
        parts = []
        while True:
            if n.msg is not None:
                parts.append(b"%d" % (n.msg.uid if uid else n.msg.seq))
            if len(n.children) == 1:
                n = n.children[0]
                continue
            if n.children:
                parts.append(b"".join(b"(" + members(c) + b")" for c in n.children))
            return b" ".join(parts)

    return b"* THREAD" + (b" " if roots else b"") + b"".join(b"(" + members(r) + b")" for r in roots)
