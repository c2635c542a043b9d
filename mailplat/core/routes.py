"""Routes: the expression language, the actions, the priority waterfall and the routes' CRUD.

Owns parsing `match_recipient("re")`, `match_header("name", "re")`, `catch_all()` joined by
`and`, and the actions `forward("url or address, ...")`, `store(notify="url")`, `stop()`; an
invalid expression or action is an InputError saying where it is wrong.  Regexes are Python
style (run by the `regex` module with a per-match time budget, patterns and inputs bounded, so
a hostile pattern cannot stall a thread).  `plan()` runs the waterfall for one recipient and
returns the actions to take, captures already substituted (\\1, \\g<name>).
The API (api/views/routes.py) calls the CRUD functions; core.routejobs executes plans;
core.receive asks `recipient_taken` at RCPT time.
"""
from __future__ import annotations

import functools
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import quote

import regex

from ..errors import InputError, NotFound
from ..store.route_models import Route
from . import egress
from .timefmt import rfc2822 as _rfc2822

MAX_PATTERN = 1000
MAX_EXPRESSION = 4000
MAX_ACTIONS = 20
MAX_SUBJECT = 320
MAX_HEADER_VALUE = 8192
MATCH_SECONDS = 0.05
MAX_HEADERS_SCANNED = 20  # occurrences of one header name a filter looks at


class RouteError(InputError):
    """Invalid route"""


# -- expressions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filter:
    kind: str                 # recipient | header | catch_all
    pattern: object = None    # compiled regex
    header: str = ""


@dataclass(frozen=True)
class Expression:
    filters: tuple[Filter, ...]

    @property
    def catch_all(self) -> bool:
        return any(f.kind == "catch_all" for f in self.filters)


_TOKEN = re.compile(r"""\s*(?:(?P<name>[A-Za-z_][A-Za-z_0-9]*)|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<punct>[(),=]))""", re.S)


def _tokens(text: str, what: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise RouteError(f"Invalid {what} at position {pos}: unexpected {text[pos:pos + 10]!r}")
        kind = m.lastgroup
        value = m.group(kind)
        start = m.start(kind)
        if kind == "str":
            value = _unquote(value)
        out.append((kind, value, start))
        pos = m.end()
    return out


def _unquote(s: str) -> str:
    body = s[1:-1]
    # Only the quote and the backslash itself are escapes; everything else (\d, \1) stays as
    # written so regexes and capture references read naturally.
    return re.sub(r"\\([\"'\\])", r"\1", body) if "\\" in body else body


class _Parser:
    def __init__(self, text: str, what: str):
        self.text, self.what = text, what
        self.toks = _tokens(text, what)
        self.i = 0

    def error(self, expected: str):
        if self.i < len(self.toks):
            kind, value, pos = self.toks[self.i]
            raise RouteError(f"Invalid {self.what} at position {pos}: expected {expected}, found {value!r}")
        raise RouteError(f"Invalid {self.what} at position {len(self.text)}: expected {expected}, found the end")

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None, len(self.text))

    def take(self, kind: str, value: str | None = None, expected: str = ""):
        k, v, _ = self.peek()
        if k != kind or (value is not None and v != value):
            self.error(expected or (repr(value) if value else kind))
        self.i += 1
        return v

    def done(self) -> bool:
        return self.i >= len(self.toks)


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str, ignore_case: bool, pos: int, what: str):
    if len(pattern) > MAX_PATTERN:
        raise RouteError(f"Invalid {what} at position {pos}: pattern longer than {MAX_PATTERN} characters")
    try:
        return regex.compile(pattern, regex.V0 | (regex.IGNORECASE if ignore_case else 0))
    except (regex.error, OverflowError, RecursionError) as exc:
        raise RouteError(f"Invalid {what} at position {pos}: bad regular expression ({exc})") from None


@functools.lru_cache(maxsize=4096)
def parse_expression(text: str) -> Expression:
    if not text or not text.strip():
        raise RouteError("Invalid expression: it is empty")
    if len(text) > MAX_EXPRESSION:
        raise RouteError(f"Invalid expression: longer than {MAX_EXPRESSION} characters")
    p = _Parser(text, "expression")
    filters = []
    while True:
        _, name, pos = p.peek()
        p.take("name", expected="match_recipient, match_header or catch_all")
        p.take("punct", "(", expected="'('")
        if name == "match_recipient":
            _, _, spos = p.peek()
            pat = p.take("str", expected="a quoted pattern")
            filters.append(Filter("recipient", _compile(pat, True, spos, "expression")))
        elif name == "match_header":
            hname = p.take("str", expected="a quoted header name")
            if not hname or not re.fullmatch(r"[!-9;-~]+", hname):
                raise RouteError(f"Invalid expression at position {pos}: bad header name {hname!r}")
            p.take("punct", ",", expected="','")
            _, _, spos = p.peek()
            pat = p.take("str", expected="a quoted pattern")
            filters.append(Filter("header", _compile(pat, False, spos, "expression"), hname))
        elif name in ("catch_all", "catchall"):
            filters.append(Filter("catch_all"))
        else:
            raise RouteError(f"Invalid expression at position {pos}: unknown filter {name!r}")
        p.take("punct", ")", expected="')'")
        if p.done():
            break
        _, word, _ = p.peek()
        if word != "and":
            p.error("'and' or the end")
        p.i += 1
    return Expression(tuple(filters))


