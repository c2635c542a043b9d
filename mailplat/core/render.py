"""Per-recipient rendering, done by the relay just before signing: recipient variables
(%recipient%, %recipient.x%, %recipient_fname%, %recipient_lname%), and Mailgun's own
placeholders (%unsubscribe_url%, %tag_unsubscribe_email%, ...) which are filled from `extra`
(tracking supplies them once it lands) or dropped, never sent literally.

`for_recipient` returns the exact bytes to sign and send to one recipient.  The stored blob is
the message once; a batch message (one with recipient variables) is parsed, substituted in its
text and html parts and in its header values, given a To showing only this recipient, and
re-serialised.  A message with no recipient variables is returned byte for byte as stored.
"""
from __future__ import annotations

import email
import json
import re

from ..store.models import Message
from .compose import SMTP_POLICY

# %recipient%, %recipient.key%, %recipient_fname%, and Mailgun's generated placeholders.
PLACEHOLDER = re.compile(
    r"%(recipient(?:\.[^%\s<>\"']{1,128})?|recipient_fname|recipient_lname"
    r"|(?:tag_|mailing_list_)?unsubscribe_(?:url|email))%")
# Headers never substituted (structure, identity, trace).
_FIXED = {"content-type", "content-transfer-encoding", "mime-version", "message-id", "date",
          "to", "dkim-signature", "received", "content-id", "content-disposition"}


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


def _recipient_spec(msg, recipient: str) -> tuple[str, str]:
    """(full spec like 'Alex Lee <alee@x.test>', display name) from the message's To/Cc."""
    for name in ("To", "Cc"):
        for header in msg.get_all(name, []) or []:
            try:
                addresses = header.addresses
            except AttributeError:
                continue
            for a in addresses:
                if a.addr_spec.lower() == recipient.lower():
                    if a.display_name:
                        return email.utils.formataddr((a.display_name, recipient)), a.display_name
                    return recipient, ""
    return recipient, ""


def substitute(text: str, values: dict, vars_: dict) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1)
        if name.startswith("recipient."):
            return _value(vars_, name[len("recipient."):])
        return str(values.get(name, ""))
    return PLACEHOLDER.sub(one, text)


def for_recipient(message: Message, raw: bytes, recipient: str, extra: dict | None = None) -> bytes:
    """The bytes to send to `recipient`: byte for byte unless the message is a batch message.

    `extra` gives values for Mailgun placeholders (unsubscribe_url, ...); missing ones drop."""
    rv = message.recipient_variables
    if not rv:
        return raw
    vars_ = rv.get(recipient)
    if vars_ is None:
        vars_ = rv.get(recipient.lower())
    if not isinstance(vars_, dict):
        vars_ = {}
    msg = email.message_from_bytes(raw, policy=SMTP_POLICY)
    spec, display = _recipient_spec(msg, recipient)
    first, _, last = display.partition(" ")
    values = {"recipient": spec, "recipient_fname": first, "recipient_lname": last, **(extra or {})}

    # Headers: substitute values; To shows only this recipient.
    items = msg.items()
    new_items = []
    for name, value in items:
        text = str(value)
        if name.lower() not in _FIXED and "%" in text:
            text = substitute(text, values, vars_).replace("\r", " ").replace("\n", " ")
        new_items.append((name, text))
    for name in {n for n, _ in items}:
        del msg[name]
    to_done = False
    for name, text in new_items:
        if name.lower() == "to":
            if to_done:
                continue
            text, to_done = spec, True
        msg[name] = text
    if not to_done:
        msg["To"] = spec

    # Text and html parts (not attachments).
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        try:
            content = part.get_content()
        except (LookupError, ValueError):
            continue
        if "%" not in content:
            continue
        new = substitute(content, values, vars_)
        if new == content:
            continue
        cid = part.get("Content-ID")
        disposition = part.get_content_disposition()
        kwargs = {}
        if cid:
            kwargs["cid"] = str(cid)
        if disposition:
            kwargs["disposition"] = disposition
        part.set_content(new, subtype=part.get_content_subtype(), charset="utf-8", **kwargs)
    return msg.as_bytes(policy=SMTP_POLICY)
