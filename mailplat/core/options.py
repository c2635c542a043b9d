"""Sending options: the API's o:* / v: fields and SMTP's X-Mailgun-* headers, validated once.

Owns the meaning and limits of every per-message option (tags, campaigns, scheduled delivery,
test mode, DKIM, tracking, TLS policy) and of custom data (user-variables).  The API view hands
each o:* / h:X-Mailgun-* field to `apply` and each v: field to `merge_variables`; SMTP
submission (and messages.mime) hands the raw message to `from_headers`, which reads and strips
the X-Mailgun-* headers byte for byte.  Both give an `Options` that
core.send.submit() stores in Message.options for the relay to act on.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

from ..errors import InputError
from .timefmt import parse_time

MAX_TAGS = 3
MAX_TAG_LENGTH = 128
MAX_CAMPAIGNS = 3
MAX_VARIABLES_BYTES = 4096          # total JSON size of user-variables (v: and X-Mailgun-Variables)
MAX_RECIPIENT_VARIABLES_BYTES = 1 << 20
MAX_SCHEDULE_SECONDS = 7 * 86400    # how far ahead o:deliverytime may point

TRUE = {"yes", "true", "1", "on", "y", "t"}
FALSE = {"no", "false", "0", "off", "n", "f"}

# X-Mailgun-* headers (lower case) this module reads and strips.
HEADER_OPTIONS = {
    "x-mailgun-tag", "x-mailgun-campaign-id", "x-mailgun-dkim", "x-mailgun-deliver-by",
    "x-mailgun-drop-message", "x-mailgun-track", "x-mailgun-track-clicks",
    "x-mailgun-track-opens", "x-mailgun-variables", "x-mailgun-require-tls",
    "x-mailgun-skip-verification",
}


@dataclass
class Options:
    """The o:* options / X-Mailgun-* headers of one message, already validated."""
    tags: list[str] = field(default_factory=list)
    campaigns: list[str] = field(default_factory=list)
    deliver_at: float | None = None
    testmode: bool = False
    dkim: bool | None = None
    tracking: bool | None = None
    tracking_clicks: str | None = None  # "yes" | "no" | "htmlonly"
    tracking_opens: bool | None = None
    require_tls: bool | None = None
    skip_verification: bool | None = None
    drop_message: bool = False

    def as_stored(self) -> dict:
        """What Message.options holds (the relay reads these keys)."""
        return {
            "testmode": bool(self.testmode or self.drop_message),
            "dkim": self.dkim,
            "tracking": self.tracking,
            "tracking_clicks": self.tracking_clicks,
            "tracking_opens": self.tracking_opens,
            "require_tls": self.require_tls,
            "skip_verification": self.skip_verification,
            "deliver_at": self.deliver_at,
        }


# -- single values ----------------------------------------------------------------------------
def yes_no(value, name: str, expected: str = "yes or no") -> bool:
    """A loose boolean, as the SDKs send them: yes/no, true/false (any case, Python's True
    too), 1/0, on/off.  The one parser of booleans at every edge."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise InputError(f"'{name}' parameter should be {expected}")


def clicks_value(value, name: str) -> str:
    text = str(value).strip().lower()
    if text == "htmlonly":
        return "htmlonly"
    return "yes" if yes_no(text, name) else "no"


def add_tag(options: Options, tag: str, name: str = "o:tag") -> None:
    tag = str(tag).strip()
    if not tag:
        return
    if len(tag) > MAX_TAG_LENGTH:
        raise InputError(f"'{name}' is too long: a tag may have at most {MAX_TAG_LENGTH} characters")
    if not tag.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in tag):
        raise InputError(f"'{name}' must be printable ASCII")
    if tag.lower() in (t.lower() for t in options.tags):
        return
    if len(options.tags) >= MAX_TAGS:
        raise InputError(f"Too many tags: a message may have at most {MAX_TAGS} tags")
    options.tags.append(tag)


def add_campaign(options: Options, campaign: str, name: str = "o:campaign") -> None:
    campaign = str(campaign).strip()
    if not campaign or campaign in options.campaigns:
        return
    if len(campaign) > MAX_TAG_LENGTH or any(ord(c) < 32 for c in campaign):
        raise InputError(f"'{name}' is not a valid campaign id")
    if len(options.campaigns) >= MAX_CAMPAIGNS:
        raise InputError(f"Too many campaigns: a message may belong to at most {MAX_CAMPAIGNS}")
    options.campaigns.append(campaign)


def delivery_time(value: str, name: str = "o:deliverytime", now: float | None = None) -> float:
    """Epoch seconds from RFC 2822 (incl. the 'GMT' form) or epoch; a past time means now."""
    now = time.time() if now is None else now
    when = parse_time(str(value), name)
    if when > now + MAX_SCHEDULE_SECONDS:
        raise InputError(f"'{name}' may be at most {MAX_SCHEDULE_SECONDS // 86400} days in the future")
    return max(when, now)


