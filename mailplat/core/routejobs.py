"""The route and list worker: what happens to an inbound message after the MX committed it.

Owns the hand-over from core.receive (a recipient source that makes RCPT accept addresses a
route or a list takes, and a job handler that turns each inbound job into a RouteJob row in the
same commit), and processing RouteJobs: the spam verdict per recipient domain (spam_action
tag/block), the route waterfall per recipient (forward to URL = a signed multipart POST queued
in the hooks outbox; forward to address = core.send.submit; store(notify=) = a StoredMessage
kept for `hooks.stored_message_days` and a POST to notify), the fan-out of mail sent to a list
address when its access_level allows (core.send.submit with the list as recipient; core.lists
expands it), and unsubscribe-<id>-<token>@ addresses.  A route, a list and a mailbox sharing an
address all get the message.  Each finished step is recorded, so a retried job never repeats
one.  Run by the hooks service (`run`).
"""
from __future__ import annotations

import asyncio
import email.parser
import os
import secrets
import socket
import time
from types import SimpleNamespace
from email import policy

from .. import logs
from ..errors import ForbiddenError, InputError, MailplatError, NotFound, TooLarge
from ..store import blobs
from ..store.models import Domain
from ..store.mailbox_models import InboundJob
from ..store.route_models import ListMember, MailingList, Route, RouteJob, SpamVerdict, StoredMessage
from . import events, forward, lists, receive, routes, send, signing, spam, verp, worker

log = logs.get("mailplat.routes")

OWNER = f"{socket.gethostname()}:{os.getpid()}"
CLAIM = 20
RETRY_SECONDS = (30.0, 120.0, 600.0, 1800.0, 3600.0)
MAX_ATTEMPTS = 12
DEFER_SECONDS = 300.0  # past this, a message with no spam verdict is filed as unchecked
_wake: asyncio.Event | None = None


# -- hand-over from core.receive ---------------------------------------------------------------------
def recipient_taken_sync(address: str, domain_row) -> bool:
    return lists.list_address_taken_sync(address) or routes.recipient_matches_sync(address)


def exact_taker_sync(address: str) -> bool:
    """A list, or a route's match_recipient, names this address: plus-addressing and the
    postmaster fallback of core.receive leave it to them."""
    return (lists.list_address_taken_sync(address)
            or (receive.memo("routes exist", Route.select(Route.id).exists)
                and routes.recipient_matches_sync(address, True)))


def job_handler_sync(job, orphans) -> None:
    """In core.receive's delivery transaction: queue the job for routes/lists when any route
    exists or a recipient is a list (or unsubscribe) address."""
    # Bounce return addresses belong to core.feedback: no route or list acts on them.
    rcpts = [r for r in job.rcpt_tos or [] if not verp.is_verp(r.rsplit("@", 1)[0])]
    if not rcpts:
        return
    interesting = (receive.memo("routes exist", Route.select(Route.id).exists)
                   or any(receive.memo(("list", r), lists.list_address_taken_sync, r) for r in rcpts))
    if not interesting or RouteJob.get_or_none(RouteJob.inbound_job == job.id) is not None:
        return
    RouteJob.insert(inbound_job=job.id, blob=job.blob, size=job.size, mail_from=job.mail_from or "",
                    rcpt_tos=rcpts, peer=job.peer or "", received_at=job.received_at, state="queued",
                    next_attempt_at=job.received_at, traced=job.traced).execute()


def _spam_action_sync(rcpt: str) -> tuple[str, str]:
    row = receive._our_domain(rcpt.rsplit("@", 1)[1])
    return (row.name, row.spam_action) if row is not None else ("", "disabled")


def spam_filter_sync(job, rcpt: str):
    """core.receive delivery filter: the spam tags for this recipient's copy, or None when its
    domain blocks spam and this is spam (a `rejected` event says so)."""
    domain, action = receive.memo(("spam", rcpt.rsplit("@", 1)[1]), _spam_action_sync, rcpt)
    if action not in ("tag", "block"):
        return b""
    row = SpamVerdict.get_or_none(SpamVerdict.inbound_job == job.id)
    if row is None and time.time() - job.received_at < DEFER_SECONDS:
        return receive.DEFER  # committed after this pass's spam check: filed on the next pass
    verdict = spam.Verdict(row.checked, row.is_spam, row.score, row.spf) if row else spam.Verdict(False)
    if action == "block" and verdict.is_spam:
        _reject_event_sync(domain, rcpt, job.mail_from or "", "", f"spam (score {verdict.score:.1f})",
                           job.received_at)
        return None
    return spam.tag_headers(verdict)


