"""Dates at the edges: RFC 2822 strings (Mailgun's format) to and from epoch seconds."""
from __future__ import annotations

import email.utils
import time

from ..errors import InputError


def rfc2822(ts: float | None = None) -> str:
    """'Thu, 13 Oct 2011 18:02:00 GMT'-style date for an epoch time (UTC)."""
    return email.utils.formatdate(time.time() if ts is None else ts, usegmt=True)


def parse_time(value: str, field: str = "date") -> float:
    """Epoch seconds from an RFC 2822 date or an epoch number (int or float)."""
    value = (value or "").strip()
    if not value:
        raise InputError(f"'{field}' parameter is not a valid date")
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise InputError(f"'{field}' parameter is not a valid date") from None
    if parsed is None:
        raise InputError(f"'{field}' parameter is not a valid date")
    if parsed.tzinfo is None:
        import datetime
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()
