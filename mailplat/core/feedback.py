"""Feedback reports that come back to us by mail: ARF complaints (RFC 5965) and asynchronous
bounces, DSNs (RFC 3464).

Owns recognising a report in an inbound message and turning it into what it means:
- ARF (multipart/report; report-type=feedback-report): a `complained` event for the complaining
  recipient of the message we sent, and a complaint suppression (core.tracking_lists).
- DSN (multipart/report; report-type=delivery-status): for each recipient block, Action failed
  gives a `failed` permanent event with the DSN's status and diagnostic (reason `bounce`, and a
  bounce suppression when the status says the address is bad: 5.1.x, 5.2.x or 5.0.0, unless
  allowlisted), Action delayed a `failed` temporary event.
The original message is found by the Message-ID in the report's returned message or headers;
a report about mail we did not send changes nothing.  A DSN sent to a VERP return path
(core.verp: bounce+<token>@<domain>, the relay's MAIL FROM) is about the exact queue row the
token names, whatever its body says; anything else sent there (an auto-reply) is ignored.  Hooks into core.receive: a recipient
source accepts the [tracking] feedback_addresses local parts on our domains at RCPT (default
postmaster, abuse, fbl, bounces), and a job handler reads every inbound job that is a report,
inside the delivery transaction (so events, suppressions and webhook rows commit with it).
"""
from __future__ import annotations

import email
import re
import time
from email import policy
from email.parser import HeaderParser

from .. import logs
from ..store import blobs
from ..store.models import Bounce, Message, QueueItem
from ..store.tracking_models import Whitelist
from . import events, receive, tracking_lists, verp

log = logs.get("mailplat.feedback")
DEFAULT_LOCALS = ("postmaster", "abuse", "fbl", "bounces")
LOCALS: set[str] = set(DEFAULT_LOCALS)
MAX_REPORT = 2 * 1024 * 1024
_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_SMTP_CODE = re.compile(r"\b([245]\d\d)\b")


def configure(config) -> None:
    locals_ = getattr(getattr(config, "tracking", None), "feedback_addresses", None)
    if locals_:
        LOCALS.clear()
        LOCALS.update(x.lower() for x in locals_)


def recipient_taken_sync(address: str, domain_row) -> bool:
    local = address.rsplit("@", 1)[0].lower()
    return local in LOCALS or local.split("+", 1)[0] in LOCALS


async def _configure_pre(ctx) -> None:
    configure(ctx.config)


# -- parsing --------------------------------------------------------------------------------------
def _report_type(raw: bytes) -> str | None:
    head = raw[:16384].lower()
    if b"multipart/report" not in head:
        return None
    if b"feedback-report" in head:
        return "arf"
    if b"delivery-status" in head:
        return "dsn"
    return None


def _fields(text: str) -> list[dict]:
    """Header blocks (RFC 3464/5965 fields) separated by blank lines, names lower-cased."""
    blocks = []
    for chunk in re.split(r"\r?\n\s*\r?\n", text.strip()):
        if not chunk.strip():
            continue
        parsed = HeaderParser(policy=policy.compat32).parsestr(chunk.strip() + "\n\n")
        blocks.append({k.lower(): str(v).strip() for k, v in parsed.items()})
    return blocks


def _part_text(part) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):
        # message/delivery-status parsed into blocks by the email package
        return "\n\n".join("\n".join(f"{k}: {v}" for k, v in m.items()) for m in payload)
    raw = part.get_payload(decode=True)
    if raw is None:
        return str(payload)
    return raw.decode("utf-8", "replace")


def _original_headers(msg) -> dict:
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            inner = part.get_payload()
            inner = inner[0] if isinstance(inner, list) and inner else inner
            if hasattr(inner, "items"):
                return {k.lower(): str(v) for k, v in inner.items()}
        if ctype in ("text/rfc822-headers", "message/rfc822-headers"):
            return {k.lower(): str(v) for k, v in HeaderParser().parsestr(_part_text(part)).items()}
    return {}


def _addr(value: str) -> str:
    value = (value or "").strip()
    if ";" in value:
        value = value.split(";", 1)[1]
    return value.strip().strip("<>").strip().lower()


def parse(raw: bytes) -> dict | None:
    """{"type": "arf"|"dsn", "message_id", "recipients": [...], ...} or None."""
    kind = _report_type(raw)
    if kind is None or len(raw) > MAX_REPORT:
        return None
    msg = email.message_from_bytes(raw, policy=policy.compat32)
    if msg.get_content_type() != "multipart/report":
        return None
    original = _original_headers(msg)
    mid = original.get("message-id", "").strip().strip("<>")
    if kind == "arf":
        report = {}
        for part in msg.walk():
            if part.get_content_type() == "message/feedback-report":
                blocks = _fields(_part_text(part))
                report = blocks[0] if blocks else {}
        rcpt = _addr(report.get("original-rcpt-to", "")) or _addr(email.utils.parseaddr(original.get("to", ""))[1])
        return {"type": "arf", "message_id": mid, "recipients": [rcpt] if rcpt else [],
                "feedback_type": report.get("feedback-type", "abuse"), "user_agent": report.get("user-agent", "")}
    blocks = []
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = _fields(_part_text(part))
    per_rcpt = []
    for b in blocks[1:] if len(blocks) > 1 else blocks:
        rcpt = _addr(b.get("final-recipient", "") or b.get("original-recipient", ""))
        if not rcpt and "action" not in b:
            continue  # kept without a recipient only for a VERP return path, which names it
        per_rcpt.append({"recipient": rcpt, "action": b.get("action", "").lower(),
                         "status": b.get("status", "").split()[0] if b.get("status") else "",
                         "diagnostic": b.get("diagnostic-code", ""), "remote_mta": _addr(b.get("remote-mta", ""))})
    return {"type": "dsn", "message_id": mid, "recipients": [r["recipient"] for r in per_rcpt if r["recipient"]],
            "blocks": per_rcpt}