def _unchecked_jobs_sync(now: float) -> list[dict]:
    if not Domain.select(Domain.id).where(Domain.spam_action.in_(("tag", "block"))).exists():
        return []  # no domain filters spam (the usual case): one query, not three per job
    out = []
    jobs = list(InboundJob.select().where((InboundJob.state == "queued") & (InboundJob.next_attempt_at <= now))
                .order_by(InboundJob.id).limit(50))
    checked = {t[0] for t in SpamVerdict.select(SpamVerdict.inbound_job).where(
        SpamVerdict.inbound_job.in_([j.id for j in jobs])).tuples()} if jobs else set()
    actions: dict[str, str] = {}

    def action(rcpt: str) -> str:
        dom = rcpt.rsplit("@", 1)[1]
        if dom not in actions:
            actions[dom] = _spam_action_sync(rcpt)[1]
        return actions[dom]

    for job in jobs:
        if job.id in checked:
            continue
        if any(action(r) in ("tag", "block") for r in job.rcpt_tos or []):
            out.append({"inbound_job": job.id, "blob": job.blob, "peer": job.peer or "",
                        "mail_from": job.mail_from or ""})
    return out


async def spam_prepass(ctx) -> None:
    """core.receive pre-delivery step: ask spamd about due jobs whose domains filter spam."""
    for data in await ctx.store.read(_unchecked_jobs_sync, ctx.clock()):
        raw = await ctx.store.read(blobs.get_sync, data["blob"])
        await _spam_verdict(ctx, data, raw)


receive.register_recipient_source(recipient_taken_sync)
receive.register_job_handler(job_handler_sync)
receive.register_exact_taker(exact_taker_sync)
receive.DELIVERY_FILTERS.append(spam_filter_sync)
receive.PRE_DELIVERY.append(spam_prepass)


def wake() -> None:
    if _wake is not None:
        try:
            _wake.set()
        except RuntimeError:
            pass


# -- one job -----------------------------------------------------------------------------------------
def _claim(now: float, is_postgres: bool) -> list[dict]:
    q = (RouteJob.select(RouteJob.id)
         .where((RouteJob.state == "queued") & (RouteJob.next_attempt_at <= now)
                & (RouteJob.lease_until.is_null() | (RouteJob.lease_until < now)))
         .order_by(RouteJob.next_attempt_at).limit(CLAIM))
    if is_postgres:
        q = q.for_update("FOR UPDATE SKIP LOCKED")
    ids = [r.id for r in q]
    if not ids:
        return []
    RouteJob.update(lease_owner=OWNER, lease_until=now + 600).where(RouteJob.id.in_(ids)).execute()
    return [{"id": j.id, "inbound_job": j.inbound_job, "blob": j.blob, "mail_from": j.mail_from,
             "rcpt_tos": list(j.rcpt_tos), "peer": j.peer, "received_at": j.received_at, "done": set(j.done_steps or []),
             "attempts": j.attempts, "traced": j.traced} for j in RouteJob.select().where(RouteJob.id.in_(ids))]


def _context_sync(rcpts: list[str]) -> dict:
    domains = {r.rsplit("@", 1)[1] for r in rcpts}
    actions = {}
    for d in domains:
        row = receive._our_domain(d)
        actions[d] = (row.name, row.spam_action) if row is not None else (d, "disabled")
    mls = {m.address: {"access_level": m.access_level, "reply_preference": m.reply_preference,
                       "domain": m.domain, "id": m.id}
           for m in MailingList.select().where(MailingList.address.in_(rcpts))}
    return {"routes": routes.load_routes_sync(), "spam": actions, "lists": mls}


def _mark_step(job_id: int, step: str) -> None:
    row = RouteJob.get_by_id(job_id)
    done = list(row.done_steps or [])
    if step not in done:
        done.append(step)
        row.done_steps = done
        row.save()


def _is_member_sync(list_id: int, address: str) -> bool:
    return ListMember.get_or_none((ListMember.mlist == list_id) & (ListMember.address == address.lower())) is not None


class _Job:
    def __init__(self, ctx, data: dict):
        self.ctx, self.data = ctx, data
        self.id = data["id"]

    async def step(self, name: str, coro_fn) -> None:
        """Run a step once: skipped when an earlier attempt finished it."""
        if name in self.data["done"]:
            return
        await coro_fn()
        await self.ctx.store.write(_mark_step, self.id, name)
        self.data["done"].add(name)


async def _spam_verdict(ctx, data: dict, raw: bytes) -> spam.Verdict:
    row = await ctx.store.read(lambda: SpamVerdict.get_or_none(SpamVerdict.inbound_job == data["inbound_job"]))
    if row is not None:
        return spam.Verdict(row.checked, row.is_spam, row.score, row.spf)
    v = await spam.check(ctx, raw, data["peer"], data["mail_from"])

    def write():
        if SpamVerdict.get_or_none(SpamVerdict.inbound_job == data["inbound_job"]) is None:
            SpamVerdict.create(inbound_job=data["inbound_job"], checked=v.checked, is_spam=v.is_spam,
                               score=v.score, spf=v.spf, created_at=ctx.clock())
    await ctx.store.write(write)
    return v


