"""THE send path: every outgoing message enters here, whatever adapter it came from.

`submit(ctx, SendRequest)` is called by the API (/messages, /messages.mime), SMTP submission,
route forward() and mailing-list expansion.  It authorises the key for the domain, validates
addresses and header values, composes MIME (or takes the given MIME byte for byte, adding
Message-Id and Date when missing), drops suppressed recipients (a `failed` event, reason
`suppress-bounce`), and in ONE store transaction stores the body (content-addressed blob), the
Message row, one QueueItem per recipient and an `accepted` event per recipient.  It returns only
after that commit, so the caller may then answer 200 / 250.  The relay takes it from the queue
(relays in other processes of this host are poked: mailplat.triggers).
`release_bodies_sync` lets go of sent bodies past [database] keep_sent_bodies_days.
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from peewee import fn

from .. import triggers
from ..errors import ForbiddenError, InputError, NotFound, TooLarge
from ..store import blobs, queue
from ..store.db import insert_rows, run_cached
from ..store.models import Domain, Message, QueueItem
from . import compose, events, suppressions
from .compose import Addr, Attachment
from .options import Options, check_variables_size

__all__ = ["Attachment", "SendRequest", "SendResult", "submit", "MAX_RECIPIENTS",
           "register_recipient_expander"]

# async fn(ctx, domain, recipients, source) -> (recipients, recipient_variables) | None: turns
# an address into several envelope recipients (core.lists: a list into its members), each with
# its own recipient variables.  The body is still stored once.  An expander may carry
# `fn.probe_sync(recipients) -> bool`, run inside the send's own write transaction: only when
# it says yes is the transaction abandoned, the expander awaited and the write run again, so a
# send to plain addresses costs no extra store round trip.
RECIPIENT_EXPANDERS: list = []


class _ExpandFirst(Exception):
    """Raised inside _store when a probing expander claims a recipient (nothing was written)."""


def register_recipient_expander(fn) -> None:
    if fn not in RECIPIENT_EXPANDERS:
        RECIPIENT_EXPANDERS.append(fn)

MAX_RECIPIENTS = 1000
DEFAULT_MAX_BYTES = 25 * 1024 * 1024
THREAD_COMPOSE_BYTES = 256 * 1024  # compose bigger messages off the event loop


@dataclass
class SendRequest:
    domain: str                      # sending domain (the API URL's <domain>; for SMTP the authenticated domain)
    source: str                      # "api" | "smtp" | "route" | "list"
    mime: bytes | None = None        # complete message (messages.mime, SMTP DATA); else composed from fields
    recipients: list[str] | None = None   # envelope recipients; None = to+cc+bcc
    sender: str | None = None        # envelope MAIL FROM; None = address of From
    from_: str | None = None
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    amp_html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    inline: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)   # h:* extra headers
    options: Options = field(default_factory=Options)
    user_variables: dict = field(default_factory=dict)
    recipient_variables: dict = field(default_factory=dict)


@dataclass
class SendResult:
    message_id: str   # without angle brackets


@dataclass
class _Prepared:
    raw: bytes
    message_id: str
    sender: str
    recipients: list[str]
    headers: dict
    from_header: str
    subject: str
    attachments: list[dict]


def _max_bytes(ctx) -> int:
    try:
        return int(ctx.config.smtp.max_message_bytes)
    except AttributeError:
        return DEFAULT_MAX_BYTES


def _prepare(req: SendRequest, domain: str, now: float, max_bytes: int) -> _Prepared:
    """Validate and build the message (pure CPU; may run in a thread)."""
    if req.mime is not None:
        return _prepare_mime(req, domain, now, max_bytes)
    if not req.from_ or not str(req.from_).strip():
        raise InputError("from parameter is missing")
    from_addrs = compose.parse_addresses([req.from_], "from")
    if len(from_addrs) != 1:
        raise InputError("from parameter is not a valid address. please check documentation")
    to = compose.parse_addresses(req.to, "to")
    cc = compose.parse_addresses(req.cc, "cc")
    bcc = compose.parse_addresses(req.bcc, "bcc")
    if not to and req.recipients is None:
        raise InputError("to parameter is missing")
    if req.text is None and req.html is None and req.amp_html is None:
        raise InputError("Need at least one of 'text', 'html', 'amp-html' or 'template' parameters specified")
    if req.subject is not None:
        compose.check_header_value("subject", req.subject)
    headers: list[tuple[str, str]] = []
    for name, value in req.headers:
        compose.check_header_name(name)
        compose.check_header_value(f"h:{name}", str(value))
        if name.lower() in compose.RESERVED_HEADERS:
            raise InputError(f"'h:{name}' may not be set: use the '{name.lower()}' parameter")
        headers.append((name, str(value)))
    if req.recipients is not None:
        recipients = compose.unique_recipients(compose.parse_addresses(req.recipients, "to"))
    else:
        recipients = compose.unique_recipients(to + cc + bcc)
    _check_recipient_count(recipients)
    size = sum(len(x or "") for x in (req.text, req.html, req.amp_html))
    size += sum(len(a.data) for a in req.attachments + req.inline)
    if size > max_bytes:
        raise TooLarge("Message size exceeds the 25 MB limit")
    explicit_mid = next((v for n, v in headers if n.lower() == "message-id"), None)
    message_id = compose.strip_brackets(explicit_mid) if explicit_mid else compose.new_message_id(domain, now)
    if explicit_mid and ("@" not in message_id or any(c in message_id for c in " <>")):
        raise InputError("'h:Message-Id' is not a valid message id")
    from_text = from_addrs[0].formatted() if from_addrs[0].display else str(req.from_).strip()
    raw = compose.compose(from_=from_text, to=to, cc=cc, subject=req.subject, text=req.text,
                          html=req.html, amp_html=req.amp_html, attachments=req.attachments,
                          inline=req.inline, headers=headers, message_id=message_id, date=now)
    if len(raw) > max_bytes:
        raise TooLarge("Message size exceeds the 25 MB limit")
    sender = req.sender if req.sender is not None else from_addrs[0].address
    to_header = ", ".join(a.formatted() for a in to)
    attachments = [{"filename": a.filename, "content-type": "/".join(compose.guess_type(a.filename, a.content_type)),
                    "size": len(a.data)} for a in req.attachments]
    return _Prepared(raw=raw, message_id=message_id, sender=sender, recipients=recipients,
                     headers={"message-id": message_id, "from": from_text, "to": to_header,
                              "subject": req.subject or ""},
                     from_header=from_text, subject=req.subject or "", attachments=attachments)


def _prepare_mime(req: SendRequest, domain: str, now: float, max_bytes: int) -> _Prepared:
    if len(req.mime) > max_bytes:
        raise TooLarge("Message size exceeds the 25 MB limit")
    if not req.mime.strip():
        raise InputError("message parameter is missing")
    raw, message_id, parsed = compose.complete_mime(req.mime, domain, now)
    if len(raw) > max_bytes:
        raise TooLarge("Message size exceeds the 25 MB limit")
    from_text = compose.decoded(parsed, "From")
    to_text = compose.decoded(parsed, "To")
    subject = compose.decoded(parsed, "Subject")
    if req.recipients is not None:
        rcpts = req.recipients
    else:
        rcpts = list(req.to) + list(req.cc) + list(req.bcc)
    if not [r for r in rcpts if r and str(r).strip()]:
        raise InputError("to parameter is missing")
    recipients = compose.unique_recipients(compose.parse_addresses(rcpts, "to"))
    _check_recipient_count(recipients)
    if req.sender is not None:
        sender = req.sender  # "" is the null reverse-path (bounces) and stays so
    else:
        try:
            addrs = compose.parse_addresses([from_text], "from") if from_text else []
        except InputError:
            addrs = []
        sender = addrs[0].address if addrs else ""
    return _Prepared(raw=raw, message_id=message_id, sender=sender, recipients=recipients,
                     headers={"message-id": message_id, "from": from_text, "to": to_text,
                              "subject": subject},
                     from_header=from_text, subject=subject, attachments=_mime_attachments(raw))


def _mime_attachments(raw: bytes) -> list[dict]:
    """Attachment summaries for events (only when the message says it is multipart).

    compat32 parsing: header values stay raw strings, which keeps this cheap on the SMTP path."""
    head = raw[:8192].lower()
    if b"multipart/" not in head:
        return []
    import email
    from email import policy
    try:
        msg = email.message_from_bytes(raw, policy=policy.compat32)
        out = []
        for part in msg.walk():
            if part.is_multipart() or part.get_content_disposition() != "attachment":
                continue
            payload = part.get_payload(decode=True) or b""
            out.append({"filename": compose.decoded_filename(part), "content-type": part.get_content_type(),
                        "size": len(payload)})
        return out
    except Exception:  # noqa: BLE001 - a summary only; the message itself is kept as given
        return []


def _check_recipient_count(recipients: list[str]) -> None:
    if not recipients:
        raise InputError("to parameter is missing")
    if len(recipients) > MAX_RECIPIENTS:
        raise InputError(f"Too many recipients: at most {MAX_RECIPIENTS} are allowed per message")


def _check_domain(domain: str) -> None:
    row = run_cached("send.domain", lambda: Domain.select(Domain.is_disabled, Domain.state)
                     .where(Domain.name == domain), [domain]).fetchone()
    if row is None:
        raise NotFound("Domain not found")
    if row[0] or row[1] == "disabled":
        raise ForbiddenError("Domain is disabled")


async def check_sending_domain(ctx, domain: str) -> None:
    """Raises NotFound unless `domain` is one of ours, ForbiddenError when it is disabled
    (the same check the send transaction makes; for adapters that must refuse early)."""
    await ctx.store.read(_check_domain, domain)


@dataclass
class _Job:
    """One send's part of the write: what _store_many needs of it."""
    domain: str
    source: str
    prep: _Prepared
    sha: str
    options: dict
    tags: list
    campaigns: list
    user_variables: dict
    recipient_variables: dict
    next_attempt_at: float
    now: float
    clock: object
    probes: tuple = ()