# -- applying -------------------------------------------------------------------------------------------
def _message_for(mid: str) -> Message | None:
    if not mid:
        return None
    return Message.select().where(Message.message_id == mid).order_by(Message.id.desc()).first()


def _hard(status: str) -> bool:
    m = _STATUS.match(status or "")
    return bool(m) and m.group(1) == "5" and (m.group(2) in ("1", "2") or status == "5.0.0")


def _verp_target(rcpt_tos) -> tuple[Message, str] | None:
    """(message, recipient) named by the first valid VERP return path among a job's recipients."""
    key = verp.key_sync()
    for address in rcpt_tos or ():
        local, _, dom = address.rpartition("@")
        queue_id = verp.queue_id_for(key, local, dom)
        if queue_id is None:
            continue
        item = QueueItem.get_or_none(QueueItem.id == queue_id)
        if item is not None and item.message.domain.lower() == dom.lower():
            return item.message, item.recipient
    return None


def _verp_blocks(blocks: list[dict], recipient: str) -> list[dict]:
    """The DSN's block for the recipient the token names: the one with that address, else the
    first failed/delayed one; its recipient is the token's whatever the DSN says."""
    acted = [b for b in blocks if b["action"] in ("failed", "delayed")]
    if not acted:
        return []
    chosen = next((b for b in acted if b["recipient"] == recipient), acted[0])
    return [{**chosen, "recipient": recipient}]


def apply_sync(report: dict, now: float, target: tuple[Message, str] | None = None) -> int:
    """Events and suppressions for one parsed report; returns how many recipients it touched.
    `target` (message, recipient) comes from a VERP return path and overrides what the report
    says about which message and recipient it is about (DSNs only)."""
    if target is not None and report["type"] == "dsn":
        message = target[0]
        report = {**report, "blocks": _verp_blocks(report["blocks"], target[1])}
    else:
        message = _message_for(report.get("message_id", ""))
    if message is None:
        return 0
    domain = message.domain
    n = 0
    if report["type"] == "arf":
        for rcpt in report["recipients"]:
            tracking_lists.add_complaint_sync(domain, rcpt, now)
            data = events.build("complained", message, rcpt, timestamp=now,
                                extra={"feedback-type": report.get("feedback_type", "abuse")})
            events.record_sync(domain, data)
            n += 1
        return n
    for block in report["blocks"]:
        action, status, rcpt = block["action"], block["status"], block["recipient"]
        if action not in ("failed", "delayed") or not rcpt:
            continue
        m = _SMTP_CODE.search(block["diagnostic"])
        code = int(m.group(1)) if m else (550 if status.startswith("5") else 450)
        diag = block["diagnostic"].split(";", 1)[-1].strip() if block["diagnostic"] else status
        # The status class decides (5.x.x permanent, 4.x.x temporary); the Action otherwise.
        permanent = status.startswith("5") if status[:1] in ("4", "5") else action == "failed"
        ds = {"code": code, "message": diag[:1000], "description": diag[:1000], "enhanced-code": status,
              "attempt-no": 1, "mx-host": block["remote_mta"], "tls": False, "certificate-verified": False,
              "bounce-type": "hard" if permanent and _hard(status) else ("soft" if not permanent else "generic")}
        reason = "bounce" if permanent and _hard(status) else "generic"
        data = events.build("failed", message, rcpt, timestamp=now,
                            severity="permanent" if permanent else "temporary", reason=reason,
                            delivery_status=ds, extra={"flags": {"is-delayed-bounce": True}})
        events.record_sync(domain, data)
        if permanent and _hard(status) and not _allowlisted(domain, rcpt):
            Bounce.insert(domain=domain, address=rcpt, code=str(code), error=diag[:2000], created_at=now).on_conflict(
                conflict_target=[Bounce.domain, Bounce.address],
                update={Bounce.code: str(code), Bounce.error: diag[:2000], Bounce.created_at: now}).execute()
        n += 1
    return n


def _allowlisted(domain: str, address: str) -> bool:
    values = [address, address.rsplit("@", 1)[-1]]
    return Whitelist.select().where((Whitelist.domain == domain) & Whitelist.value.in_(values)).exists()


def job_handler_sync(job, orphans) -> None:
    """core.receive job handler (inside the delivery transaction, once per inbound job)."""
    if job.size > MAX_REPORT:
        return
    head = blobs.head_sync(job.blob, 16384)  # most mail is no report: its headers say so
    if head is None or _report_type(head) is None:
        return
    raw = blobs.get_sync(job.blob)
    try:
        report = parse(raw)
    except Exception:  # noqa: BLE001 - a malformed report is filed as mail, never fatal
        log.warning("unreadable feedback report", extra={"fields": {"job": job.id}})
        return
    if report is not None:
        target = _verp_target(job.rcpt_tos) if any(verp.is_verp(r) for r in job.rcpt_tos or ()) else None
        n = apply_sync(report, time.time(), target)
        log.info("feedback report", extra={"fields": {"job": job.id, "type": report["type"], "recipients": n}})


receive.register_recipient_source(recipient_taken_sync)
receive.register_job_handler(job_handler_sync)
receive.PRE_DELIVERY.append(_configure_pre)