# -- actions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    kind: str                          # forward | store | stop
    destinations: tuple[str, ...] = ()  # forward
    notify: str = ""                    # store


ADDRESS = re.compile(r"[^@\s<>(),;:\"]{1,64}@[A-Za-z0-9.-]{1,253}|[^@\s<>(),;:\"]{1,64}@\\.+")


def _is_url(dest: str) -> bool:
    return dest.lower().startswith(("http://", "https://"))


def _check_destination(dest: str, pos: int, allow_private: bool, has_refs: bool) -> None:
    if _is_url(dest):
        try:
            egress.check_url_static(dest, allow_private)
        except InputError as exc:
            raise RouteError(f"Invalid action at position {pos}: {exc.message}") from None
        return
    if "://" in dest:
        raise RouteError(f"Invalid action at position {pos}: only http and https URLs can be forwarded to")
    local, at, dom = dest.rpartition("@")
    if not at or not local or not dom or any(c in dest for c in " <>,;\r\n\"") or len(dest) > 320:
        raise RouteError(f"Invalid action at position {pos}: {dest!r} is neither a URL nor an address")


def parse_action(text: str, allow_private: bool = False) -> Action:
    if not text or not text.strip():
        raise RouteError("Invalid action: it is empty")
    p = _Parser(text, "action")
    _, name, pos = p.peek()
    p.take("name", expected="forward, store or stop")
    p.take("punct", "(", expected="'('")
    if name == "forward":
        _, _, spos = p.peek()
        arg = p.take("str", expected="a quoted destination")
        dests = tuple(d.strip() for d in arg.split(",") if d.strip())
        if not dests:
            raise RouteError(f"Invalid action at position {spos}: forward() needs a destination")
        for d in dests:
            _check_destination(d, spos, allow_private, "\\" in d)
        action = Action("forward", destinations=dests)
    elif name == "store":
        notify = ""
        if p.peek()[0] == "name":
            _, key, kpos = p.peek()
            if key != "notify":
                raise RouteError(f"Invalid action at position {kpos}: store() takes only notify=")
            p.i += 1
            p.take("punct", "=", expected="'='")
            _, _, spos = p.peek()
            notify = p.take("str", expected="a quoted URL").strip()
            if notify:
                if not _is_url(notify):
                    raise RouteError(f"Invalid action at position {spos}: notify must be an http or https URL")
                _check_destination(notify, spos, allow_private, False)
        action = Action("store", notify=notify)
    elif name == "stop":
        action = Action("stop")
    else:
        raise RouteError(f"Invalid action at position {pos}: unknown action {name!r}")
    p.take("punct", ")", expected="')'")
    if not p.done():
        p.error("the end of the action")
    return action


# -- evaluation ------------------------------------------------------------------------------------
@dataclass
class Match:
    positional: list[str] = field(default_factory=list)
    named: dict[str, str] = field(default_factory=dict)


def _run(pattern, text: str):
    try:
        return pattern.match(text, timeout=MATCH_SECONDS)
    except TimeoutError:
        return None


def evaluate(expr: Expression, recipient: str, headers: list[tuple[str, str]], matched_before: bool) -> Match | None:
    """A Match (with captures) when every filter holds, else None."""
    found = Match()
    for f in expr.filters:
        if f.kind == "catch_all":
            if matched_before:
                return None
            continue
        if f.kind == "recipient":
            m = _run(f.pattern, recipient[:320])
        else:
            m = None
            seen = 0
            for name, value in headers:
                if name.lower() == f.header.lower():
                    m = _run(f.pattern, value[:MAX_HEADER_VALUE])
                    seen += 1
                    if m or seen >= MAX_HEADERS_SCANNED:
                        break
        if not m:
            return None
        found.positional.extend(g or "" for g in m.groups())
        found.named.update({k: v or "" for k, v in m.groupdict().items()})
    return found


_REF = re.compile(r"\\g<(\w+)>|\\(\d{1,2})")


def substitute(text: str, match: Match, for_url: bool) -> str:
    def one(m: re.Match) -> str:
        key = m.group(1) or m.group(2)
        if key.isdigit():
            i = int(key)
            value = match.positional[i - 1] if 0 < i <= len(match.positional) else ""
        else:
            value = match.named.get(key, "")
        return quote(value, safe="@.-_~+") if for_url else value
    return _REF.sub(one, text)


@dataclass
class Step:
    route_id: str
    kind: str          # forward_url | forward_address | store
    target: str        # URL or address ("" for store without notify)


