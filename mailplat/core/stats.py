"""Stats: event counters kept as events happen, and the totals the stats API shows.

Owns `count_sync` / `count_many_sync` (called by core.webhooks.on_event inside each event's
transaction, once per batch of events: one upsert for all the counter keys for the domain, each of the message's tags and campaigns, on the
hour's row of StatCounter; `accepted` also notes the tags' first/last use in Tag), and
`totals_sync`, which sums hour rows into Mailgun's shape: {start, end, resolution,
stats: [{time, accepted{incoming,outgoing,total}, delivered{smtp,http,total},
failed{permanent{bounce,...,total}, temporary{espblock,total}}, opened{total}, ...}]}.
Reads a few rows per hour in range, never the events table.  Used by api/views/stats.py, tags.py
and campaigns.py.
"""
from __future__ import annotations

import calendar
import re
import time

from ..errors import InputError
from ..store.tracking_models import StatCounter, Tag
from .timefmt import parse_time, rfc2822

EVENTS = ("accepted", "delivered", "failed", "opened", "clicked", "unsubscribed", "complained", "stored")
PERMANENT = ("bounce", "delayed-bounce", "suppress-bounce", "suppress-unsubscribe", "suppress-complaint",
             "espblock", "webhook")
CAMPAIGN_PREFIX = "#campaign#"
MAX_BUCKETS = 10_000
_DURATION = re.compile(r"^\s*(\d{1,6})\s*([hdm])\s*$")


def counter_keys(data: dict) -> list[str]:
    """The counter keys an event adds one to (also how campaigns.py groups events itself)."""
    ev = data.get("event")
    if ev == "accepted":
        routed = (data.get("flags") or {}).get("is-routed") or data.get("method") == "inbound"
        return ["accepted.incoming" if routed else "accepted.outgoing"]
    if ev == "delivered":
        return ["delivered.http" if (data.get("delivery-status") or {}).get("http") else "delivered.smtp"]
    if ev == "failed":
        if data.get("severity") == "permanent":
            reason = data.get("reason", "")
            key = reason if reason in PERMANENT else ("delayed-bounce" if reason in ("old", "maxfails") else "bounce")
            return [f"failed.permanent.{key}"]
        return ["failed.temporary.espblock"]
    if ev in ("opened", "clicked", "unsubscribed", "complained", "stored"):
        return [ev]
    return []


# (domain, tag) -> when this process last wrote the tag's last-seen: a busy tag is touched
# once a minute, not once per recipient.
_TAG_TOUCH_SECONDS = 60.0
_tag_touched: dict[tuple[str, str], float] = {}


def count_sync(domain: str, data: dict) -> None:
    count_many_sync(domain, [data])


def count_many_sync(domain: str, datas: list[dict]) -> None:
    """Count several events (one send's) in ONE upsert: equal counter rows are summed first."""
    bumps: dict[tuple, int] = {}
    for data in datas:
        _count_into(bumps, domain, data)
    if bumps:
        StatCounter.bump_many([(*k, n) for k, n in bumps.items()])


def _count_into(bumps: dict, domain: str, data: dict) -> None:
    keys = counter_keys(data)
    if not keys:
        return
    ts = float(data.get("timestamp") or time.time())
    hour = int(ts // 3600 * 3600)
    tags = [str(t) for t in data.get("tags") or []][:10]
    camps = [str(c.get("id") if isinstance(c, dict) else c) for c in data.get("campaigns") or []][:3]
    scopes = [""] + tags + [CAMPAIGN_PREFIX + c for c in camps]
    for scope in dict.fromkeys(scopes):
        for key in keys:
            mark = (domain, scope[:255], hour, key)
            bumps[mark] = bumps.get(mark, 0) + 1
    if data.get("event") == "accepted" and tags:
        for tag in dict.fromkeys(tags):
            mark = (domain, tag)
            if ts - _tag_touched.get(mark, float("-inf")) < _TAG_TOUCH_SECONDS:
                continue
            Tag.insert(domain=domain, tag=tag[:255], description="", first_seen=ts, last_seen=ts).on_conflict(
                conflict_target=[Tag.domain, Tag.tag], update={Tag.last_seen: ts}).execute()
            if len(_tag_touched) > 100_000:
                _tag_touched.clear()
            _tag_touched[mark] = ts


def forget_tag(domain: str, tag: str) -> None:
    """After a tag is deleted: the next message using it creates it again at once."""
    _tag_touched.pop((domain, tag), None)


# -- the query ---------------------------------------------------------------------------------------
def parse_range(params, now: float) -> tuple[float, float, str]:
    """(start, end, resolution) from start/end/duration/resolution query values."""
    resolution = (params.get("resolution") or "day").strip().lower()
    if resolution not in ("hour", "day", "month"):
        raise InputError("'resolution' must be hour, day or month")
    end = parse_time(params["end"], "end") if params.get("end") else now
    if params.get("duration"):
        m = _DURATION.match(str(params["duration"]))
        if not m:
            raise InputError("'duration' must look like 24h, 7d or 1m")
        n, unit = int(m.group(1)), m.group(2)
        start = end - n * {"h": 3600, "d": 86400, "m": 30 * 86400}[unit]
        if not params.get("resolution"):
            resolution = {"h": "hour", "d": "day", "m": "month"}[unit]
    elif params.get("start"):
        start = parse_time(params["start"], "start")
    else:
        start = end - 7 * 86400
    if start > end:
        raise InputError("'start' must be before 'end'")
    return start, end, resolution


def _floor(ts: float, resolution: str) -> int:
    t = time.gmtime(ts)
    if resolution == "hour":
        return int(ts // 3600 * 3600)
    if resolution == "day":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    return calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))


