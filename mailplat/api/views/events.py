"""Events API: GET /v3/<domain>/events and GET /v3/<domain>/events/<page token>.

Owns reading the query (begin, end, ascending, limit up to 300, filters event, recipient,
from, to, subject, message-id, tags, severity, attachment, size, list as Mailgun filter
expressions (core.eventquery), events older than [tracking] events_retention_days left out), walking the
domain's stored events in timestamp order with a keyset cursor on (timestamp, row id), and the
`paging` links {first, last, next, previous}: absolute URLs whose last path segment is an
opaque token holding the query and the position, so mailgun.js (which requests
/v3/<domain>/events/<last segment>) and plain HTTP clients (which GET the URL) both page.
Every page, an empty last one too, carries paging.  Items are the stored event JSON
(core/events.build); this module only reads.

Text filters (subject, from, attachment; `to` is matched on the JSON) take one of two plans
per page.  A term the substring index finds in at most PROBE_CAP events (of all domains) is
rare: those candidates' rows are fetched by id, sorted and paged.  Otherwise (a common term,
one a sample of events says is not rare, or only NOT / short terms) the walk goes down the
(domain, timestamp) index joined to event_text and tests the exact text condition in SQL,
reading the JSON of matching rows only; at most MAX_SCAN rows per page.  The probe leaves out
trigrams common in a sample of events: FTS5 reads a phrase's every doclist whole (pg_trgm's
GIN scan its posting lists), and a common trigram's costs as much as the walk.
"""
from __future__ import annotations

import base64
import binascii
import json
import random
import time

import peewee as pw
from aiohttp import web

from ...core import eventquery
from ...core.context import Context
from ...core.timefmt import parse_time
from ...errors import InputError, NotFound
from ...store.models import Domain, Event, EventText
from ..forms import loose_bool, query
from ..middleware import json_response

DEFAULT_LIMIT = 100
MAX_LIMIT = 300
# Ascending walks stop this many seconds before "now": an event is stamped inside its
# transaction, a moment before the commit that makes it visible; without this margin it could
# land behind a poller's cursor and never be seen.
SETTLE_SECONDS = 2.0
MAX_SCAN = 20_000  # rows examined per page when Python-side filters (from, tags) reject many
PROBE_CAP = 2_000  # a text term the index finds in more events than this is walked for
# The text of SAMPLE events at random (drawn again every SAMPLE_SECONDS) says which trigrams are
# COMMON, left out of the index probe, and how many events the probe would find, so that one
# finding more than PROBE_CAP is not run.  A store smaller than SAMPLE has no sample.
SAMPLE = 2000
COMMON = 0.02
SAMPLE_SECONDS = 60.0
_sample: list = [float("-inf"), None, 0, {}]  # taken at (monotonic), rows or None, events, memo
_FILTERS = eventquery.FIELDS


# -- the query ------------------------------------------------------------------------------------
def parse_query(params) -> dict:
    """The normalised query a token carries: {begin, end, asc, limit, f: {filter: value}}."""
    q: dict = {"f": {}}
    begin = params.get("begin")
    end = params.get("end")
    q["begin"] = parse_time(begin, "begin") if begin not in (None, "") else None
    q["end"] = parse_time(end, "end") if end not in (None, "") else None
    asc = params.get("ascending")
    if asc not in (None, ""):
        q["asc"] = loose_bool(asc, "ascending")
    elif q["begin"] is not None and q["end"] is not None:
        q["asc"] = q["begin"] <= q["end"]
    else:
        q["asc"] = False
    limit = params.get("limit")
    if limit in (None, ""):
        q["limit"] = DEFAULT_LIMIT
    else:
        try:
            q["limit"] = int(str(limit).strip())
        except ValueError:
            raise InputError("'limit' parameter should be an integer") from None
        if q["limit"] < 1:
            raise InputError("'limit' parameter should be at least 1")
        if q["limit"] > MAX_LIMIT:
            raise InputError(f"'limit' parameter should be at most {MAX_LIMIT}")
    for name in _FILTERS:
        value = params.get(name)
        if value not in (None, ""):
            if len(str(value)) > 2000:
                raise InputError(f"'{name}' filter is too long")
            q["f"][name] = str(value)
    eventquery.compile_filters(q["f"])  # 400 for a malformed expression now, not on a later page
    return q


def _bounds(q: dict, now: float, retention: float = 0.0) -> tuple[float | None, float | None]:
    lo, hi = _bounds_asked(q, now)
    if retention > 0:
        lo = now - retention if lo is None else max(lo, now - retention)
    return lo, hi


