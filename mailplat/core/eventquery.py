"""Mailgun's filter expressions for the events API, parsed and matched.

Owns the grammar: words separated by spaces are ANDed, `OR` joins alternatives (AND binds
tighter), `NOT` negates the next term, "quoted phrases" are one term, parentheses group, and
on numeric fields (size) `>N`, `<N`, `>=N`, `<=N` and `N` compare, so `>1000 <5000` is a range.
Also the matching of each filter field against a stored event (event, recipient, from, to,
subject, message-id, tags, severity, attachment, size, list), and the SQL pushdown the
indexed columns allow (a plain OR-list of values on event, recipient, message-id, severity
becomes an IN on the (domain, column, timestamp) indexes) and the text fields (subject, from,
attachment) have as SQL over store.models.EventText (`search_text` builds its row).  Those
become two things: `text_condition`, the exact filter as SQL (instr / LIKE on the lower-cased
text), which lets the timestamp walk skip non-matching rows without reading their JSON, and
`index_probe`, a necessary condition the substring index answers (FTS5 trigram MATCH on SQLite,
LIKE through the pg_trgm GIN index on PostgreSQL; NOT and terms under 3 characters give none),
which finds the candidate rows of a rare term.  Python still checks every returned row
(`python_filter`).  api/views/events.py decides which plan a page takes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import peewee as pw

from ..errors import InputError
from ..store.models import Event, EventText

FIELDS = ("event", "recipient", "from", "to", "subject", "message-id", "tags", "severity",
          "attachment", "size", "list")
SQL_FIELDS = {"event": Event.event, "recipient": Event.recipient, "message-id": Event.message_id,
              "severity": Event.severity}
# Text filters the substring index serves ("to" is not among them: see store.models.EventText).
TEXT_FIELDS = {"subject": EventText.subject, "from": EventText.from_text, "attachment": EventText.attachment}
_NUL = "\ufffd"  # stands for NUL in EventText
NUMERIC = {"size"}
MAX_TERMS = 100
_TOKEN = re.compile(r'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))')
_PG_EDGES = re.compile(r"^[\W_]+|[\W_]+$")
_PG_WORD = re.compile(r"[^\W_]{3}")
_CMP = re.compile(r"^(>=|<=|>|<|=)?(-?\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Term:
    value: str
    op: str = ""  # "", >, <, >=, <=, = (numeric fields)


@dataclass(frozen=True)
class Not:
    node: object


@dataclass(frozen=True)
class And:
    nodes: tuple


@dataclass(frozen=True)
class Or:
    nodes: tuple


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise InputError("filter expression is not valid: unbalanced quotes")
        pos = m.end()
        if m.group(1):
            out.append(("(", "("))
        elif m.group(2):
            out.append((")", ")"))
        elif m.group(3) is not None:
            out.append(("phrase", re.sub(r"\\(.)", r"\1", m.group(3))))
        else:
            word = m.group(4)
            out.append(("op", word) if word in ("OR", "AND", "NOT") else ("word", word))
        if len(out) > MAX_TERMS * 3:
            raise InputError("filter expression is too long")
    return out


def parse(text: str, field: str) -> object:
    """The expression's tree; InputError for anything malformed."""
    toks = _tokens(str(text))
    if not toks:
        raise InputError(f"'{field}' filter is empty")
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else (None, None)

    def parse_or(depth):
        nonlocal pos
        parts = [parse_and(depth)]
        while peek() == ("op", "OR"):
            pos += 1
            parts.append(parse_and(depth))
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def parse_and(depth):
        nonlocal pos
        parts = [parse_unary(depth)]
        while True:
            kind, val = peek()
            if kind is None or kind == ")" or (kind, val) == ("op", "OR"):
                break
            if (kind, val) == ("op", "AND"):
                pos += 1
            parts.append(parse_unary(depth))
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def parse_unary(depth):
        nonlocal pos
        kind, val = peek()
        if (kind, val) == ("op", "NOT"):
            pos += 1
            return Not(parse_unary(depth))
        if kind == "(":
            if depth > 10:
                raise InputError("filter expression nests too deeply")
            pos += 1
            node = parse_or(depth + 1)
            if peek()[0] != ")":
                raise InputError("filter expression is not valid: missing ')'")
            pos += 1
            return node
        if kind in ("word", "phrase"):
            pos += 1
            if field in NUMERIC:
                m = _CMP.match(val.replace(" ", ""))
                if not m:
                    raise InputError(f"'{field}' filter needs numbers like >1000 or <5000")
                return Term(m.group(2), m.group(1) or "=")
            return Term(val)
        raise InputError("filter expression is not valid")

    tree = parse_or(0)
    if pos != len(toks):
        raise InputError("filter expression is not valid")
    return tree


