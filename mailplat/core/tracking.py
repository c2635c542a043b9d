"""Open, click and unsubscribe tracking: signed links, the pixel, link rewriting and the hits.

Owns the link tokens (AES-GCM under the installation's TrackingSecret: a token is opaque (the
recipient is not readable in it), cannot be forged or altered, and a random nonce makes every
link different, so none can be guessed or enumerated; a bad token is a plain 404), the
per-recipient plan the relay renders with (`plan_sync`, run inside the relay's job-loading
read: opens/clicks/unsubscribe footers from the message's options (o:tracking*,
X-Mailgun-Track*) over the domain's tracking settings), the HTML/text transforms
core.render.for_recipient applies (footers, %unsubscribe_url% / %tag_unsubscribe_url%
values, links rewritten to web_scheme://web_prefix.<domain>/c/<token>, a 1x1 pixel
/o/<token> in HTML parts only), and `hit_sync`, which records opened / clicked / unsubscribed
events (ip, client-info with a bot flag for known prefetchers and link scanners) and the
unsubscribe row.  The api service serves the hits (api/views/tracking.py).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import os
import re
import threading
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..store.models import Domain, Message
from ..store.tracking_models import TrackingSecret
from . import events, tracking_lists

SECRET_ID = "tracking"
MAX_TOKEN = 4096
_lock = threading.Lock()
_aead: AESGCM | None = None

PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")

# (substring of the user agent, bot name): mail proxies that fetch images for the reader,
# and link scanners that follow every link before a person does.
BOTS = (("googleimageproxy", "gmail"), ("yahoomailproxy", "yahoo"), ("ymailproxy", "yahoo"),
        ("apple-mail-privacy", "apple"), ("barracuda", "barracuda"), ("proofpoint", "proofpoint"),
        ("mimecast", "mimecast"), ("safelinks", "microsoft"), ("bingpreview", "microsoft"),
        ("ms-office", "microsoft"), ("symantec", "symantec"), ("trendmicro", "trendmicro"),
        ("python-requests", "generic"), ("curl/", "generic"), ("wget", "generic"), ("bot", "generic"),
        ("crawler", "generic"), ("spider", "generic"), ("preview", "generic"))
_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_TEXT_URL = re.compile(r"""https?://[^\s<>"')\]]+""")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


# -- tokens ------------------------------------------------------------------------------------------
def secret_sync() -> None:
    """Load the AES key (inside a store transaction the first time; cached afterwards)."""
    global _aead
    if _aead is not None:
        return
    row = TrackingSecret.get_or_none(TrackingSecret.id == SECRET_ID)
    if row is None:
        return
    key = hashlib.sha256(b"mailplat-tracking:" + row.secret.encode()).digest()
    with _lock:
        _aead = AESGCM(key)


def ready() -> bool:
    return _aead is not None


def make_token(kind: str, message_id: int, recipient: str, arg=None) -> str:
    payload = json.dumps([kind, message_id, recipient, arg], separators=(",", ":")).encode()
    nonce = os.urandom(12)
    sealed = _aead.encrypt(nonce, payload, b"t1")
    return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def open_token(token: str) -> tuple[str, int, str, object] | None:
    """(kind, message row id, recipient, arg) or None for anything not made here."""
    if _aead is None or not token or len(token) > MAX_TOKEN:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        if len(raw) < 12 + 16 + 2:
            return None
        payload = _aead.decrypt(raw[:12], raw[12:], b"t1")
        kind, mid, rcpt, arg = json.loads(payload)
        return str(kind), int(mid), str(rcpt), arg
    except (InvalidTag, ValueError, TypeError):
        return None


# -- the plan the relay renders with -------------------------------------------------------------------
@dataclass
class Plan:
    base: str                      # web_scheme://web_prefix.domain
    message_id: int
    recipient: str
    opens: bool = False
    clicks: str = "no"             # yes | htmlonly | no
    html_footer: str = ""
    text_footer: str = ""
    tags: tuple = ()

    @functools.cached_property
    def values(self) -> dict:
        """The unsubscribe URLs placeholders may ask for, made when first needed (a copy sent as
        stored never asks: most of the relay's copies)."""
        return {"unsubscribe_url": self.link("u", ["*"]),
                "tag_unsubscribe_url": self.link("u", list(self.tags) or ["*"])}

    @property
    def active(self) -> bool:
        """Whether the copy changes beyond filling placeholders."""
        return bool(self.opens or self.clicks != "no" or self.html_footer or self.text_footer)

    def link(self, kind: str, arg=None) -> str:
        return f"{self.base}/{kind}/{make_token(kind, self.message_id, self.recipient, arg)}"

    def before(self, content: str, subtype: str) -> str:
        """Footers go in before placeholders are filled (they carry %unsubscribe_url%)."""
        if subtype == "html" and self.html_footer:
            m = None
            for m in _BODY_END.finditer(content):
                pass
            return content[:m.start()] + self.html_footer + content[m.start():] if m else content + self.html_footer
        if subtype == "plain" and self.text_footer:
            return content.rstrip("\r\n") + "\n\n" + self.text_footer + "\n"
        return content

    def after(self, content: str, subtype: str) -> str:
        """Links rewritten and the pixel added, once placeholders are filled."""
        if subtype == "html":
            if self.clicks in ("yes", "htmlonly"):
                content = _HREF.sub(self._rewrite_href, content)
            if self.opens:
                pixel = (f'<img width="1" height="1" alt="" style="display:none" '
                         f'src="{html.escape(self.link("o"))}">')
                m = None
                for m in _BODY_END.finditer(content):
                    pass
                content = content[:m.start()] + pixel + content[m.start():] if m else content + pixel
        elif subtype == "plain" and self.clicks == "yes":
            content = _TEXT_URL.sub(lambda mm: mm.group(0) if mm.group(0).startswith(self.base)
                                    else self.link("c", mm.group(0)), content)
        return content

    def _rewrite_href(self, m: re.Match) -> str:
        url = html.unescape(m.group(3).strip())
        if not url.lower().startswith(("http://", "https://")) or url.startswith(self.base + "/"):
            return m.group(0)
        return f"{m.group(1)}{m.group(2)}{html.escape(self.link('c', url))}{m.group(2)}"