def _bounds_asked(q: dict, now: float) -> tuple[float | None, float | None]:
    begin, end, asc = q["begin"], q["end"], q["asc"]
    if begin is not None and end is not None:
        lo, hi = min(begin, end), max(begin, end)
    elif begin is not None:
        lo, hi = (begin, None) if asc else (None, begin)
    elif end is not None:
        lo, hi = (None, end) if asc else (end, None)
    else:
        lo = hi = None
    if asc:
        settled = now - SETTLE_SECONDS
        hi = settled if hi is None else min(hi, settled)
    return lo, hi


def _after(ts: float, rid: int):
    """Keyset position test written so the (domain, ..., timestamp) index bounds the scan: the
    plain range comes first, the tie-break on the row id second."""
    return (Event.timestamp >= ts) & ((Event.timestamp > ts) | (Event.id > rid))


def _before(ts: float, rid: int):
    return (Event.timestamp <= ts) & ((Event.timestamp < ts) | (Event.id < rid))


def _sample_rows() -> tuple[list | None, int, dict]:
    """SAMPLE events' text at random (newest ones alone may be one campaign's), about how many
    events there are, and the memo of what was worked out from them."""
    now = time.monotonic()
    if now - _sample[0] > SAMPLE_SECONDS or len(_sample[3]) > 10_000:
        lo, hi = EventText.select(pw.fn.MIN(EventText.event), pw.fn.MAX(EventText.event)).scalar(as_tuple=True)
        rows, total = None, 0
        if lo is not None and hi - lo + 1 >= SAMPLE:
            ids = random.sample(range(lo, hi + 1), SAMPLE)
            rows = list(EventText.select(*eventquery.TEXT_FIELDS.values()).where(EventText.event.in_(ids)).tuples())
            total = round((hi - lo + 1) * len(rows) / SAMPLE)
            rows = rows if len(rows) >= SAMPLE // 2 else None
        _sample[:] = [now, rows, total, {}]
    return _sample[1], _sample[2], _sample[3]


def _candidates(trees: dict, postgres: bool) -> list[int] | None:
    """The row ids the substring index finds for the text filters (a superset of the matches),
    or None when it bounds nothing or finds (or by the sample would find) more than PROBE_CAP:
    the walk is then as good."""
    rows, total, memo = _sample_rows()
    columns = [f.column_name for f in eventquery.TEXT_FIELDS.values()]

    def common(column: str, trigram: str) -> bool:
        if rows is None:
            return False
        hit = memo.get((column, trigram))
        if hit is None:
            i = columns.index(column)
            hit = memo[(column, trigram)] = sum(trigram in r[i] for r in rows) >= COMMON * len(rows)
        return hit

    probes = eventquery.index_probe(trees, postgres, common)
    if not probes:
        return None
    if rows is not None and eventquery.text_share(probes, rows) * total > PROBE_CAP:
        return None
    probe = eventquery.probe_condition(probes, postgres)
    if postgres:
        ids = [i for (i,) in EventText.select(EventText.event).where(probe).limit(PROBE_CAP + 1).tuples()]
    else:
        ids = [i for (i,) in EventText._meta.database.execute_sql(
            "SELECT rowid FROM event_fts WHERE event_fts MATCH ? LIMIT ?", (probe, PROBE_CAP + 1))]
    return ids if len(ids) <= PROBE_CAP else None


def _page_sync(domain: str, q: dict, pos: list | None, back: bool, now: float, retention: float = 0.0):
    """One page in presentation order: (items, first position, last position, exists)."""
    if Domain.get_or_none(Domain.name == domain) is None:
        raise NotFound("Domain not found")
    lo, hi = _bounds(q, now, retention)
    asc = q["asc"] != back  # the walk's direction in the table
    trees = eventquery.compile_filters(q["f"])
    sql, settled = eventquery.sql_conditions(trees)
    postgres = isinstance(Event._meta.database.obj, pw.PostgresqlDatabase)
    text = eventquery.text_condition(trees, postgres)
    conds = [Event.domain == domain] + sql
    candidates = None
    if text is not None:
        candidates = _candidates(trees, postgres)
        if candidates is not None:
            if not candidates:
                return [], None
            conds.append(Event.id.in_(candidates))
    if lo is not None:
        conds.append(Event.timestamp >= lo)
    if hi is not None:
        conds.append(Event.timestamp <= hi)
    if pos is not None:
        ts, rid = float(pos[0]), int(pos[1])
        if asc:
            conds.append(_after(ts, rid))
        else:
            conds.append(_before(ts, rid))
    order = [Event.timestamp.asc(), Event.id.asc()] if asc else [Event.timestamp.desc(), Event.id.desc()]
    keep = eventquery.python_filter(trees, settled)
    limit = q["limit"]
    found: list[tuple[float, int, dict]] = []
    scanned = 0
    if text is None:
        select = Event.select(Event.id, Event.timestamp, Event.data)
        batch = limit if keep is None else max(limit, 200)
    else:
        # Rows failing the text condition come back without their JSON: cheap to skip, so the
        # walk's batches grow while few match.
        select = (Event.select(Event.id, Event.timestamp, pw.Case(None, [(text, Event.data)], None))
                  .join(EventText, on=(EventText.event == Event.id)))
        batch = limit if candidates is not None else max(limit, 200)
    cursor_conds = list(conds)
    while len(found) < limit:
        # The driver's rows as they come (peewee's per-row conversion would cost more than the
        # SQL); data is the stored JSON text.
        rows = Event._meta.database.execute_sql(*select.where(*cursor_conds).order_by(*order).limit(batch).sql()).fetchall()
        for rid, ts, data in rows:
            scanned += 1
            if data is None:
                continue
            data = json.loads(data)
            if keep is None or keep(data):
                found.append((ts, rid, data))
                if len(found) >= limit:
                    break
        if len(rows) < batch or len(found) >= limit or scanned >= MAX_SCAN:
            if scanned >= MAX_SCAN and rows and len(found) < limit:
                # Stop here; the cursor moves past what was scanned so paging advances.
                last_ts, last_id = rows[-1][1], rows[-1][0]
                return _present(found, back), [last_ts, last_id]
            break
        last_ts, last_id = rows[-1][1], rows[-1][0]
        cursor_conds = conds + [_after(last_ts, last_id) if asc else _before(last_ts, last_id)]
        if text is not None:
            batch = min(batch * 4, 5000)
    return _present(found, back), None


