"""The one receive path: who we accept mail for, committing it, and filing it afterwards.

Owns: the RCPT decision (`check_recipient`: a domain that is not ours is relay denied; an
address of ours with no mailbox and no other taker is 550 5.1.1; a VERP return path
`bounce+<token>` (core.verp) is taken only with a valid token; user+tag is taken when user has
a mailbox ([smtp] recipient_delimiter); postmaster is always taken), the end-of-DATA commit
(`accept`: our Received: trace header naming the job, then the client's exact bytes, as one
content-addressed Blob plus one InboundJob row in ONE store write, the id returned only after
commit), and the inbound worker (`run_inbound_worker`) that files each job's blob as it is into
the recipients' INBOXes (linked, never copied; a per-recipient copy only when a delivery filter
adds spam tags), in passes of many jobs, never while the SMTP client waits.  An address with no
mailbox of its own that no route or list names is filed in the mailbox it stands for
(`_mailbox_for_sync`: plus-addressing, the postmaster fallback) as a copy with a Delivered-To:
header.  Mail for a mailbox that stays full for [mailaccess] over_quota_days is given up and
returned to its sender (core.dsn).  The worker also collects unreferenced blobs (store.blobs).
Called by the MX listener (smtpd) for the first two; the worker is started by the mailaccess
service (so mailaccess must run for inbound mail to reach mailboxes).  Routes and lists (next
issue) register extra recipient takers with `register_recipient_source` and consume the same
jobs via `register_job_handler`.
"""
from __future__ import annotations

import asyncio
import email.utils
import os
import re
import socket
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from .. import logs, triggers
from ..errors import ForbiddenError, InputError, NotFound, TooLarge
from ..store import blobs
from ..store.db import insert_rows, run_cached
from ..store.mailbox_models import InboundJob
from ..store.models import Blob, Domain
from . import dsn, mailboxes, send, verp, worker

log = logs.get("mailplat.receive")

BATCH_BYTES = 32 * 1024 * 1024
BATCH_JOBS = 50
RETRY_SECONDS = (60.0, 300.0, 900.0, 3600.0)
POLL_SECONDS = 0.5
MIN_PASS_SECONDS = 0.05
KEEP_DONE_SECONDS = 7 * 86400.0
GC_SECONDS = 3600.0  # blobs nothing references are collected this often
_last_purge = 0.0
_last_gc = 0.0
_bouncing = True  # jobs may be waiting for their notice (set by a pass that gives one up)
FULL_REPLY = "552 5.2.2 Mailbox full"
LOCKED_PASSWORD = "!locked"  # no argon2 hash: nothing logs in until the operator sets a password

# fn(address, domain_row) -> bool, run inside a store read: "someone other than a mailbox
# takes mail for this address" (routes, lists).
RECIPIENT_SOURCES: list[Callable] = []
# fn(address) -> bool, inside a store transaction: a route or list names this exact address (a
# catch-all does not); plus-addressing and the postmaster fallback then leave it to them.
EXACT_TAKERS: list[Callable] = []
# fn(job, rcpts_without_mailbox) run inside the delivery write transaction, once per job (on its
# first pass): routes/lists turn it into their own work rows in the same commit.
JOB_HANDLERS: list[Callable] = []
# fn(job, rcpt) -> bytes | None | DEFER, inside the delivery transaction: header lines to
# prepend to this recipient's copy (spam tags), None to not file it (blocked as spam), or DEFER
# to file it on the next pass (its spam verdict is not in yet).
DELIVERY_FILTERS: list[Callable] = []
DEFER = object()
# Filters and handlers may keep what they read once per delivery pass here (`memo`): cleared
# when each pass's transaction starts, so it is never older than that transaction.
_pass_memo: dict = {}
# async fn(ctx) run before each delivery pass, outside any transaction (the spam check).
PRE_DELIVERY: list[Callable] = []
_wake: asyncio.Event | None = None


def memo(key, fn: Callable, *args):
    """Inside a delivery filter or job handler: fn(*args), computed once per delivery pass."""
    try:
        return _pass_memo[key]
    except KeyError:
        value = _pass_memo[key] = fn(*args)
        return value


def register_recipient_source(fn: Callable) -> None:
    if fn not in RECIPIENT_SOURCES:
        RECIPIENT_SOURCES.append(fn)


def register_exact_taker(fn: Callable) -> None:
    if fn not in EXACT_TAKERS:
        EXACT_TAKERS.append(fn)


def register_job_handler(fn: Callable) -> None:
    if fn not in JOB_HANDLERS:
        JOB_HANDLERS.append(fn)