def merge_variables(user_variables: dict, name: str, value) -> None:
    """Add one v:<name> value; JSON values (objects, arrays, numbers) are parsed."""
    if not name or len(name) > 255:
        raise InputError("custom variable names must have 1 to 255 characters")
    parsed = value
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("{", "["):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = value
    user_variables[name] = parsed


def merge_variables_json(user_variables: dict, text: str, name: str = "X-Mailgun-Variables") -> None:
    """X-Mailgun-Variables: a JSON object whose keys are merged (several headers combine)."""
    try:
        data = json.loads(text)
    except ValueError:
        raise InputError(f"'{name}' must be a valid JSON object") from None
    if not isinstance(data, dict):
        raise InputError(f"'{name}' must be a valid JSON object")
    user_variables.update(data)


def check_variables_size(user_variables: dict) -> None:
    if not user_variables:
        return
    if len(json.dumps(user_variables, separators=(",", ":"))) > MAX_VARIABLES_BYTES:
        raise InputError(f"Custom variables exceed the {MAX_VARIABLES_BYTES // 1024} KB limit")


def parse_recipient_variables(text: str) -> dict:
    if len(text) > MAX_RECIPIENT_VARIABLES_BYTES:
        raise InputError("'recipient-variables' parameter is too large")
    try:
        data = json.loads(text)
    except ValueError:
        raise InputError("'recipient-variables' parameter is not a valid JSON") from None
    if not isinstance(data, dict):
        raise InputError("'recipient-variables' parameter should be a JSON object")
    return {str(k).strip().lower(): v for k, v in data.items()}


# -- one option by its name, for both edges -----------------------------------------------------
def apply(options: Options, user_variables: dict, key: str, value, now: float | None = None) -> bool:
    """Apply one option given as an API field name (o:tag, ...) or an X-Mailgun-* header name.

    Returns False when `key` is not an option this module knows."""
    k = key.strip().lower()
    if k in ("o:tag", "x-mailgun-tag"):
        add_tag(options, value, key)
    elif k in ("o:campaign", "x-mailgun-campaign-id"):
        add_campaign(options, value, key)
    elif k in ("o:deliverytime", "x-mailgun-deliver-by"):
        options.deliver_at = delivery_time(value, key, now)
    elif k == "o:testmode":
        options.testmode = yes_no(value, key)
    elif k == "x-mailgun-drop-message":
        options.drop_message = yes_no(value, key)
    elif k in ("o:dkim", "x-mailgun-dkim"):
        options.dkim = yes_no(value, key)
    elif k in ("o:tracking", "x-mailgun-track"):
        options.tracking = yes_no(value, key)
    elif k in ("o:tracking-clicks", "x-mailgun-track-clicks"):
        options.tracking_clicks = clicks_value(value, key)
    elif k in ("o:tracking-opens", "x-mailgun-track-opens"):
        options.tracking_opens = yes_no(value, key)
    elif k in ("o:require-tls", "x-mailgun-require-tls"):
        options.require_tls = yes_no(value, key)
    elif k in ("o:skip-verification", "x-mailgun-skip-verification"):
        options.skip_verification = yes_no(value, key)
    elif k == "x-mailgun-variables":
        merge_variables_json(user_variables, str(value), key)
    else:
        return False
    return True


# -- X-Mailgun-* headers of a MIME message -------------------------------------------------------
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def split_header_block(raw: bytes) -> tuple[bytes, bytes]:
    """(header block including its last line ending, rest starting with the blank line)."""
    m = _HEADER_END.search(raw)
    if m is None:
        return raw, b""
    cut = m.start() + (2 if raw[m.start():m.start() + 2] == b"\r\n" else 1)
    return raw[:cut], raw[cut:]


def header_fields(block: bytes) -> list[bytes]:
    """Split a header block into whole fields (each with its folded continuation lines)."""
    lines = block.splitlines(keepends=True)
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name_value(field_bytes: bytes) -> tuple[str, str]:
    name, _, value = field_bytes.partition(b":")
    text = value.decode("utf-8", "replace")
    return name.decode("ascii", "replace").strip(), re.sub(r"\r?\n[ \t]", " ", text).strip()


def from_headers(raw: bytes, now: float | None = None) -> tuple[Options, dict, bytes]:
    """Read and strip X-Mailgun-* headers (Tag, Campaign-Id, Dkim, Deliver-By, Drop-Message,
    Track, Track-Clicks, Track-Opens, Variables, Require-TLS, Skip-Verification) from a MIME
    message; returns (options, user_variables, message bytes without them). Raises InputError."""
    options = Options()
    user_variables: dict = {}
    block, rest = split_header_block(raw)
    if b"x-mailgun-" not in block.lower():  # every name in HEADER_OPTIONS has it
        return options, user_variables, raw
    kept: list[bytes] = []
    found = False
    for f in header_fields(block):
        name, value = field_name_value(f)
        if name.lower() in HEADER_OPTIONS:
            apply(options, user_variables, name, value, now)
            found = True
        else:
            kept.append(f)
    if options.drop_message:
        options.testmode = True
    check_variables_size(user_variables)
    if not found:
        return options, user_variables, raw
    return options, user_variables, b"".join(kept) + rest