def _present(found, back: bool):
    return list(reversed(found)) if back else found


# -- tokens ----------------------------------------------------------------------------------------
def encode_token(q: dict, pos, back: bool) -> str:
    payload = {"q": q, "p": pos, "b": 1 if back else 0}
    raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[dict, list | None, bool]:
    bad = InputError("Invalid page token")
    if not token or len(token) > 8192:
        raise bad
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        q, pos, back = payload["q"], payload["p"], bool(payload["b"])
        if not isinstance(q, dict) or not isinstance(q.get("f"), dict):
            raise bad
        clean = {"begin": _num_or_none(q.get("begin")), "end": _num_or_none(q.get("end")),
                 "asc": bool(q.get("asc")), "limit": int(q.get("limit", DEFAULT_LIMIT)),
                 "f": {k: str(v) for k, v in q["f"].items() if k in _FILTERS}}
        if not 1 <= clean["limit"] <= MAX_LIMIT:
            raise bad
        if pos is not None:
            pos = [float(pos[0]), int(pos[1])]
        return clean, pos, back
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error, UnicodeDecodeError):
        raise bad from None


def _num_or_none(value):
    return None if value is None else float(value)


# -- handlers ----------------------------------------------------------------------------------------
def setup(app: web.Application, ctx: Context) -> None:
    store = ctx.store

    def base_url(request: web.Request) -> str:
        public = ctx.config.api.public_url.rstrip("/")
        if public:
            return public
        return f"{request.scheme}://{request.host}"

    async def serve_page(request: web.Request, domain: str, q: dict, pos, back: bool) -> web.Response:
        now = ctx.clock()
        retention = getattr(getattr(ctx.config, "tracking", None), "events_retention_days", 0.0) * 86400.0
        items, scan_pos = await store.read(_page_sync, domain, q, pos, back, now, retention)
        base = f"{base_url(request)}/v3/{domain}/events/"
        if items:
            first_pos = [items[0][0], items[0][1]]
            last_pos = [items[-1][0], items[-1][1]]
            next_tok = encode_token(q, last_pos, False)
            prev_tok = encode_token(q, first_pos, True)
        else:
            # Nothing here (yet): next asks again from the same place, previous looks back.
            here = scan_pos or pos
            next_tok = encode_token(q, here, False)
            prev_tok = encode_token(q, here, True)
        if scan_pos is not None and items and not back:
            next_tok = encode_token(q, scan_pos, False)
        paging = {
            "first": base + encode_token(q, None, False),
            "last": base + encode_token(q, None, True),
            "next": base + next_tok,
            "previous": base + prev_tok,
        }
        return json_response({"items": [data for _, _, data in items], "paging": paging})

    async def list_events(request: web.Request) -> web.Response:
        domain = request.match_info["domain"].strip().lower()
        q = parse_query(query(request).fields)
        return await serve_page(request, domain, q, None, False)

    async def events_page(request: web.Request) -> web.Response:
        domain = request.match_info["domain"].strip().lower()
        q, pos, back = decode_token(request.match_info["token"])
        return await serve_page(request, domain, q, pos, back)

    for version in ("v3", "v2"):
        app.router.add_get(f"/{version}/{{domain}}/events", list_events)
        app.router.add_get(f"/{version}/{{domain}}/events/{{token}}", events_page)