def _store_many(jobs: list[_Job]) -> list:
    """The one transaction of a send (runs in the store's writer, through store.write_merged,
    for the sends that meet in one write group): domain and bounce checks, bodies, messages,
    queue rows, events, each table in one statement for all of them.  An entry of the result
    is the job's Message, or the exception that refused it (nothing of that job is written).
    Raising rolls all of it back (the writer then runs each job alone).

    Events are stamped here, at commit time rather than at request time, so their timestamps
    follow commit order closely (the events API's ascending walks rely on that)."""
    out: list = [None] * len(jobs)
    allowed: set[str] = set()
    for i, job in enumerate(jobs):
        if job.domain not in allowed:
            try:
                _check_domain(job.domain)
                allowed.add(job.domain)
            except (NotFound, ForbiddenError) as exc:
                out[i] = exc
    _probe(jobs, out)
    live = [i for i, o in enumerate(out) if o is None]
    if not live:
        return out
    suppressed: dict[tuple, dict] = {}
    for i in live:
        job = jobs[i]
        key = (job.domain, tuple(job.tags))
        suppressed.setdefault(key, {}).update({r: True for r in job.prep.recipients})
    for key, rcpts in suppressed.items():
        suppressed[key] = suppressions.suppressed_sync(key[0], list(rcpts), list(key[1]))
    blobs.put_many_sync({jobs[i].sha: jobs[i].prep.raw for i in live})
    fields = []
    for i in live:
        job, prep = jobs[i], jobs[i].prep
        fields.append(dict(
            message_id=prep.message_id, domain=job.domain, source=job.source, sender=prep.sender,
            from_header=prep.from_header[:10000], subject=prep.subject[:10000], blob=job.sha,
            size=len(prep.raw), headers=prep.headers, attachments=prep.attachments, tags=job.tags,
            campaigns=job.campaigns, user_variables=job.user_variables,
            recipient_variables=job.recipient_variables, options=job.options, created_at=job.now))
    ids = insert_rows(Message, fields, returning_ids=True)
    rows = []
    recorded: dict[str, list] = {}
    for i, message_id, values in zip(live, ids, fields):
        job = jobs[i]
        message = out[i] = Message(id=message_id, **values)
        stamp = max(job.clock(), job.now)
        dropped = suppressed[(job.domain, tuple(job.tags))]
        datas = recorded.setdefault(job.domain, [])
        for rcpt in job.prep.recipients:
            datas.append(events.build("accepted", message, rcpt, timestamp=stamp))
            if rcpt.lower() in dropped:
                datas.append(suppressions.failed_event(message, rcpt, stamp, dropped[rcpt.lower()]))
                continue
            rows.append({"message": message_id, "recipient": rcpt,
                         "rcpt_domain": rcpt.rsplit("@", 1)[1].lower(), "state": "queued", "attempts": 0,
                         "next_attempt_at": job.next_attempt_at, "created_at": job.now, "updated_at": job.now})
    for domain, datas in recorded.items():
        events.record_many_sync(domain, datas)
    for i in range(0, len(rows), 200):
        insert_rows(QueueItem, rows[i:i + 200])
    if rows:
        queue.notify_new_sync()  # wakes relays (PostgreSQL NOTIFY is delivered at commit)
    return out


