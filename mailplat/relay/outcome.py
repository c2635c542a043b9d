"""What an outbound attempt means, recorded in the same transaction as the queue update.

Owns the classification of results (2xx delivered; 4xx, connection and TLS-policy trouble
temporary with back-off; 5xx and DNS verdicts permanent, reason by enhanced status code), the
end of retrying a temporary failure, the Mailgun `delivery-status` object, and the `*_sync`
writers that update the queue rows (store.queue), record the `delivered` / `failed` events
(core.events) and add bounces (store.models.Bounce), all inside one store write (deliveries in
batches).

Retrying ends, and the temporary failure becomes a permanent `failed` event without a bounce,
in one of two ways: the attempt that reaches relay.max_attempts (when set, > 0) fails with
reason "maxfails" (a soft bounce retried until the attempt limit, the legacy `dropped` webhook's
"maxfails"); an attempt made once the queue lifetime (relay.max_lifetime_seconds from the
first try) has run out fails with reason "old" (the message expired).  When both hold, the
attempt limit is what is reported.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from ..core import events
from ..store import queue
from ..store.models import Bounce, QueueItem

JITTER = 0.1  # +-10% on every back-off interval


@dataclass
class Result:
    """One attempt, as outcome understands it."""
    code: int
    message: str
    enhanced: str = ""
    mx_host: str = ""
    tls: bool = False
    verified: bool = False
    session_seconds: float = 0.0
    description: str = ""
    permanent: bool = False
    bounce: bool = True        # a permanent failure adds the address to the domain's bounces
    reason: str = "generic"


def classify_failure(code: int, message: str, enhanced: str, *, tls_policy: bool = False) -> tuple[bool, str, bool]:
    """(permanent, reason, adds-a-bounce) for a failed attempt."""
    if not 500 <= code < 600 or tls_policy:
        return False, "generic", False
    klass = enhanced.split(".")[1] if enhanced.count(".") == 2 else ""
    if klass == "7":
        # Policy or security refusal (blocklists, authentication): the address is fine, our
        # mail was not; Mailgun calls this an ESP block and does not suppress the address.
        return True, "espblock", False
    if klass in ("3", "4", "5", "6"):
        # Remote system, routing, protocol or content trouble: this message failed for good,
        # but the mailbox is not known to be bad.
        return True, "generic", klass in ("4",)
    # X.1.x (addressing), X.2.x (mailbox), X.0.0 or no enhanced code: a hard bounce.
    return True, "bounce", True


def retry_delay(schedule: tuple[float, ...], attempts_done: int) -> float:
    """Seconds until the next attempt after `attempts_done` attempts (>= 1), with jitter."""
    base = schedule[min(max(attempts_done, 1), len(schedule)) - 1]
    return max(0.05, base * random.uniform(1 - JITTER, 1 + JITTER))


def delivery_status(result: Result, attempt_no: int, retry_seconds: int | None = None) -> dict:
    status = {
        "code": result.code,
        "message": result.message,
        "description": result.description or result.message,
        "attempt-no": attempt_no,
        "mx-host": result.mx_host,
        "tls": result.tls,
        "certificate-verified": result.verified,
        "enhanced-code": result.enhanced,
        "session-seconds": result.session_seconds,
        "utf8": True,
    }
    if retry_seconds is not None:
        status["retry-seconds"] = retry_seconds
    return status


def _add_bounce(domain: str, address: str, code: int, error: str, now: float) -> None:
    Bounce.insert(domain=domain, address=address.lower(), code=str(code), error=error[:2000],
                  created_at=now).on_conflict(
        conflict_target=[Bounce.domain, Bounce.address],
        update={Bounce.code: str(code), Bounce.error: error[:2000], Bounce.created_at: now}).execute()


def delivered_sync(deliveries: list[tuple[QueueItem, Result]], now: float, test_mode: bool = False) -> None:
    """The recipients' servers took these copies (or test mode says they would have): one queue
    UPDATE per reply code and the `delivered` events in multi-row INSERTs, for the whole batch."""
    by_code: dict[int, list[int]] = defaultdict(list)
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for item, result in deliveries:
        by_code[result.code].append(item.id)
        message = item.message
        by_domain[message.domain].append(events.build(
            "delivered", message, item.recipient, timestamp=now,
            delivery_status=delivery_status(result, item.attempts + 1)))
    for code, ids in by_code.items():
        queue.finish_delivered_sync(ids, now=now, code=code, error="test mode: not sent" if test_mode else "")
    for domain, datas in by_domain.items():
        events.record_many_sync(domain, datas)


def failed_sync(item: QueueItem, owner: str, result: Result, now: float, schedule: tuple[float, ...],
                max_lifetime: float, max_attempts: int = 0) -> dict:
    """Record a failed attempt: a temporary one is rescheduled with back-off unless it was the
    last allowed (reason "maxfails") or the queue lifetime has run out (reason "old"); see the
    module docstring.  Returns what was decided, or {} when the lease was lost (another worker
    owns the row now)."""
    attempt_no = item.attempts + 1
    message = item.message
    permanent, reason, bounce = result.permanent, result.reason, result.bounce
    next_at = None
    retry_seconds = None
    if not permanent:
        expires = queue.lifetime_start_sync(item) + max_lifetime
        if 0 < max_attempts <= attempt_no:
            permanent, reason, bounce = True, "maxfails", False
            result.description = (f"Gave up after {attempt_no} attempts (the most allowed); "
                                  f"last error: {result.message}")
        elif now >= expires:
            permanent, reason, bounce = True, "old", False
            result.description = (f"Gave up after {attempt_no} attempts over the queue lifetime "
                                  f"({int(max_lifetime)} s); last error: {result.message}")
        else:
            delay = retry_delay(schedule, attempt_no)
            next_at = min(now + delay, expires)
            retry_seconds = max(0, round(next_at - now))
    state = "failed" if permanent else "queued"
    if not queue.finish_sync(item.id, owner, state=state, now=now, next_attempt_at=next_at,
                             code=result.code, error=result.message):
        return {}
    data = events.build("failed", message, item.recipient, timestamp=now,
                        severity="permanent" if permanent else "temporary", reason=reason,
                        delivery_status=delivery_status(result, attempt_no, retry_seconds))
    events.record_sync(message.domain, data)
    if permanent and bounce:
        _add_bounce(message.domain, item.recipient, result.code, result.message, now)
    return {"permanent": permanent, "reason": reason, "next_attempt_at": next_at}
