"""DKIM signing of outgoing mail (RFC 6376): the one place mailplat signs.

Owns `sign()`: rsa-sha256, relaxed/relaxed canonicalisation, no l= tag, over the message after
its line endings are normalised to CRLF (exactly the bytes then sent).  Headers signed: those
RFC 6376 5.4.1 recommends that are present, and the identity headers (From, To, Cc, Subject,
Date, Message-Id, Reply-To, Sender, MIME-Version, Content-Type, ...) oversigned, i.e. listed
once more in h= so that adding another instance (or adding an absent one) breaks the signature.
Keys come from core.domains.dkim_signing_key_sync (mailauth.dkimkeys made them).

Speed: signing runs once per relayed copy.  Canonicalisation is a few byte-level regular
expression passes, the RSA step is OpenSSL's (through `cryptography`, which releases the
interpreter lock), and each PEM key is parsed once and kept.  The relay calls sign() in a
thread pool, never on the event loop.
"""
from __future__ import annotations

import base64
import hashlib
import re
import threading
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# Recommended by RFC 6376 5.4.1, plus the MIME and identity headers; signed when present.
SIGNED = frozenset((
    b"from", b"sender", b"reply-to", b"subject", b"date", b"message-id", b"to", b"cc",
    b"mime-version", b"content-type", b"content-transfer-encoding", b"content-id",
    b"content-description", b"resent-date", b"resent-from", b"resent-sender", b"resent-to",
    b"resent-cc", b"resent-message-id", b"in-reply-to", b"references", b"list-id", b"list-help",
    b"list-unsubscribe", b"list-unsubscribe-post", b"list-subscribe", b"list-post", b"list-owner",
    b"list-archive"))
# Signed once more than they occur, whether present or not (protects against additions).
OVERSIGNED = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"sender",
              b"mime-version", b"content-type", b"content-transfer-encoding", b"in-reply-to",
              b"references", b"list-unsubscribe", b"list-unsubscribe-post")

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_WSP = re.compile(rb"[ \t]+")
_FOLD_AT = 72  # characters of b= per line


def normalize_crlf(raw: bytes) -> bytes:
    """Every line ending as CRLF (bare LF and bare CR both become CRLF)."""
    return _BARE_LF.sub(b"\r\n", _BARE_CR.sub(b"\r\n", raw))


class SigningError(Exception):
    pass


# -- keys ----------------------------------------------------------------------------------------
_keys: dict[bytes, rsa.RSAPrivateKey] = {}
_keys_lock = threading.Lock()
_MAX_KEYS = 1000


def _key(pem: bytes) -> rsa.RSAPrivateKey:
    key = _keys.get(pem)
    if key is not None:
        return key
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"unusable DKIM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningError("unusable DKIM private key: not an RSA key")
    with _keys_lock:
        if len(_keys) >= _MAX_KEYS:
            _keys.clear()
        _keys[pem] = key
    return key


# -- canonicalisation (RFC 6376 3.4.2 and 3.4.4, relaxed) ------------------------------------------
def relaxed_body(body: bytes) -> bytes:
    """Whitespace runs as one space, none at line ends, no empty lines at the end; a non-empty
    body ends with CRLF, an empty one stays empty.  `body` has CRLF line endings."""
    body = _WSP.sub(b" ", body).replace(b" \r\n", b"\r\n")
    if body.endswith(b" "):
        body = body[:-1]
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """`name:value` lower-cased name, value unfolded, whitespace runs as one space, none at
    either end (no CRLF appended)."""
    return name.rstrip(b" \t").lower() + b":" + _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(name, raw value) of each header field, continuation lines kept (CRLF between them)."""
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += b"\r\n" + line
        else:
            name, _, value = line.partition(b":")
            fields.append([name, value])
    return [(name, value) for name, value in fields]


def _fold_list(names: list[bytes]) -> bytes:
    out, line = [], 0
    for i, name in enumerate(names):
        piece = name if i == 0 else b":" + name
        if line + len(piece) > _FOLD_AT:
            out.append(b"\r\n ")
            line = 1
        out.append(piece)
        line += len(piece)
    return b"".join(out)


def sign(raw: bytes, domain: str, selector: str, private_key_pem: str | bytes) -> bytes:
    """Return the message with a DKIM-Signature header prepended (line endings CRLF)."""
    message = normalize_crlf(raw)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    pem = private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else private_key_pem
    key = _key(pem)
    end = message.find(b"\r\n\r\n")
    head, body = (message[:-2], b"") if end < 0 else (message[:end], message[end + 4:])
    fields = _fields(head)
    by_name: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        by_name.setdefault(name.rstrip(b" \t").lower(), []).append(value)
    if b"from" not in by_name:
        raise SigningError("the message has no From header, which DKIM must sign")
    present = [n for n in (name.rstrip(b" \t").lower() for name, _ in fields) if n in SIGNED]
    h = present + list(OVERSIGNED)
    # Each h= name takes the last instance of that header not yet taken (RFC 6376 5.4.2);
    # a name with none left adds nothing.
    signed = []
    for name in h:
        values = by_name.get(name)
        if values:
            signed.append(relaxed_header(name, values.pop()) + b"\r\n")
    bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
    header = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=" + domain.encode("ascii")
              + b"; s=" + selector.encode("ascii") + b";\r\n t=" + str(int(time.time())).encode("ascii")
              + b"; h=" + _fold_list(h) + b";\r\n bh=" + bh + b";\r\n b=")
    name, _, value = header.partition(b":")
    signed.append(relaxed_header(name, value))
    signature = base64.b64encode(key.sign(b"".join(signed), padding.PKCS1v15(), hashes.SHA256()))
    folded = b"\r\n ".join(signature[i:i + _FOLD_AT] for i in range(0, len(signature), _FOLD_AT))
    return header + folded + b"\r\n" + message
