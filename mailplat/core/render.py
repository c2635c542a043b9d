"""Per-recipient rendering, done by the relay just before signing: recipient variables
(%recipient%, %recipient.x%, %recipient_fname%, %recipient_lname%), and Mailgun's own
placeholders (%unsubscribe_url%, %tag_unsubscribe_email%, ...) which are filled from `extra`
(tracking supplies them once it lands) or dropped, never sent literally.

`for_recipient` returns the exact bytes to sign and send to one recipient.  The stored blob is
the message once; a batch message (one with recipient variables) is parsed, substituted in its
text and html parts and in its header values, given a To showing only this recipient, and
re-serialised.  A message with no recipient variables is returned byte for byte as stored.

The email package's compat32 model is used on purpose: it keeps header values as the raw
strings they were (no per-header object parsing), which makes a render about ten times
cheaper than the modern API; only headers and parts that change are re-encoded.
"""
from __future__ import annotations

import binascii
import email
import email.header
import email.utils
import io
import json
import re
from email import policy
from email.generator import BytesGenerator

from ..store.models import Message

# %recipient%, %recipient.key%, %recipient_fname%, and Mailgun's generated placeholders.
PLACEHOLDER = re.compile(
    r"%(recipient(?:\.[^%\s<>\"']{1,128})?|recipient_fname|recipient_lname"
    r"|(?:tag_|mailing_list_)?unsubscribe_(?:url|email))%")
# Mailgun's own placeholders in a message that is otherwise sent as stored.
_UNSUB_PLACEHOLDER = re.compile(rb"%(?:tag_|mailing_list_)?unsubscribe_(?:url|email)%")
# Headers never substituted (structure, identity, trace).
_FIXED = {"content-type", "content-transfer-encoding", "mime-version", "message-id", "date",
          "to", "dkim-signature", "received", "content-id", "content-disposition"}
_POLICY = policy.compat32.clone(linesep="\r\n", max_line_length=None)


def _value(vars_: dict, key: str) -> str:
    value = vars_.get(key)
    if value is None and "." in key:
        node = vars_
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        value = node
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def substitute(text: str, values: dict, vars_: dict) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        if name.startswith("recipient."):
            return _value(vars_, name[len("recipient."):])
        return str(values.get(name, ""))
    return PLACEHOLDER.sub(one, text)


def _decode_header(raw: str) -> str:
    if "=?" not in raw:
        return re.sub(r"\r?\n[ \t]", " ", raw)
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except Exception:  # noqa: BLE001 - malformed encoded words: work on the raw text
        return raw


def _encode_header(name: str, text: str) -> str:
    text = text.replace("\r", " ").replace("\n", " ")
    if text.isascii():
        return text
    return email.header.Header(text, "utf-8", header_name=name).encode(linesep="\r\n")


def _recipient_spec(msg, recipient: str) -> tuple[str, str]:
    """(full spec like 'Alex Lee <alee@x.test>', display name) from the message's To/Cc."""
    for name in ("To", "Cc"):
        for raw in msg.get_all(name, []) or []:
            for display, addr in email.utils.getaddresses([_decode_header(str(raw))]):
                if addr.lower() == recipient.lower():
                    if display:
                        return email.utils.formataddr((display, recipient)), display
                    return recipient, ""
    return recipient, ""


def _set_text(part, text: str) -> None:
    data = text.replace("\r\n", "\n").replace("\r", "\n")
    if data.isascii() and all(len(line) <= 998 for line in data.split("\n")):
        body, cte = data.replace("\n", "\r\n"), "7bit"
    else:
        body = binascii.b2a_qp(data.encode("utf-8"), istext=True).decode("ascii").replace("\n", "\r\n")
        cte = "quoted-printable"
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", cte)
    else:
        part["Content-Transfer-Encoding"] = cte
    if part.get("Content-Type") is None:
        part["Content-Type"] = "text/plain"
    part.set_param("charset", "utf-8")
    part.set_payload(body)


def verbatim(message: Message, raw: bytes, tracking=None) -> bool:
    """Whether for_recipient() returns `raw` unchanged: no batch variables, nothing to track or
    fill in (a cheap test; the relay renders only the other copies in a thread)."""
    return not message.recipient_variables and (
        tracking is None or (not tracking.active and not _UNSUB_PLACEHOLDER.search(raw)))


def for_recipient(message: Message, raw: bytes, recipient: str, extra: dict | None = None,
                  tracking=None) -> bytes:
    """The bytes to send to `recipient`: byte for byte unless the message is a batch message
    or tracking changes it.

    `extra` gives values for Mailgun placeholders (unsubscribe_url, ...); missing ones drop.
    `tracking` (a core.tracking.Plan) adds footers, fills the unsubscribe URLs, rewrites links
    and adds the open pixel (HTML parts only)."""
    if verbatim(message, raw, tracking):
        return raw
    rv = message.recipient_variables
    vars_ = (rv or {}).get(recipient)
    if vars_ is None:
        vars_ = (rv or {}).get(recipient.lower())
    if not isinstance(vars_, dict):
        vars_ = {}
    if tracking is not None:
        extra = {**tracking.values, **(extra or {})}
    msg = email.message_from_bytes(raw, policy=_POLICY)
    spec, display = _recipient_spec(msg, recipient)
    first, _, last = display.partition(" ")
    values = {"recipient": spec, "recipient_fname": first, "recipient_lname": last, **(extra or {})}
    # A mailing-list copy (core.lists): the member's name, unsubscribe link and address, and
    # List-Unsubscribe headers (RFC 8058) to add; To keeps showing the list.
    listing = vars_.get("%list") if isinstance(vars_.get("%list"), dict) else None
    if listing:
        values.update(listing.get("values") or {})

    # Headers: substitute values; To shows only this recipient.
    new_headers = []
    to_done = False
    for name, value in msg.items():
        lname = name.lower()
        if lname == "to" and not listing and rv:
            if not to_done:
                new_headers.append((name, _encode_header(name, spec)))
                to_done = True
            continue
        if lname not in _FIXED and ("%" in value or "=?" in value):
            text = _decode_header(value)
            new = substitute(text, values, vars_)
            if new != text:
                value = _encode_header(name, new)
        new_headers.append((name, value))
    if not to_done and not listing and rv:
        new_headers.append(("To", _encode_header("To", spec)))
    if listing:
        present = {n.lower() for n, _ in new_headers}
        new_headers.extend((n, _encode_header(n, v)) for n, v in listing.get("headers") or []
                           if n.lower() not in present)
    msg._headers = [(n, v) for n, v in new_headers]  # compat32 keeps headers as this list

    # Text and html parts (not attachments).
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        payload = part.get_payload(decode=True)
        if payload is None or (b"%" not in payload and tracking is None):
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            content = payload.decode(charset, "replace")
        except LookupError:
            content = payload.decode("utf-8", "replace")
        subtype = part.get_content_subtype()
        new = tracking.before(content, subtype) if tracking is not None else content
        new = substitute(new, values, vars_)
        if tracking is not None:
            new = tracking.after(new, subtype)
        if new != content:
            _set_text(part, new)
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(msg)
    return out.getvalue()