def _flag(value, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.lower() in ("yes", "true", "htmlonly")
    return bool(value)


def plan_sync(message: Message, recipient: str, domain: Domain | None) -> Plan | None:
    """What to do for this copy (inside the relay's store read); None = nothing to track."""
    if domain is None or message.source == "route":
        return None  # forwarded inbound mail is passed on as it came, never tracked
    if _aead is None:
        secret_sync()
        if _aead is None:
            return None
    opts = message.options or {}
    overall = opts.get("tracking")
    opens = _flag(opts.get("tracking_opens"), _flag(overall, bool(domain.tracking_open)))
    clicks_opt = opts.get("tracking_clicks")
    if clicks_opt is None:
        clicks = "yes" if _flag(overall, bool(domain.tracking_click)) else "no"
    else:
        clicks = str(clicks_opt).lower() if isinstance(clicks_opt, str) else ("yes" if clicks_opt else "no")
        clicks = {"true": "yes", "false": "no"}.get(clicks, clicks)
    if overall is False and opts.get("tracking_opens") is None:
        opens = False
    base = f"{domain.web_scheme or 'http'}://{domain.web_prefix or 'email'}.{domain.name}"
    plan = Plan(base=base, message_id=message.id, recipient=recipient, opens=opens, clicks=clicks,
                tags=tuple(message.tags or ()))
    if domain.tracking_unsubscribe and overall is not False:
        plan.html_footer = domain.unsubscribe_html_footer or ""
        plan.text_footer = domain.unsubscribe_text_footer or ""
    return plan


# -- hits -------------------------------------------------------------------------------------------------
def bot_name(user_agent: str) -> str:
    ua = (user_agent or "").lower()
    for needle, name in BOTS:
        if needle in ua:
            return name
    return ""


def client_info(user_agent: str) -> dict:
    ua = user_agent or ""
    low = ua.lower()
    device = "mobile" if any(w in low for w in ("iphone", "android", "mobile")) else (
        "tablet" if "ipad" in low else "desktop")
    os_name = next((n for k, n in (("windows", "Windows"), ("mac os", "OS X"), ("iphone", "iOS"),
                                   ("ipad", "iOS"), ("android", "Android"), ("linux", "Linux")) if k in low), "unknown")
    client = next((n for k, n in (("thunderbird", "Thunderbird"), ("outlook", "Outlook"), ("firefox", "Firefox"),
                                  ("edg/", "Edge"), ("chrome", "Chrome"), ("safari", "Safari")) if k in low), "unknown")
    ctype = "mobile browser" if device == "mobile" else ("email client" if client in ("Thunderbird", "Outlook") else "browser")
    return {"client-name": client, "client-os": os_name, "client-type": ctype, "device-type": device,
            "user-agent": ua[:500], "bot": bot_name(ua)}


def hit_sync(kind: str, message_id: int, recipient: str, arg, ip: str, user_agent: str, now: float,
             record_unsubscribe: bool = True) -> dict | None:
    """Record an open ('o'), click ('c', arg = URL) or unsubscribe ('u', arg = tags) inside a
    store write; returns the event data, or None when the message is gone."""
    message = Message.get_or_none(Message.id == message_id)
    if message is None:
        return None
    info = client_info(user_agent)
    extra = {"ip": ip, "client-info": info,
             "geolocation": {"country": "Unknown", "region": "Unknown", "city": "Unknown"}}
    if kind == "o":
        data = events.build("opened", message, recipient, timestamp=now, extra=extra)
    elif kind == "c":
        data = events.build("clicked", message, recipient, timestamp=now, extra={**extra, "url": str(arg)})
    else:
        tags = [str(t) for t in (arg if isinstance(arg, list) else ["*"])] or ["*"]
        if record_unsubscribe:
            tracking_lists.add_unsubscribe_sync(message.domain, recipient, tags, now)
        data = events.build("unsubscribed", message, recipient, timestamp=now, extra=extra)
        if tags != ["*"]:
            data["tags"] = tags
    data["flags"] = {**(data.get("flags") or {}), "is-bot": bool(info["bot"])}
    events.record_sync(message.domain, data)
    return data