def _reject_event_sync(domain: str, rcpt: str, mail_from: str, subject: str, reason: str, stamp: float) -> None:
    events.record_sync(domain, events.build(
        "rejected", None, rcpt, timestamp=stamp, reason=reason,
        extra={"reject": {"reason": reason, "description": f"inbound message {reason}"},
               "envelope": {"sender": mail_from, "targets": rcpt, "transport": "smtp"},
               "message": {"headers": {"subject": subject}}}))


async def process(ctx, data: dict) -> None:
    trace = SimpleNamespace(peer=data["peer"], received_at=data["received_at"], id=data["inbound_job"])
    raw = await ctx.store.read(blobs.get_sync, data["blob"])
    if not data.get("traced"):  # accepted before the MX added the trace header itself
        raw = receive.received_header(ctx.config.server.hostname, trace) + raw
    headers_msg = email.parser.BytesHeaderParser(policy=policy.compat32).parsebytes(raw[:262144])
    headers = [(n, str(v)) for n, v in headers_msg.items()]
    subject = str(headers_msg.get("Subject", ""))[:998]
    rcpts = data["rcpt_tos"]
    info = await ctx.store.read(_context_sync, rcpts)
    job = _Job(ctx, data)
    verdict = None
    if any(action != "disabled" for _, action in info["spam"].values()):
        verdict = await _spam_verdict(ctx, data, raw)
    key = None
    for rcpt in rcpts:
        domain, action = info["spam"][rcpt.rsplit("@", 1)[1]]
        body = raw
        if action == "block" and verdict is not None and verdict.is_spam:
            continue  # the delivery filter recorded the rejected event
        if action in ("tag", "block") and verdict is not None:
            body = spam.tag_headers(verdict) + raw
        rcpt_headers = headers if body is raw else list(
            email.parser.BytesHeaderParser(policy=policy.compat32).parsebytes(body[:262144]).items())
        # Unsubscribe addresses.
        m = lists.UNSUB_LOCAL.match(rcpt.split("@", 1)[0])
        if m:
            await job.step(f"{rcpt}|unsub", lambda: _unsub(ctx, m.group(1), m.group(2)))
        # Lists.
        ml = info["lists"].get(rcpt)
        if ml is not None:
            await job.step(f"{rcpt}|list", lambda: _to_list(ctx, rcpt, ml, data, body, subject))
        # Routes.
        for i, st in enumerate(routes.plan(info["routes"], rcpt, rcpt_headers)):
            name = f"{rcpt}|route|{i}|{st.kind}|{st.target}"
            if key is None and st.kind in ("forward_url", "store"):
                key = await signing.get_key(ctx)
            if st.kind == "forward_url":
                await job.step(name, lambda st=st: _post(ctx, key, "route", domain, st.target, body, rcpt,
                                                         data["mail_from"]))
            elif st.kind == "forward_address":
                await job.step(name, lambda st=st: _forward_address(ctx, domain, st.target, body, data["mail_from"]))
            else:
                await job.step(name, lambda st=st: _store(ctx, key, domain, st.target, body, rcpt, data["mail_from"]))


async def _unsub(ctx, member_id: str, token: str) -> None:
    try:
        await lists.unsubscribe(ctx, member_id, token)
    except MailplatError:
        log.info("unsubscribe mail with a bad token ignored")


async def _to_list(ctx, rcpt: str, ml: dict, data: dict, body: bytes, subject: str) -> None:
    sender = data["mail_from"]
    level = ml["access_level"]
    list_id = f"<{rcpt.replace('@', '.')}>".encode()
    head = body.split(b"\r\n\r\n", 1)[0].lower()
    if not sender or (b"\nlist-id:" in head and list_id.lower() in head):
        # A bounce (null sender) or our own copy coming back: never fan out again (mail loops).
        await ctx.store.write(_reject_event_sync, ml["domain"], rcpt, sender, subject,
                              "mailing list loop or bounce: not posted", ctx.clock())
        return
    allowed = level == "everyone" or (level == "members" and sender and await ctx.store.read(
        _is_member_sync, ml["id"], sender))
    if not allowed:
        await ctx.store.write(_reject_event_sync, ml["domain"], rcpt, sender, subject,
                              f"mailing list is {level}: sender may not post", ctx.clock())
        return
    if ml["reply_preference"] == "list" and b"\nreply-to:" not in b"\n" + body.split(b"\r\n\r\n", 1)[0].lower():
        body = f"Reply-To: {rcpt}\r\n".encode() + body
    try:
        await send.submit(ctx, send.SendRequest(domain=ml["domain"], source="list", mime=body,
                                                recipients=[rcpt], sender=rcpt))
    except (InputError, NotFound, ForbiddenError, TooLarge) as exc:
        log.warning("list fan-out refused", extra={"fields": {"list": rcpt, "error": exc.message}})


