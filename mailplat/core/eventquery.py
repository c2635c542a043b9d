"""Mailgun's filter expressions for the events API, parsed and matched.

Owns the grammar: words separated by spaces are ANDed, `OR` joins alternatives (AND binds
tighter), `NOT` negates the next term, "quoted phrases" are one term, parentheses group, and
on numeric fields (size) `>N`, `<N`, `>=N`, `<=N` and `N` compare, so `>1000 <5000` is a range.
Also the matching of each filter field against a stored event (event, recipient, from, to,
subject, message-id, tags, severity, attachment, size, list), and the SQL pushdown the
indexed columns allow (a plain OR-list of values on event, recipient, message-id, severity
becomes an IN on the (domain, column, timestamp) indexes); everything else is matched in
Python on the rows the indexed walk yields.  api/views/events.py calls `sql_conditions` and
`python_filter`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError
from ..store.models import Event

FIELDS = ("event", "recipient", "from", "to", "subject", "message-id", "tags", "severity",
          "attachment", "size", "list")
SQL_FIELDS = {"event": Event.event, "recipient": Event.recipient, "message-id": Event.message_id,
              "severity": Event.severity}
NUMERIC = {"size"}
MAX_TERMS = 100
_TOKEN = re.compile(r'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))')
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