def plain_values(tree) -> list[str] | None:
    """The values of a plain OR-list of single positive terms (what SQL can take), else None."""
    nodes = tree.nodes if isinstance(tree, Or) else (tree,)
    if all(isinstance(n, Term) for n in nodes):
        return [n.value for n in nodes]
    return None


# -- matching ------------------------------------------------------------------------------------
def _field_values(field: str, data: dict) -> object:
    msg = data.get("message") or {}
    headers = msg.get("headers") or {}
    if field == "event":
        return [str(data.get("event", "")).lower()]
    if field == "severity":
        return [str(data.get("severity", "")).lower()]
    if field == "recipient":
        return [str(data.get("recipient", "")).lower()]
    if field == "message-id":
        return [str(headers.get("message-id", "")).strip("<>").lower()]
    if field == "tags":
        return [str(t).lower() for t in data.get("tags") or []]
    if field == "from":
        return str(headers.get("from", "")).lower() + " " + str((data.get("envelope") or {}).get("sender", "")).lower()
    if field == "to":
        return str(headers.get("to", "")).lower()
    if field == "subject":
        return str(headers.get("subject", "")).lower()
    if field == "attachment":
        return " ".join(str(a.get("filename", "")) for a in msg.get("attachments") or []).lower()
    if field == "list":
        ml = data.get("mailing-list") or {}
        return [str(ml.get("address", "")).lower()] if isinstance(ml, dict) else [str(ml).lower()]
    if field == "size":
        return msg.get("size")
    return ""


def _term_ok(term: Term, field: str, have) -> bool:
    if field in NUMERIC:
        if not isinstance(have, (int, float)):
            return False
        n = float(term.value)
        return {"=": have == n, ">": have > n, "<": have < n, ">=": have >= n, "<=": have <= n}[term.op]
    want = term.value.lower()
    if field == "message-id":
        want = want.strip("<>")
    if isinstance(have, list):
        return want in have
    return want in have  # text fields: contains (a phrase must appear as written)


def _eval(node, field: str, have) -> bool:
    if isinstance(node, Term):
        return _term_ok(node, field, have)
    if isinstance(node, Not):
        return not _eval(node.node, field, have)
    if isinstance(node, And):
        return all(_eval(n, field, have) for n in node.nodes)
    return any(_eval(n, field, have) for n in node.nodes)


def compile_filters(f: dict) -> dict:
    """{field: tree} for the given filter strings (validates every one)."""
    return {name: parse(value, name) for name, value in f.items() if name in FIELDS}


def sql_conditions(trees: dict) -> tuple[list, set]:
    """(peewee conditions, fields they settle fully)."""
    conds, done = [], set()
    for name, tree in trees.items():
        col = SQL_FIELDS.get(name)
        values = plain_values(tree) if col is not None else None
        if values is None:
            continue
        if name in ("event", "severity"):
            values = [v.lower() for v in values]
        elif name == "message-id":
            values = [v.strip("<>") for v in values]
        elif name == "recipient":
            values = [x for v in values for x in {v, v.lower()}]
        conds.append(col.in_(values))
        done.add(name)
    return conds, done


def python_filter(trees: dict, skip: set):
    checks = [(name, tree) for name, tree in trees.items() if name not in skip]
    if not checks:
        return None

    def keep(data: dict) -> bool:
        return all(_eval(tree, name, _field_values(name, data)) for name, tree in checks)
    return keep


# -- text search -----------------------------------------------------------------------------------
def search_text(data: dict) -> dict:
    """The EventText row values of an event: each text field exactly as matching sees it, but
    NUL (which PostgreSQL text cannot hold) as U+FFFD; terms holding either are left to Python,
    so for every other term SQL's substring test and Python's agree."""
    return {col.name: _field_values(name, data).replace("\x00", _NUL) for name, col in TEXT_FIELDS.items()}