class RelayDenied(ForbiddenError):
    """Relay access denied"""
    smtp_reply = "554 5.7.1 Relay access denied"


class NoSuchUser(NotFound):
    """No such user"""
    smtp_reply = "550 5.1.1 No such user here"


def split_address(address: str) -> tuple[str, str]:
    """(local part, canonical domain) or InputError.  Source routes (@a,@b:user@c) are
    reduced to the final address (RFC 5321 4.1.1.3: we ignore them)."""
    text = (address or "").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if text.startswith("@") and ":" in text:
        text = text.split(":", 1)[1]
    local, at, dom = text.rpartition("@")
    if not at or not local or not dom or len(text) > 320 or len(local) > 64:
        raise InputError("Invalid address")
    if dom.startswith("["):
        raise RelayDenied("Relay access denied")
    from .domains import normalize_name
    try:
        dom = normalize_name(dom)
    except InputError:
        raise RelayDenied("Relay access denied") from None
    if local.startswith('"'):
        raise NoSuchUser("No such user here")
    return local.lower(), dom


def _our_domain(dom: str) -> Domain | None:
    row = Domain.get_or_none(Domain.name == dom)
    if row is not None:
        return row
    # A wildcard domain also takes mail for its subdomains.
    labels = dom.split(".")
    for i in range(1, len(labels) - 1):
        parent = Domain.get_or_none((Domain.name == ".".join(labels[i:])) & (Domain.wildcard == True))  # noqa: E712
        if parent is not None:
            return parent
    return None


def base_local(local: str, delimiter: str) -> str:
    """The local part without its plus-address detail (user+tag -> user)."""
    if not delimiter:
        return local
    return local.split(delimiter, 1)[0] or local


def _check_sync(local: str, dom: str, delimiter: str) -> str:
    row = _our_domain(dom)
    if row is None:
        return "relay"
    address = f"{local}@{dom}"
    claimed = verp.claim_sync(local, dom)  # a bounce+<token> return path: valid token or nothing
    if claimed is not None:
        return "ok" if claimed else "unknown"
    if mailboxes.mailbox_exists_sync(address):
        return "ok"
    for source in RECIPIENT_SOURCES:
        if source(address, row):
            return "ok"
    base = base_local(local, delimiter)
    if base == "postmaster":  # RFC 5321 4.5.1: always taken (_mailbox_for_sync files it)
        return "ok"
    if base != local and mailboxes.mailbox_exists_sync(f"{base}@{dom}"):
        return "ok"
    return "unknown"


async def check_recipient(ctx, address: str) -> None:
    """Raises RelayDenied (a ForbiddenError, 554 5.7.1) for a domain that is not ours and
    NoSuchUser (a NotFound, 550 5.1.1) for an address of ours nobody takes."""
    local, dom = split_address(address)
    verdict = await ctx.store.read(_check_sync, local, dom, ctx.config.smtp.recipient_delimiter)
    if verdict == "relay":
        raise RelayDenied("Relay access denied")
    if verdict == "unknown":
        raise NoSuchUser("No such user here")


async def accept(ctx, mail_from: str, rcpt_tos: list[str], raw: bytes, peer: str) -> str:
    """Commit the message and its inbound job; returns the job id only after the commit."""
    if len(raw) > ctx.config.smtp.max_message_bytes:
        raise TooLarge("Message size exceeds fixed limit")
    if not rcpt_tos:
        raise InputError("No recipients")
    now = ctx.clock()
    rcpts = []
    for r in rcpt_tos:
        local, dom = split_address(r)
        rcpts.append(f"{local}@{dom}")

    hostname = ctx.config.server.hostname

    peer = (peer or "")[:64]
    row = {"blob": "", "size": 0, "mail_from": (mail_from or "")[:320], "rcpt_tos": rcpts, "peer": peer,
           "received_at": now, "next_attempt_at": now, "traced": True}

    def write():
        # The trace header names the job id, so the row comes first; the blob is then the
        # message as every mailbox and route will get it (delivery links it, never copies it).
        # Statements with their SQL text kept (store.db): peewee would rebuild it per message.
        job_id = insert_rows(InboundJob, [row], returning_ids=True)[0]
        data = received_header(hostname, SimpleNamespace(id=job_id, peer=peer, received_at=now)) + raw
        sha = blobs.digest(data)
        insert_rows(Blob, [{"sha256": sha, "size": len(data), "data": data}], ignore_conflicts=True)
        run_cached("receive.job_blob", lambda: InboundJob.update(blob="", size=0).where(InboundJob.id == 0),
                   [sha, len(data), job_id])
        return job_id

    job_id = await ctx.store.write(write)
    if _wake is not None:
        _wake.set()
    triggers.poke(ctx.config.data_dir, "inbound")  # inbound workers in other processes
    return f"in-{job_id}"