async def _forward_address(ctx, domain: str, target: str, body: bytes, mail_from: str) -> None:
    try:
        await send.submit(ctx, send.SendRequest(domain=domain, source="route", mime=body,
                                                recipients=[target], sender=mail_from or ""))
    except (InputError, NotFound, ForbiddenError, TooLarge) as exc:  # permanent: retrying cannot help
        log.warning("route forward to an address refused", extra={"fields": {"error": exc.message}})


def enqueue_post_sync(kind: str, url: str, body: bytes, content_type: str, domain: str, now: float) -> int:
    from ..store.route_models import OutboxItem
    return OutboxItem.insert(kind=kind, url=url, body=body, content_type=content_type, headers={},
                             domain=domain, state="queued", attempts=0, next_attempt_at=now,
                             created_at=now, updated_at=now).execute()


async def _post(ctx, key: str, kind: str, domain: str, url: str, body: bytes, rcpt: str, mail_from: str,
                extra: list = ()) -> None:
    sig = signing.new_signature(key, ctx.clock())
    payload, ctype = await asyncio.to_thread(forward.build, body, rcpt, mail_from, url, sig, list(extra))
    await ctx.store.write(enqueue_post_sync, kind, url, payload, ctype, domain, ctx.clock())
    _wake_outbox()


def _wake_outbox() -> None:
    for fn in OUTBOX_WAKERS:
        fn()


OUTBOX_WAKERS: list = []  # the hooks service registers its poster's wake-up here


async def _store(ctx, key: str, domain: str, notify: str, body: bytes, rcpt: str, mail_from: str) -> None:
    skey = secrets.token_urlsafe(24)
    now = ctx.clock()
    days = ctx.config.hooks.stored_message_days

    def write():
        sha = blobs.put_sync(body)
        StoredMessage.create(key=skey, domain=domain, blob=sha, size=len(body), sender=mail_from[:320],
                             recipient=rcpt[:320], created_at=now, expires_at=now + days * 86400)
    await ctx.store.write(write)
    if notify:
        url = f"{lists.api_base(ctx)}/v3/domains/{domain}/messages/{skey}"
        await _post(ctx, key, "notify", domain, notify, body, rcpt, mail_from, [("message-url", url)])


KEEP_DONE_SECONDS = 7 * 86400.0


def _purge_stored_sync(now: float) -> int:
    """Expired stored messages; finished route jobs, spam verdicts and posts after a week."""
    from ..store.route_models import OutboxItem
    before = now - KEEP_DONE_SECONDS
    RouteJob.delete().where((RouteJob.state != "queued") & (RouteJob.received_at < before)).execute()
    SpamVerdict.delete().where(SpamVerdict.created_at < before).execute()
    OutboxItem.delete().where(OutboxItem.state.in_(["delivered", "rejected"]) & (OutboxItem.updated_at < before)).execute()
    return StoredMessage.delete().where(StoredMessage.expires_at < now).execute()


def _finish(job_id: int, error: str | None, now: float) -> None:
    row = RouteJob.get_by_id(job_id)
    row.lease_owner = row.lease_until = None
    row.attempts += 1
    if error is None:
        row.state, row.last_error = "done", ""
    elif row.attempts >= MAX_ATTEMPTS:
        row.state, row.last_error = "failed", error[:1000]
    else:
        row.next_attempt_at = now + RETRY_SECONDS[min(row.attempts - 1, len(RETRY_SECONDS) - 1)]
        row.last_error = error[:1000]
    row.save()


async def process_due(ctx) -> int:
    total = 0
    while True:
        jobs = await ctx.store.write_background(_claim, ctx.clock(), ctx.store.is_postgres)
        for data in jobs:
            error = None
            try:
                await process(ctx, data)
            except Exception as exc:  # noqa: BLE001 - the job is retried later
                log.exception("route job failed; will retry", extra={"fields": {"job": data["id"]}})
                error = f"{type(exc).__name__}: {exc}"
            await ctx.store.write_background(_finish, data["id"], error, ctx.clock())
        total += len(jobs)
        if len(jobs) < CLAIM:
            return total


async def run(ctx, stopping: asyncio.Event, poll: float = 0.5) -> None:
    global _wake
    _wake = asyncio.Event()
    last_purge = 0.0

    async def step():
        nonlocal last_purge
        await process_due(ctx)
        if ctx.clock() - last_purge > 600:
            last_purge = ctx.clock()
            await ctx.store.write(_purge_stored_sync, ctx.clock())

    await worker.poll_loop("route worker", stopping, _wake, step, poll)
    _wake = None