def _text_sql(node, col, postgres: bool):
    if isinstance(node, Term):
        want = node.value.lower()
        if postgres:
            like = "%" + want.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            return pw.Expression(col, "LIKE", like)
        return pw.fn.instr(col, want) > 0
    if isinstance(node, Not):
        return ~_text_sql(node.node, col, postgres)
    parts = [_text_sql(n, col, postgres) for n in node.nodes]
    out = parts[0]
    for p in parts[1:]:
        out = (out & p) if isinstance(node, And) else (out | p)
    return out


def _terms(node):
    if isinstance(node, Term):
        yield node
    elif isinstance(node, Not):
        yield from _terms(node.node)
    else:
        for n in node.nodes:
            yield from _terms(n)


def _text_trees(trees: dict) -> list:
    """(column, tree) of the text filters SQL can state exactly (see search_text)."""
    return [(TEXT_FIELDS[name], tree) for name, tree in trees.items()
            if name in TEXT_FIELDS and not any("\x00" in t.value or _NUL in t.value for t in _terms(tree))]


def text_condition(trees: dict, postgres: bool):
    """The text filters as one exact SQL condition over EventText, or None when there are none."""
    conds = [_text_sql(tree, col, postgres) for col, tree in _text_trees(trees)]
    if not conds:
        return None
    out = conds[0]
    for c in conds[1:]:
        out = out & c
    return out


def _probe(node, column: str, postgres: bool, common):
    """A tree of terms every match of `node` contains, that the index can look up, or None."""
    if isinstance(node, Term):
        want = node.value.lower()
        # The longest stretch of the term whose trigrams are all uncommon: a trigram most events
        # have makes the index read that trigram's whole list of rows.
        count, best, start = len(want) - 2, "", 0
        for i in range(max(count, 0) + 1):
            if i == count or common(column, want[i:i + 3]):
                if i > start and i - start + 2 > len(best):
                    best = want[start:i + 2]
                start = i + 1
        if postgres:
            # pg_trgm pads the words of a LIKE pattern, so an edge that is not a letter or
            # digit adds "  x" trigrams most rows share; and a pattern without a 3-character
            # word gives the GIN scan nothing to narrow by (it reads the whole index).
            best = _PG_EDGES.sub("", best)
            return Term(best) if _PG_WORD.search(best) else None
        return Term(best) if best else None
    if isinstance(node, Not):
        return None
    parts = [_probe(n, column, postgres, common) for n in node.nodes]
    if isinstance(node, Or):
        return None if any(p is None for p in parts) else Or(tuple(parts))
    parts = [p for p in parts if p is not None]
    return (parts[0] if len(parts) == 1 else And(tuple(parts))) if parts else None


def text_share(trees: dict, rows: list) -> float:
    """The share of `rows` (EventText values in TEXT_FIELDS order) the text filters keep."""
    names = list(TEXT_FIELDS)
    checks = [(names.index(n), n, t) for n, t in trees.items() if n in TEXT_FIELDS]
    return sum(all(_eval(t, n, row[i]) for i, n, t in checks) for row in rows) / max(len(rows), 1)


def index_probe(trees: dict, postgres: bool, common=lambda column, trigram: False) -> dict:
    """{field: tree of terms} the substring index can look up for the text filters, each a
    necessary condition of its filter (`common(column, trigram)` says which trigrams to leave
    out); empty when the filters bound nothing (no text filter, only NOT, short terms or terms
    of common trigrams only).  `text_share` estimates it, `probe_condition` states it."""
    out = {}
    for col, tree in _text_trees(trees):
        name = next(n for n, c in TEXT_FIELDS.items() if c is col)
        found = _probe(tree, col.column_name, postgres, common)
        if found is not None:
            out[name] = found
    return out


def _fts(node, column: str) -> str:
    if isinstance(node, Term):
        return "{%s}:\"%s\"" % (column, node.value.replace('"', '""'))
    op = " AND " if isinstance(node, And) else " OR "
    return "(" + op.join(_fts(n, column) for n in node.nodes) + ")"


def probe_condition(probes: dict, postgres: bool):
    """`index_probe`'s terms as an FTS5 MATCH string (SQLite) or a LIKE condition over
    EventText that the pg_trgm index serves (PostgreSQL)."""
    if postgres:
        return text_condition(probes, True)
    return " AND ".join(_fts(tree, TEXT_FIELDS[name].column_name) for name, tree in probes.items())