def _probe(jobs: list[_Job], out: list) -> None:
    """Marks _ExpandFirst on each job (not yet refused) with a recipient a probing expander
    claims: one probe over every such job's recipients, then job by job only if it says yes."""
    for probe in dict.fromkeys(p for job in jobs for p in job.probes):
        mine = [i for i, job in enumerate(jobs) if out[i] is None and probe in job.probes]
        if mine and probe([r for i in mine for r in jobs[i].prep.recipients]):
            for i in mine:
                if probe(jobs[i].prep.recipients):
                    out[i] = _ExpandFirst()


def release_bodies_sync(before: float) -> int:
    """Sent messages created before `before` whose every queue row is delivered or failed let
    go of their body (blob ""), which store.blobs.collect_sync then deletes.  Their rows stay:
    events, tracking and feedback read the Message row, never the body."""
    pending = QueueItem.select(QueueItem.id).where(
        (QueueItem.message == Message.id) & QueueItem.state.not_in(["delivered", "failed"]))
    return Message.update(blob="").where(
        (Message.created_at < before) & (Message.blob != "") & ~fn.EXISTS(pending)).execute()


async def submit(ctx, req: SendRequest, principal=None) -> SendResult:
    domain = (req.domain or "").strip().lower().rstrip(".")
    if not domain:
        raise NotFound("Domain not found")
    if principal is not None:
        principal.require_sending(domain)
    now = ctx.clock()
    max_bytes = _max_bytes(ctx)
    check_variables_size(req.user_variables)
    big = (len(req.mime or b"") + sum(len(a.data) for a in req.attachments + req.inline)
           + len(req.html or "") + len(req.text or "")) > THREAD_COMPOSE_BYTES
    if big:
        prep = await asyncio.to_thread(_prepare, req, domain, now, max_bytes)
        sha = await asyncio.to_thread(lambda: hashlib.sha256(prep.raw).hexdigest())
    else:
        prep = _prepare(req, domain, now, max_bytes)
        sha = hashlib.sha256(prep.raw).hexdigest()
    opts = req.options
    if opts.drop_message:
        opts.testmode = True
    deliver_at = opts.deliver_at
    next_attempt_at = max(deliver_at, now) if deliver_at is not None else now
    recipient_variables = {}
    if req.recipient_variables:
        # Batch sending: each recipient gets its own copy, keyed by the envelope address.
        lower = {str(k).lower(): v for k, v in req.recipient_variables.items()}
        recipient_variables = {r: lower.get(r.lower(), {}) for r in prep.recipients}
    probes = []
    for expand in RECIPIENT_EXPANDERS:
        probe = getattr(expand, "probe_sync", None)
        if probe is not None:
            probes.append(probe)
        else:
            recipient_variables = await _expand(ctx, expand, domain, prep, req.source, recipient_variables)
    job = _Job(domain, req.source, prep, sha, opts.as_stored(), list(opts.tags), list(opts.campaigns),
               dict(req.user_variables), recipient_variables, next_attempt_at, now, ctx.clock, tuple(probes))
    try:
        await ctx.store.write_merged(_store_many, job)
    except _ExpandFirst:
        for expand in RECIPIENT_EXPANDERS:
            if getattr(expand, "probe_sync", None) is not None:
                job.recipient_variables = await _expand(ctx, expand, domain, prep, req.source,
                                                        job.recipient_variables)
        job.probes = ()
        await ctx.store.write_merged(_store_many, job)
    if next_attempt_at <= now:
        triggers.poke(ctx.config.data_dir, "queue")  # relays in other processes of this host
    return SendResult(message_id=prep.message_id)


async def _expand(ctx, expand, domain: str, prep: _Prepared, source: str, recipient_variables: dict) -> dict:
    expanded = await expand(ctx, domain, prep.recipients, source)
    if expanded is None:
        return recipient_variables
    prep.recipients, extra_vars = expanded
    if not prep.recipients:
        raise InputError("The mailing list has no subscribed members")
    return {**{r: {} for r in prep.recipients}, **recipient_variables, **extra_vars}


def addr_list(values) -> list[Addr]:
    """Parse address-list strings the way submit() does (for adapters that need it early)."""
    return compose.parse_addresses(values, "to")


from . import lists as _lists  # noqa: E402,F401 - registers the mailing-list expander