def _next(ts: int, resolution: str) -> int:
    if resolution == "hour":
        return ts + 3600
    if resolution == "day":
        return ts + 86400
    t = time.gmtime(ts)
    y, m = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((y, m, 1, 0, 0, 0))


def _empty(ev: str) -> dict:
    if ev == "accepted":
        return {"incoming": 0, "outgoing": 0, "total": 0}
    if ev == "delivered":
        return {"smtp": 0, "http": 0, "optimized": 0, "total": 0}
    if ev == "failed":
        return {"permanent": {**{k: 0 for k in PERMANENT}, "total": 0}, "temporary": {"espblock": 0, "total": 0}}
    return {"total": 0}


def _add(entry: dict, key: str, n: int) -> None:
    parts = key.split(".")
    ev = parts[0]
    if ev not in entry:
        return
    node = entry[ev]
    if ev == "failed":
        sub = node[parts[1]]
        sub[parts[2]] = sub.get(parts[2], 0) + n
        sub["total"] += n
    elif len(parts) > 1:
        node[parts[1]] = node.get(parts[1], 0) + n
        node["total"] += n
    else:
        node["total"] += n


def totals_sync(domain: str | None, tag: str, events: list[str], start: float, end: float,
                resolution: str) -> dict:
    """Mailgun's stats/total body for one domain (None: every domain) and scope ("" or a tag)."""
    events = [e for e in dict.fromkeys(events)]
    if not events:
        raise InputError("'event' parameter is missing")
    for e in events:
        if e not in EVENTS:
            raise InputError(f"'{e}' is not a valid event type")
    first = _floor(start, resolution)
    buckets: dict[int, dict] = {}
    t = first
    while t <= end:
        buckets[t] = {"time": rfc2822(t), **{e: _empty(e) for e in events}}
        t = _next(t, resolution)
        if len(buckets) > MAX_BUCKETS:
            raise InputError("Too many time buckets: use a coarser resolution or a shorter range")
    cond = ((StatCounter.tag == tag) & (StatCounter.hour >= int(start // 3600 * 3600))
            & (StatCounter.hour <= end))
    if domain is not None:
        cond &= StatCounter.domain == domain
    prefixes = [StatCounter.key.startswith(e) for e in events]
    any_prefix = prefixes[0]
    for p in prefixes[1:]:
        any_prefix |= p
    q = (StatCounter.select(StatCounter.hour, StatCounter.key, StatCounter.count)
         .where(cond & any_prefix).tuples())
    for hour, key, count in q:
        b = _floor(hour, resolution)
        if b in buckets:
            _add(buckets[b], key, int(count))
    return {"start": rfc2822(start), "end": rfc2822(end), "resolution": resolution,
            "stats": [buckets[k] for k in sorted(buckets)]}


def daily_items_sync(domain: str, events: list[str], skip: int, limit: int) -> dict:
    """The legacy /stats listing: one item per day and event, newest first."""
    counts: dict[tuple[int, str], int] = {}
    q = StatCounter.select(StatCounter.hour, StatCounter.key, StatCounter.count).where(
        (StatCounter.domain == domain) & (StatCounter.tag == "")).tuples()
    for hour, key, count in q:
        ev = key.split(".")[0]
        ev = {"failed": "bounced"}.get(ev, ev)
        if events and ev not in events:
            continue
        day = _floor(hour, "day")
        counts[(day, ev)] = counts.get((day, ev), 0) + int(count)
    rows = sorted(counts.items(), key=lambda kv: (-kv[0][0], kv[0][1]))
    items = [{"id": f"{day}-{ev}", "event": ev, "total_count": n, "created_at": rfc2822(day), "tags": {}}
             for (day, ev), n in rows[skip:skip + limit]]
    return {"total_count": len(rows), "items": items}
