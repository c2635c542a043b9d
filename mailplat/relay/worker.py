"""The relay's worker loop: claim due queue rows, prepare each copy, deliver, record outcomes.

Owns scheduling inside one relay process.  A dispatcher leases due rows (store.queue.claim_sync)
in batches while fewer than `8 x relay.workers` are in hand, groups them by recipient domain (the
destination) and runs up to `relay.per_destination` destination tasks per domain, at most
`relay.workers` connections in all.  A destination task resolves MX (relay.mx), opens one
connection (relay.client) and delivers every waiting row for that domain over it (reopening only
when a message needs a different TLS policy).  A connection with nothing left to send stays open
for `relay.idle_seconds`, for rows claimed next (a connection cache: without it, a busy relay
opened a connection every few messages); it closes at once when a task for another destination
waits for a connection slot, or when the relay stops.

Each copy is rendered for its recipient (core.render; in a thread, unless it goes out as stored)
and DKIM-signed by a helper process (relay.signer; in a thread when there is none) while the
previous one is on the wire.  API and SMTP submitted mail goes out with a VERP return path
(core.verp) so its bounces come back to us.  Outcomes are written by relay.outcome in the same
transaction as the queue update; deliveries in batches (those that finish while the previous
batch is being written go in the next).  Test-mode messages are marked delivered without any
network I/O.

Wake-ups: in-process wakers, pokes from this host's other processes (mailplat.triggers, topic
"queue") and PostgreSQL LISTEN (store.queue); polling with a short back-off, never later than
the next due row, is the backstop.  Time comes from `ctx.clock`; when the
environment variable MAILPLAT_TEST_CLOCK_FILE is set (TESTS ONLY) the relay's clock is
time.time() plus the number of seconds written in that file, so a test can move it forward.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from .. import logs, triggers
from ..core import render, tracking, verp
from ..core.domains import signing_key_of_sync
from ..mailauth import dkim as dkimsign
from ..mailauth.tlspolicy import TlsPolicy, policy_for
from ..store import blobs, queue
from ..store.models import Domain, QueueItem
from . import client, outcome, signer
from .mx import MxError, MxResolver

log = logs.get("mailplat.relay")

CLAIM_BATCH = 100
# Rows in hand per connection slot (relay.workers): waiting, being signed, on the wire, or
# delivered with the outcome not yet committed.  At 4 the destinations ran dry while claims and
# outcome commits were under way; 8 delivered 15-20% more per second to a local sink.
IN_HAND_PER_WORKER = 8
POLL_MIN = 0.02
POLL_MAX_SQLITE = 1.0
POLL_MAX_LISTEN = 5.0
STOP_TIMEOUT = 30.0
TEST_CLOCK_ENV = "MAILPLAT_TEST_CLOCK_FILE"


def make_clock(default):
    """The relay's clock: ctx.clock, or (tests only) time.time() + the offset in the file named
    by MAILPLAT_TEST_CLOCK_FILE."""
    path = os.environ.get(TEST_CLOCK_ENV)
    if not path:
        return default
    cache = {"mtime": None, "offset": 0.0}

    def clock() -> float:
        try:
            st = os.stat(path)
            if st.st_mtime_ns != cache["mtime"]:
                with open(path) as fh:
                    cache["offset"] = float(fh.read().strip() or 0)
                cache["mtime"] = st.st_mtime_ns
        except (OSError, ValueError):
            pass
        return time.time() + cache["offset"]
    return clock


@dataclass
class Job:
    item: QueueItem
    raw: bytes | None
    domain_row: Domain | None
    signing: tuple[str, str, str] | None
    policy: TlsPolicy = field(default_factory=TlsPolicy)
    tracking: object = None  # core.tracking.Plan: pixel, links, unsubscribe URLs, footers
    mail_from: str | None = None  # envelope sender: core.verp return path, else message.sender

    @property
    def message(self):
        return self.item.message

    @property
    def test_mode(self) -> bool:
        return bool((self.message.options or {}).get("testmode"))


def _load_jobs_sync(ids: list[int]) -> list[Job]:
    items = queue.load_sync(ids)
    raws = blobs.get_many_sync(item.message.blob for item in items)
    domains: dict[str, Domain | None] = {}
    keys: dict[str, tuple | None] = {}
    jobs = []
    for item in items:
        msg = item.message
        if msg.domain not in domains:
            row = domains[msg.domain] = Domain.get_or_none(Domain.name == msg.domain)
            keys[msg.domain] = None if row is None else signing_key_of_sync(row)
        jobs.append(Job(item=item, raw=raws.get(msg.blob), domain_row=domains[msg.domain],
                        signing=keys[msg.domain],
                        policy=policy_for(domains[msg.domain], msg.options),
                        tracking=tracking.plan_sync(msg, item.recipient, domains[msg.domain]),
                        mail_from=verp.return_path_sync(msg, item.id)))
    return jobs


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


class Worker:
    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.config.relay
        self.clock = make_clock(ctx.clock)
        self.host = socket.gethostname()[:30]
        self.owner = f"{self.host}:{os.getpid()}:{secrets.token_hex(4)}"
        self.mx = MxResolver(ctx.resolver, allow_private=self.cfg.allow_private_mx)
        self.helo = ctx.config.server.hostname
        # Rows in hand: enough to keep every connection busy, few enough to leave the rest to
        # other relay processes.  Claims wait until a quarter of them fit: batches, yet claimed
        # while the destination tasks still have rows waiting.
        self.max_inflight = self.cfg.workers * IN_HAND_PER_WORKER
        self.claim_min = max(1, min(CLAIM_BATCH, self.max_inflight) // 4)
        self.inflight: dict[int, Job] = {}
        self.pending: dict[str, deque[Job]] = defaultdict(deque)
        self.dest_tasks: dict[str, int] = defaultdict(int)
        self.tasks: set[asyncio.Task] = set()
        self.conn_slots = asyncio.Semaphore(self.cfg.workers)
        self.slot_wanted = 0  # destination tasks waiting for a connection slot
        # Destination tasks whose connection is idle, by domain: each waits on its future for
        # True (rows arrived: go on) or False (close: time is up, a slot is wanted, stopping).
        self.idle: dict[str, list[asyncio.Future]] = defaultdict(list)
        self.wake = asyncio.Event()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listener: queue.Listener | None = None
        self.signer: signer.SignerPool | None = None
        self.trigger: triggers.Listener | None = None
        self.dispatcher: asyncio.Task | None = None
        self.renewer: asyncio.Task | None = None
        self.delivered = 0
        # Deliveries whose outcome is not written yet; one writer task takes them in batches.
        self.to_record: list[tuple[Job, outcome.Result]] = []
        self.recording = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        released = await self.ctx.store.write(queue.release_dead_owners_sync, self.host, self.clock(), _pid_runs)
        if released:
            logs.event(log, "leases of a dead relay process released", rows=released)
        if self.cfg.signing_processes:
            self.signer = signer.SignerPool(self.cfg.signing_processes)
            await self.signer.start()
        queue.add_waker(self._wake_threadsafe)
        self.trigger = triggers.listen(self.ctx.config.data_dir, "queue", self.wake.set)
        if self.ctx.store.is_postgres:
            self.listener = queue.Listener(self.ctx.store.url, self._wake_threadsafe)
            self.listener.start()
        self.dispatcher = asyncio.create_task(self._dispatch(), name="relay-dispatch")
        self.renewer = asyncio.create_task(self._renew_leases(), name="relay-leases")
        logs.event(log, "relay started", owner=self.owner, workers=self.cfg.workers,
                   per_destination=self.cfg.per_destination)

    async def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        for domain in list(self.idle):
            self._end_idle(domain, False)
        queue.remove_waker(self._wake_threadsafe)
        if self.trigger is not None:
            self.trigger.close()
        if self.listener:
            await asyncio.to_thread(self.listener.stop)
        if self.dispatcher:
            await self.dispatcher
        if self.renewer:
            self.renewer.cancel()
            await asyncio.gather(self.renewer, return_exceptions=True)
        not_started = [job.item.id for jobs in self.pending.values() for job in jobs]
        for jobs in self.pending.values():
            jobs.clear()
        for item_id in not_started:
            self.inflight.pop(item_id, None)
        if not_started:
            await self.ctx.store.write(queue.release_sync, self.owner, not_started)
        # Tasks may start others (a finished delivery starts the outcome writer): wait for all.
        deadline = self.loop.time() + STOP_TIMEOUT
        while self.tasks and self.loop.time() < deadline:
            await asyncio.wait(set(self.tasks), timeout=deadline - self.loop.time())
        still = set(self.tasks)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=5)
            log.warning("relay stopped with %d deliveries unfinished (their leases will expire)", len(still))
        if self.signer is not None:
            await self.signer.close()
        logs.event(log, "relay stopped", owner=self.owner, released=len(not_started))

    async def _renew_leases(self) -> None:
        """Keep the leases of rows in hand (waiting or being delivered) from running out, so a
        slow destination never lets another relay claim a row this one will still send.  A
        row whose lease was lost anyway (say the store was unreachable for a lease period) is
        dropped from the waiting lists: its new owner delivers it."""
        period = max(0.2, self.cfg.lease_seconds / 3)
        while not self.stopping:
            await asyncio.sleep(period)
            ids = list(self.inflight)
            if not ids:
                continue
            try:
                held = await self.ctx.store.write(queue.renew_sync, self.owner, ids,
                                                  self.clock() + self.cfg.lease_seconds)
            except Exception:  # noqa: BLE001 - try again next period
                log.exception("renewing leases failed")
                continue
            lost = set(ids) - held
            if not lost:
                continue
            for domain, jobs in list(self.pending.items()):
                for job in [j for j in jobs if j.item.id in lost]:
                    jobs.remove(job)
                    self._done(job)
                    log.warning("lease on queue row %s lost before delivery; left to its new owner", job.item.id)

    def _wake_threadsafe(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.wake.set)

    # -- dispatch ----------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        idle = POLL_MIN
        poll_max = POLL_MAX_LISTEN if self.listener else POLL_MAX_SQLITE
        while not self.stopping:
            self.wake.clear()
            claimed = 0
            room = self.max_inflight - len(self.inflight)
            try:
                if room < self.claim_min:
                    # Busy: woken when deliveries finish; claiming then in batches keeps the
                    # store round trips (claim, load) per message low.
                    timeout = poll_max
                else:
                    claimed = await self._claim(min(room, CLAIM_BATCH))
                    if claimed == CLAIM_BATCH and room > CLAIM_BATCH:
                        continue  # more may be due right now
                    if claimed:
                        idle = POLL_MIN
                        timeout = poll_max
                    else:
                        now = self.clock()
                        due = await self.ctx.store.read(queue.next_due_sync, now)
                        timeout = min(poll_max, idle) if due is None else max(0.0, min(due - now, poll_max, idle))
                        idle = min(idle * 2, poll_max)
            except Exception:  # noqa: BLE001 - store trouble: log, back off, carry on
                log.exception("relay dispatch failed")
                timeout = poll_max
            if self.stopping:
                break
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
                idle = POLL_MIN
            except asyncio.TimeoutError:
                pass

    async def _claim(self, limit: int) -> int:
        ids = await self.ctx.store.write_background(queue.claim_sync, self.owner, self.clock(),
                                         self.cfg.lease_seconds, limit)
        if not ids:
            return 0
        jobs = await self.ctx.store.read(_load_jobs_sync, ids)
        test_jobs = []
        for job in jobs:
            self.inflight[job.item.id] = job
            if job.test_mode:
                test_jobs.append(job)
            else:
                self.pending[job.item.rcpt_domain].append(job)
        if test_jobs:
            self._spawn(self._deliver_test_mode(test_jobs))
        for domain in list(self.pending):
            self._end_idle(domain, True)
            self._ensure_destinations(domain)
        return len(ids)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _ensure_destinations(self, domain: str) -> None:
        waiting = len(self.pending.get(domain, ()))
        while waiting > self.dest_tasks[domain] and self.dest_tasks[domain] < self.cfg.per_destination:
            self.dest_tasks[domain] += 1
            self._spawn(self._destination(domain))

    def _done(self, job: Job) -> None:
        self.inflight.pop(job.item.id, None)
        self.wake.set()

    # -- delivery ----------------------------------------------------------------------------
    async def _deliver_test_mode(self, jobs: list[Job]) -> None:
        """o:testmode: accepted and reported delivered, nothing leaves the host."""
        await self._record_delivered(
            [(job, outcome.Result(code=250, message="OK", description="Test mode: not sent")) for job in jobs],
            test_mode=True)

    async def _destination(self, domain: str) -> None:
        try:
            async with self._slot():
                session: client.Session | None = None
                ahead: tuple[Job, asyncio.Future] | None = None
                try:
                    while True:
                        # Pipelined: the next copy is rendered and signed while the current one
                        # is on the wire; outcomes are written in the background.
                        while ahead is not None or self.pending.get(domain):
                            if ahead is None:
                                job = self.pending[domain].popleft()
                                prepared = self._prepare_soon(job)
                            else:
                                (job, prepared), ahead = ahead, None
                            if self.pending.get(domain):
                                nxt = self.pending[domain].popleft()
                                ahead = (nxt, self._prepare_soon(nxt))
                            session = await self._deliver(job, prepared, session)
                        if not await self._linger(domain, session):
                            break
                finally:
                    if session is not None:
                        await session.close()
        finally:
            self.dest_tasks[domain] -= 1
            if self.pending.get(domain):
                # Claimed while this task was closing its session (it still counted as
                # running, so no task was started for them): start one now.
                if not self.stopping:
                    self._ensure_destinations(domain)
            else:
                self.pending.pop(domain, None)
                if self.dest_tasks[domain] <= 0:
                    self.dest_tasks.pop(domain, None)

    @contextlib.asynccontextmanager
    async def _slot(self):
        """One of relay.workers connection slots.  While a task waits for one, idle connections
        give theirs up: one at once, and any that falls idle later instead of lingering."""
        self.slot_wanted += 1
        try:
            if self.conn_slots.locked():
                self._close_an_idle_connection()
            await self.conn_slots.acquire()
        finally:
            self.slot_wanted -= 1
        try:
            yield
        finally:
            self.conn_slots.release()

    async def _linger(self, domain: str, session: client.Session | None) -> bool:
        """Keep an idle connection open for more rows to its destination: True when some
        arrived, False when it should close."""
        if (session is None or not session.open or self.stopping or self.cfg.idle_seconds <= 0
                or self.slot_wanted):
            return False
        waiter = self.loop.create_future()
        waiters = self.idle[domain]
        waiters.append(waiter)
        try:
            async with asyncio.timeout(self.cfg.idle_seconds):
                return await waiter
        except TimeoutError:
            return False
        finally:
            waiters.remove(waiter)
            if not waiters:
                self.idle.pop(domain, None)

    def _end_idle(self, domain: str, go_on: bool) -> None:
        for waiter in self.idle.get(domain, ()):
            if not waiter.done():
                waiter.set_result(go_on)

    def _close_an_idle_connection(self) -> None:
        """Another destination waits for a connection slot: an idle connection (the first
        found) gives its slot up."""
        for waiters in self.idle.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(False)
                    return

    def _prepare_soon(self, job: Job) -> asyncio.Future:
        return asyncio.ensure_future(self._prepare(job))

    async def _prepare(self, job: Job) -> bytes:
        """The exact bytes for this recipient: rendered, then DKIM-signed.  Work over the whole
        message runs on the event loop only for a small one (client.INLINE_BYTES)."""
        message, raw = job.message, job.raw
        if raw is None:
            return b""  # the body is missing: _deliver records that and sends nothing
        if len(raw) <= client.INLINE_BYTES and render.verbatim(message, raw, job.tracking):
            data = raw
        else:
            data = await asyncio.to_thread(render.for_recipient, message, raw, job.item.recipient,
                                           tracking=job.tracking)
        if (message.options or {}).get("dkim") is False or job.signing is None:
            return await client.whole_message(dkimsign.normalize_crlf, data)
        d, selector, pem = job.signing
        if self.signer is not None:
            data = await client.whole_message(dkimsign.canonical_lines, data)
            try:
                return await self.signer.signature(data, d, selector, pem) + data
            except signer.SignerUnavailable:
                pass
        return await asyncio.to_thread(dkimsign.sign, data, d, selector, pem)

    async def _deliver(self, job: Job, prepared: asyncio.Future,
                       session: client.Session | None) -> client.Session | None:
        item = job.item
        with logs.context(queue_id=item.id, message_id=job.message.message_id, recipient=item.recipient):
            if job.raw is None:
                prepared.cancel()
                await self._record(job, outcome.Result(code=451, message="4.3.0 Message body missing from the store"))
                return session
            try:
                data = await prepared
            except Exception as exc:  # noqa: BLE001 - our bug is a temporary failure, never a bounce
                log.exception("preparing the message failed")
                await self._record(job, outcome.Result(code=451, message=f"4.3.0 Local error preparing the message: {exc}"))
                return session
            for second_try in (False, True):
                if session is not None and (not session.open or session.policy != job.policy):
                    await session.close()
                    session = None
                if session is None and (session := await self._connect(job)) is None:
                    return None
                reused = session.sent > 0
                try:
                    accepted = await session.send(
                        job.message.sender if job.mail_from is None else job.mail_from, item.recipient, data)
                    break
                except client.DeliveryError as exc:
                    if reused and not second_try and exc.stage == "mail" and not session.usable:
                        # A kept connection the remote closed as this copy went out (nothing
                        # was accepted): it goes out once more over a new connection.
                        log.debug("kept connection to %s was closed; reconnecting", session.host)
                        continue
                    self._spawn(self._record(job, self._error_result(exc)))
                    return session
                except Exception as exc:  # noqa: BLE001 - our bug: temporary, and the session is dropped
                    log.exception("sending failed unexpectedly")
                    await session.close()
                    self._spawn(self._record(job, outcome.Result(code=451, message=f"4.3.0 Local error while sending: {exc}")))
                    return None
            self._delivered(job, outcome.Result(
                code=accepted.code, message=accepted.message, enhanced=accepted.enhanced,
                mx_host=accepted.mx_host, tls=accepted.tls, verified=accepted.verified,
                session_seconds=accepted.session_seconds))
            return session

    async def _connect(self, job: Job) -> client.Session | None:
        """A session for this job's destination and TLS policy; None when there is none (the
        failure is recorded for the job and the others waiting for that destination)."""
        try:
            hosts = await self.mx.resolve(job.item.rcpt_domain)
            return await client.connect(
                hosts, job.policy, port=self.cfg.remote_port, ca_file=self.cfg.ca_file, helo=self.helo,
                connect_timeout=self.cfg.connect_timeout, command_timeout=self.cfg.command_timeout)
        except MxError as exc:
            await self._fail_destination(job, self._mx_result(exc))
        except client.DeliveryError as exc:
            await self._fail_destination(job, self._error_result(exc))
        except Exception as exc:  # noqa: BLE001 - our bug: temporary, never a bounce
            log.exception("connecting failed unexpectedly")
            await self._record(job, outcome.Result(code=451, message=f"4.3.0 Local error while connecting: {exc}"))
        return None

    async def _fail_destination(self, job: Job, result: outcome.Result) -> None:
        """A destination-level failure (DNS, no connection, TLS policy) applies to every waiting
        row for that domain under the same policy: record it for all instead of retrying each."""
        same = [j for j in self.pending.get(job.item.rcpt_domain, ()) if j.policy == job.policy]
        for other in same:
            self.pending[job.item.rcpt_domain].remove(other)
        for j in [job] + same:
            await self._record(j, outcome.Result(**{**result.__dict__}))

    def _mx_result(self, exc: MxError) -> outcome.Result:
        if exc.permanent:
            null_mx = "null MX" in exc.message
            code, enhanced = (556, "5.1.10") if null_mx else (550, "5.1.2")
            return outcome.Result(code=code, message=f"{enhanced} {exc.message}", enhanced=enhanced,
                                  permanent=True, reason="bounce", bounce=True)
        return outcome.Result(code=451, message=f"4.4.3 {exc.message}", enhanced="4.4.3")

    def _error_result(self, exc: client.DeliveryError) -> outcome.Result:
        permanent, reason, bounce = outcome.classify_failure(exc.code, exc.message, exc.enhanced,
                                                             tls_policy=exc.tls_policy)
        message = exc.message
        enhanced = exc.enhanced
        if exc.tls_policy and not enhanced:
            enhanced = "4.7.5" if "certificate" in message else "4.7.4"
            message = f"{enhanced} {message}"
        elif not enhanced and exc.stage == "connect":
            enhanced = "4.4.1"
        return outcome.Result(code=exc.code, message=message, enhanced=enhanced, mx_host=exc.mx_host,
                              tls=exc.tls, verified=exc.verified, permanent=permanent, reason=reason,
                              bounce=bounce)

    def _delivered(self, job: Job, result: outcome.Result) -> None:
        """Hand a delivery to the outcome writer: while one batch is being written, the next
        gathers, so a busy relay writes many outcomes per store job."""
        self.to_record.append((job, result))
        if not self.recording:
            self.recording = True
            self._spawn(self._write_delivered())

    async def _write_delivered(self) -> None:
        try:
            while self.to_record:
                batch, self.to_record = self.to_record, []
                await self._record_delivered(batch)
        finally:
            self.recording = False

    async def _record_delivered(self, batch: list[tuple[Job, outcome.Result]], test_mode: bool = False) -> None:
        try:
            await self.ctx.store.write_background(
                outcome.delivered_sync, [(job.item, result) for job, result in batch], self.clock(), test_mode)
            self.delivered += len(batch)
            for job, result in batch:
                logs.event(log, "delivered", queue_id=job.item.id, recipient=job.item.recipient,
                           mx_host=result.mx_host, code=result.code, tls=result.tls)
        except Exception:  # noqa: BLE001 - not recorded: the leases expire and the rows are retried
            log.exception("recording %d deliveries failed", len(batch))
        finally:
            for job, _ in batch:
                self._done(job)

    async def _record(self, job: Job, result: outcome.Result) -> None:
        """A failed attempt: rescheduled or given up on (relay.outcome decides)."""
        try:
            decided = await self.ctx.store.write_background(outcome.failed_sync, job.item, self.owner, result,
                                                            self.clock(), self.cfg.retry_schedule,
                                                            self.cfg.max_lifetime_seconds, self.cfg.max_attempts)
            logs.event(log, "delivery failed", level=logging.WARNING, queue_id=job.item.id,
                       recipient=job.item.recipient, code=result.code, error=result.message,
                       permanent=decided.get("permanent"), lease_lost=not decided)
        except Exception:  # noqa: BLE001 - not recorded: the lease expires and the row is retried
            log.exception("recording the outcome failed")
        finally:
            self._done(job)