# -- the worker ----------------------------------------------------------------------------------
def received_header(hostname: str, job: InboundJob) -> bytes:
    peer = job.peer or "unknown"
    date = email.utils.formatdate(job.received_at, localtime=False)
    return (f"Received: from [{peer}] by {hostname} (mailplat) with ESMTP id in-{job.id};\r\n"
            f"\t{date}\r\n").encode("ascii", "replace")


_TRACE = re.compile(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


_JOB_PROGRESS = [InboundJob.done_rcpts, InboundJob.attempts, InboundJob.state, InboundJob.next_attempt_at,
                 InboundJob.last_error]


def _claim(now: float, is_postgres: bool) -> list[InboundJob]:
    q = (InboundJob.select().where((InboundJob.state == "queued") & (InboundJob.next_attempt_at <= now))
         .order_by(InboundJob.next_attempt_at).limit(BATCH_JOBS))
    if is_postgres:
        q = q.for_update("FOR UPDATE SKIP LOCKED")
    out, total = [], 0
    for job in q:
        if out and total + job.size > BATCH_BYTES:
            break
        out.append(job)
        total += job.size
    return out


@dataclass(frozen=True)
class Policy:
    """The settings a delivery pass needs (from [server], [smtp] and [mailaccess])."""
    hostname: str
    delimiter: str
    postmaster_mailbox: str
    quota: int
    max_age: float

    @classmethod
    def of(cls, cfg) -> "Policy":
        return cls(cfg.server.hostname, cfg.smtp.recipient_delimiter, cfg.smtp.postmaster_mailbox.lower(),
                   cfg.mailaccess.quota_bytes, cfg.mailaccess.over_quota_days * 86400.0)


def _mailbox_for_sync(rcpt: str, policy: Policy, now: float) -> str | None:
    """The mailbox that gets mail for `rcpt`, which has no mailbox of its own: user+tag goes to
    user's mailbox, postmaster (+tag) to the domain's postmaster mailbox, else the configured
    postmaster_mailbox, else a locked postmaster@<domain> made for it (mail to postmaster is
    never lost).  None when a route or list names the address (they take it) or nobody does."""
    local, dom = rcpt.rsplit("@", 1)
    if verp.is_verp(local) or any(taker(rcpt) for taker in EXACT_TAKERS):
        return None
    base = base_local(local, policy.delimiter)
    if base != local and mailboxes.mailbox_exists_sync(f"{base}@{dom}"):
        return f"{base}@{dom}"
    row = _our_domain(dom) if base == "postmaster" else None
    if row is None:
        return None
    own = f"postmaster@{row.name}"
    if mailboxes.mailbox_exists_sync(own):
        return own
    if policy.postmaster_mailbox and mailboxes.mailbox_exists_sync(policy.postmaster_mailbox):
        return policy.postmaster_mailbox
    mailboxes.create_mailbox_sync(row.name, own, LOCKED_PASSWORD, policy.quota, now)
    log.warning("postmaster mailbox created for postmaster mail", extra={"fields": {"mailbox": own}})
    return own


def _deliver_batch(now: float, policy: Policy, is_postgres: bool) -> tuple[int, set[int]]:
    """One write transaction: claim due jobs and file each into its mailboxes."""
    _pass_memo.clear()
    try:
        return _deliver_jobs(_claim(now, is_postgres), now, policy)
    finally:
        _pass_memo.clear()


def _deliver_jobs(jobs: list[InboundJob], now: float, policy: Policy) -> tuple[int, set[int]]:
    global _bouncing
    hostname = policy.hostname
    folders: set[int] = set()
    inbox = mailboxes.InboxBatch()
    finished: list[int] = []  # done on this pass: one UPDATE for all of them
    traced = [j.blob for j in jobs if j.traced]
    present = set(mailboxes.blobs_present_sync(traced)) if traced else set()
    for job in jobs:
        if job.traced:  # the accepted blob is the final message: link it
            sha, size, body = job.blob, job.size, None
            if sha not in present:
                sha = None
        else:  # accepted before traces were added at accept: store a traced copy
            blob = Blob.get_or_none(Blob.sha256 == job.blob)
            body = None if blob is None else received_header(hostname, job) + bytes(blob.data)
            sha = None if body is None else mailboxes.put_blob_sync(body)
            size = 0 if body is None else len(body)
        if sha is None:
            job.state, job.last_error = "failed", "message body missing"
            job.save()
            log.error("inbound job has no body", extra={"fields": {"job": job.id}})
            continue
        done = list(job.done_rcpts or [])
        orphans, full, deferred = [], [], []
        for rcpt in job.rcpt_tos:
            if rcpt in done:
                continue
            prefix = b""
            for filt in DELIVERY_FILTERS:
                extra = filt(job, rcpt)
                if extra is DEFER:
                    deferred.append(rcpt)
                    break
                prefix = None if extra is None or prefix is None else prefix + extra
            if deferred and deferred[-1] == rcpt:
                continue
            if prefix is None:
                done.append(rcpt)
                continue
            target = rcpt
            if not inbox.exists(rcpt):
                # Filed elsewhere (plus-address, postmaster): the copy says where it was sent.
                target = memo(("mailbox for", rcpt), _mailbox_for_sync, rcpt, policy, now)
                prefix += b"Delivered-To: " + rcpt.encode() + b"\r\n"
            try:
                if target is None:
                    fid = None
                elif prefix:
                    if body is None:
                        body = mailboxes.blob_bytes_sync([sha])[sha]
                    trace = _TRACE.match(body)
                    cut = trace.end() if trace else 0
                    tagged = body[:cut] + prefix + body[cut:]
                    fid = inbox.deliver(target, mailboxes.put_blob_sync(tagged), len(tagged), job.received_at)
                else:
                    fid = inbox.deliver(target, sha, size, job.received_at)
            except mailboxes.OverQuota:
                full.append(rcpt)
                continue
            if fid is None:
                orphans.append(rcpt)
            else:
                folders.add(fid)
            done.append(rcpt)
        if job.attempts == 0:  # handlers see each job once, whatever mailbox retries follow
            for handler in JOB_HANDLERS:
                handler(job, orphans)
        if orphans and not JOB_HANDLERS:
            log.warning("inbound recipients without a mailbox", extra={"fields": {"job": job.id, "count": len(orphans)}})
        job.done_rcpts = done
        job.attempts += 1
        if full:
            if now - job.received_at >= policy.max_age:
                # Given up: "bouncing" until the sender has its notice (_return_to_senders).
                job.state, job.last_error = "bouncing", f"mailbox full: {', '.join(full)}"[:1000]
                _bouncing = True
            else:
                delay = RETRY_SECONDS[min(job.attempts - 1, len(RETRY_SECONDS) - 1)]
                job.next_attempt_at, job.last_error = now + delay, "mailbox full"
        elif deferred:
            job.next_attempt_at = now
        else:  # done_rcpts only matters while a job is queued: not rewritten here
            finished.append(job.id)
            continue
        job.save(only=_JOB_PROGRESS)
    inbox.flush()
    for i in range(0, len(finished), 500):
        InboundJob.update(state="done", attempts=InboundJob.attempts + 1).where(
            InboundJob.id.in_(finished[i:i + 500])).execute()
    return len(jobs), folders


def _purge_sync(before: float) -> int:
    return InboundJob.delete().where((InboundJob.state == "done") & (InboundJob.received_at < before)).execute()


NOTICE_LEASE = 600.0
_OWNER = f"{socket.gethostname()}:{os.getpid()}"


def _claim_bouncing_sync(now: float) -> list[tuple[InboundJob, bytes]]:
    """Jobs owed a notice, leased to this process (another worker process does not send the
    same notice meanwhile; a crashed one's lease runs out)."""
    jobs = list(InboundJob.select().where((InboundJob.state == "bouncing") & (
        InboundJob.lease_until.is_null() | (InboundJob.lease_until < now))).order_by(InboundJob.id).limit(BATCH_JOBS))
    out = []
    for j in jobs:
        unchanged = InboundJob.lease_until.is_null() if j.lease_until is None else InboundJob.lease_until == j.lease_until
        if InboundJob.update(lease_owner=_OWNER, lease_until=now + NOTICE_LEASE).where(
                (InboundJob.id == j.id) & unchanged).execute():
            out.append((j, blobs.head_sync(j.blob, dsn.MAX_HEADERS) or b""))
    return out


def _bounced_sync(job_id: int) -> None:
    InboundJob.update(state="failed").where((InboundJob.id == job_id) & (InboundJob.state == "bouncing")).execute()


async def _return_to_senders(ctx) -> None:
    """A delivery status notification to the sender of each message given up on (at least
    once: a crash before the job is marked failed sends it again), then the job is failed."""
    global _bouncing
    if not _bouncing:
        return
    _bouncing = False
    for job, head in await ctx.store.write_background(_claim_bouncing_sync, ctx.clock()):
        _bouncing = True  # look again next pass: there may be more than one batch
        failed = [r for r in job.rcpt_tos if r not in (job.done_rcpts or [])]
        if failed and dsn.owed(job.mail_from, head):
            domain = await ctx.store.read(lambda: _our_domain(failed[0].rsplit("@", 1)[1]))
            if domain is not None:
                notice = dsn.build(ctx.config.server.hostname, domain.name, job.mail_from, failed, FULL_REPLY,
                                   job.received_at, ctx.clock(), head)
                try:
                    await send.submit(ctx, send.SendRequest(domain=domain.name, source="dsn", mime=notice,
                                                            recipients=[job.mail_from], sender=""))
                except (InputError, NotFound, ForbiddenError, TooLarge) as exc:  # permanent
                    log.warning("delivery status notification refused",
                                extra={"fields": {"job": job.id, "error": exc.message}})
        log.info("inbound message given up", extra={"fields": {"job": job.id, "failed": len(failed)}})
        await ctx.store.write(_bounced_sync, job.id)


async def collect_garbage(ctx, grace: float) -> int:
    """Sent bodies past [database] keep_sent_bodies_days are let go (core.send), then every
    blob stored more than `grace` seconds ago that nothing references is deleted."""
    days = ctx.config.database.keep_sent_bodies_days
    if days > 0:
        await ctx.store.write_background(send.release_bodies_sync, ctx.clock() - days * 86400.0)
    return await ctx.store.write_background(blobs.collect_sync, time.time() - grace)


async def deliver_due(ctx) -> int:
    """Deliver every due job now (the worker's step; tests and the CLI may call it).  Done jobs
    are kept KEEP_DONE_SECONDS for diagnosis, then removed; every GC_SECONDS blobs nothing
    references any more are deleted (store.blobs.collect_sync)."""
    global _last_purge, _last_gc, _bouncing
    if ctx.clock() - _last_purge > 600:
        _last_purge = ctx.clock()
        await ctx.store.write(_purge_sync, ctx.clock() - KEEP_DONE_SECONDS)
    if ctx.clock() - _last_gc > GC_SECONDS:
        _last_gc = ctx.clock()
        _bouncing = True  # notices another process leased and never sent (it died) are retaken
        n = await collect_garbage(ctx, blobs.GRACE_SECONDS)
        if n:
            log.info("unreferenced blobs deleted", extra={"fields": {"count": n}})
    for pre in PRE_DELIVERY:
        await pre(ctx)
    total = 0
    policy = Policy.of(ctx.config)
    while True:
        n, folders = await ctx.store.write_background(_deliver_batch, ctx.clock(), policy, ctx.store.is_postgres)
        if folders:
            mailboxes.changed(*folders)
        total += n
        if n < BATCH_JOBS:
            break
    await _return_to_senders(ctx)
    return total


def wake() -> None:
    """Run the worker's next pass now (accept() does this; so does a stopping service)."""
    if _wake is not None:
        _wake.set()


async def run_inbound_worker(ctx, stopping: asyncio.Event) -> None:
    """Files inbound jobs until `stopping` is set; woken at once by accept() in this process
    or, through mailplat.triggers, in another process of this host; else polling every
    POLL_SECONDS (jobs committed on other hosts)."""
    global _wake
    _wake = asyncio.Event()
    trigger = triggers.listen(ctx.config.data_dir, "inbound", _wake.set)
    log.info("inbound worker started", extra={"fields": {"pid": os.getpid(), "host": socket.gethostname()}})
    # Under load, wake-ups come with every accepted message: passes at most every
    # MIN_PASS_SECONDS gather them into fuller delivery transactions (each pass has a fixed
    # cost of a dozen statements), at the price of that much delivery latency.
    try:
        await worker.poll_loop("inbound delivery", stopping, _wake, lambda: deliver_due(ctx),
                               POLL_SECONDS, MIN_PASS_SECONDS)
    finally:
        if trigger is not None:
            trigger.close()
        _wake = None


from . import routejobs as _routejobs  # noqa: E402,F401 - routes, lists and spam register their hooks
from . import feedback as _feedback  # noqa: E402,F401 - ARF complaints and DSN bounces register theirs