def plan(routes: list[dict], recipient: str, headers: list[tuple[str, str]]) -> list[Step]:
    """The waterfall for one recipient: routes in priority order, each matching route's actions
    (captures substituted), stopping after a stop()."""
    steps: list[Step] = []
    matched = False
    for r in routes:
        try:
            expr = parse_expression(r["expression"])
        except InputError:
            continue
        m = evaluate(expr, recipient, headers, matched)
        if m is None:
            continue
        matched = True
        stop = False
        for text in r["actions"]:
            try:
                action = parse_action(text, allow_private=True)
            except InputError:
                continue
            if action.kind == "stop":
                stop = True
            elif action.kind == "store":
                steps.append(Step(r["id"], "store", substitute(action.notify, m, True)))
            else:
                for d in action.destinations:
                    url = _is_url(d)
                    target = substitute(d, m, url)
                    steps.append(Step(r["id"], "forward_url" if url else "forward_address", target))
        if stop:
            break
    return steps


def recipient_matches_sync(address: str, named: bool = False) -> bool:
    """Inside a store read: does any route take mail for `address` (its recipient filters hold,
    or a catch_all)?  Header filters cannot be known at RCPT time and count as a match.  With
    `named`, only a route with a match_recipient filter counts (a catch_all or header-only
    route does not name the address)."""
    for expression, in Route.select(Route.expression).tuples():
        try:
            expr = parse_expression(expression)
        except InputError:
            continue
        if named and not any(f.kind == "recipient" for f in expr.filters):
            continue
        ok = True
        for f in expr.filters:
            if f.kind == "recipient" and not _run(f.pattern, address):
                ok = False
                break
        if ok:
            return True
    return False


def load_routes_sync() -> list[dict]:
    return [_as_dict(r) for r in Route.select().order_by(Route.priority, Route.created_at, Route.id)]


# -- CRUD ------------------------------------------------------------------------------------------
def _as_dict(r: Route) -> dict:
    return {"id": r.id, "priority": r.priority, "description": r.description,
            "expression": r.expression, "actions": list(r.actions or []),
            "created_at": _rfc2822(r.created_at)}


def validate(expression: str | None, actions: list[str] | None, allow_private: bool) -> None:
    if expression is not None:
        parse_expression(expression)
    if actions is not None:
        if len(actions) > MAX_ACTIONS:
            raise RouteError(f"Too many actions: at most {MAX_ACTIONS}")
        for i, a in enumerate(actions):
            try:
                parse_action(a, allow_private)
            except RouteError as exc:
                raise RouteError(f"action {i + 1}: {exc.message}") from None


async def create_route(ctx, priority: int, description: str, expression: str, actions: list[str]) -> dict:
    if not expression:
        raise InputError("'expression' parameter is missing")
    if not actions:
        raise InputError("'action' parameter is missing")
    validate(expression, actions, egress.allow_private(ctx))
    rid = secrets.token_hex(12)
    now = ctx.clock()

    def write():
        return _as_dict(Route.create(id=rid, priority=priority, description=description or "",
                                     expression=expression.strip(), actions=actions, created_at=now))
    return await ctx.store.write(write)


async def list_routes(ctx, skip: int, limit: int) -> dict:
    def read():
        q = Route.select().order_by(Route.priority, Route.created_at, Route.id)
        return {"total_count": q.count(), "items": [_as_dict(r) for r in q.offset(skip).limit(limit)]}
    return await ctx.store.read(read)


async def get_route(ctx, rid: str) -> dict:
    def read():
        r = Route.get_or_none(Route.id == rid)
        if r is None:
            raise NotFound("Route not found")
        return _as_dict(r)
    return await ctx.store.read(read)


async def update_route(ctx, rid: str, priority: int | None, description: str | None,
                       expression: str | None, actions: list[str] | None) -> dict:
    validate(expression, actions or None, egress.allow_private(ctx))

    def write():
        r = Route.get_or_none(Route.id == rid)
        if r is None:
            raise NotFound("Route not found")
        if priority is not None:
            r.priority = priority
        if description is not None:
            r.description = description
        if expression:
            r.expression = expression.strip()
        if actions:
            r.actions = actions
        r.save()
        return _as_dict(r)
    return await ctx.store.write(write)


async def delete_route(ctx, rid: str) -> None:
    def write():
        if Route.delete().where(Route.id == rid).execute() == 0:
            raise NotFound("Route not found")
    await ctx.store.write(write)


async def match_address(ctx, address: str) -> dict:
    """GET /v3/routes/match: the first route (in priority order) whose filters hold for the
    address (header filters are ignored: there is no message)."""
    if not address or len(address) > 320:
        raise InputError("'address' parameter is missing")

    def read():
        for r in Route.select().order_by(Route.priority, Route.created_at, Route.id):
            try:
                expr = parse_expression(r.expression)
            except InputError:
                continue
            if all(f.kind != "recipient" or _run(f.pattern, address.lower()) for f in expr.filters):
                return _as_dict(r)
        raise NotFound("Route not found")
    return await ctx.store.read(read)
