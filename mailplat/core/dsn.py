"""Delivery status notifications (RFC 3464) for inbound mail we could not file.

Owns when such a notice is owed and what it says: core.receive gives up on a message when a
recipient's mailbox stayed full for `[mailaccess] over_quota_days`; the envelope sender then
gets one multipart/report (report-type=delivery-status) naming the recipients that failed, with
the original message's headers, sent down the one send path (core.send.submit) from
MAILER-DAEMON@<recipient domain> with the null return path, so a notice can never itself be
returned.  No notice goes to a null sender, to a MAILER-DAEMON address, or about a message that
is itself a delivery report (mail loops).
"""
from __future__ import annotations

import email.utils
import re
import secrets

from .compose import new_message_id, read_headers

MAX_HEADERS = 64 * 1024  # of the original message, returned as text/rfc822-headers
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


def owed(mail_from: str, original_head: bytes) -> bool:
    """Does the sender of this message get a notice when it fails?"""
    sender = (mail_from or "").strip().strip("<>")
    if not sender or sender.rsplit("@", 1)[0].lower() == "mailer-daemon":
        return False
    ctype = str(read_headers(original_head).get("Content-Type", "") or "").lower()
    return not (ctype.startswith("multipart/report") and "delivery-status" in ctype)


def _headers_only(original_head: bytes) -> bytes:
    m = _END_OF_HEADERS.search(original_head)
    head = original_head[:m.start()] if m else original_head[:MAX_HEADERS]
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


def build(hostname: str, domain: str, mail_from: str, failed: list[str], reason: str,
          arrived: float, now: float, original_head: bytes) -> bytes:
    """The notice: a human part, the machine-readable delivery-status part, and the headers of
    the original message.  `reason` is the SMTP reply the recipients failed with."""
    boundary = "dsn-" + secrets.token_hex(12)
    status = reason.split(" ", 2)[1] if reason.count(" ") >= 2 else "5.0.0"
    human = (f"This is the mail system at {hostname}.\r\n\r\n"
             "Your message could not be delivered to the recipients below; it has been given up\r\n"
             "after repeated attempts.\r\n\r\n"
             + "".join(f"<{r}>: {reason}\r\n" for r in failed))
    per_rcpt = "".join(f"\r\nFinal-Recipient: rfc822; {r}\r\nAction: failed\r\nStatus: {status}\r\n"
                       f"Diagnostic-Code: smtp; {reason}\r\n" for r in failed)
    parts = [
        f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{human}",
        (f"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; {hostname}\r\n"
         f"Arrival-Date: {email.utils.formatdate(arrived)}\r\n{per_rcpt}"),
    ]
    head = (f"From: Mail Delivery System <MAILER-DAEMON@{domain}>\r\n"
            f"To: <{mail_from}>\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\n"
            f"Date: {email.utils.formatdate(now)}\r\n"
            f"Message-Id: <{new_message_id(domain, now)}>\r\n"
            "Auto-Submitted: auto-replied\r\n"
            "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
            "\r\n")
    body = "".join(f"--{boundary}\r\n{p}\r\n" for p in parts)
    return (head + body).encode("ascii", "replace") + (
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode()
        + _headers_only(original_head) + f"\r\n--{boundary}--\r\n".encode())
