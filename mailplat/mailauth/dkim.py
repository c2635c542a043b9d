"""DKIM signing of outgoing mail: the one place mailplat signs (dkimpy).

Owns `sign()`: rsa-sha256, relaxed/relaxed canonicalisation, no l= tag, over the message after
its line endings are normalised to CRLF (exactly the bytes then sent).  Headers signed: those
RFC 6376 recommends that are present, and the identity headers (From, To, Cc, Subject, Date,
Message-Id, Reply-To, Sender, MIME-Version, Content-Type, ...) oversigned, i.e. listed once more
in h= so that adding another instance (or adding an absent one) breaks the signature.
Signing is CPU work: the relay calls it in a thread pool, never on the event loop.  Keys come
from core.domains.dkim_signing_key_sync (mailauth.dkimkeys made them).

Speed: dkimpy does everything (canonicalisation, hashing, h=/bh=/b= tags, folding) but its RSA
private-key step is pure-Python big-integer arithmetic that holds the GIL (~7 ms per 2048-bit
signature).  `_openssl_rsa_sign` takes that one step, for keys this module has loaded, to
OpenSSL through `cryptography`: RSASSA-PKCS1-v1_5 is deterministic, so the signature bytes are
identical (tests/test_relay_dkim.py checks), it is several times faster and releases the GIL.
Likewise dkimpy's per-signature PEM parsing is done once per key (`_parse_pem_cached`), and its
canonicalisation helpers skip their regular expressions when there is nothing to change.
"""
from __future__ import annotations

import re
import threading

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, utils

CANONICALIZE = (b"relaxed", b"relaxed")
# Signed once more than they occur, whether present or not (protects against additions).
OVERSIGNED = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"sender",
              b"mime-version", b"content-type", b"content-transfer-encoding", b"in-reply-to",
              b"references", b"list-unsubscribe", b"list-unsubscribe-post")

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


def normalize_crlf(raw: bytes) -> bytes:
    """Every line ending as CRLF (bare LF and bare CR both become CRLF)."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:
        return raw  # already so (nearly every message): three counts cost less than the regexes
    return _BARE_LF.sub(b"\r\n", _BARE_CR.sub(b"\r\n", raw))


class SigningError(Exception):
    pass


# -- the RSA step through OpenSSL ----------------------------------------------------------------
_keys: dict[bytes, object] = {}          # PEM -> cryptography private key
_by_modulus: dict[int, object] = {}      # modulus -> cryptography private key
_keys_lock = threading.Lock()
_pure_python_sign = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_MAX_KEYS = 1000


def _load_key(pem: bytes) -> None:
    with _keys_lock:
        if pem in _keys:
            return
    key = serialization.load_pem_private_key(pem, password=None)
    with _keys_lock:
        if len(_keys) >= _MAX_KEYS:
            _keys.clear()
            _by_modulus.clear()
        _keys[pem] = key
        _by_modulus[key.private_numbers().public_numbers.n] = key


def _openssl_rsa_sign(hash_obj, private_key: dict) -> bytes:
    key = _by_modulus.get(private_key.get("modulus"))
    if key is None or getattr(hash_obj, "name", "") != "sha256":
        return _pure_python_sign(hash_obj, private_key)
    return key.sign(hash_obj.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign  # the name dkim.DKIM.gen_header calls

_pure_python_parse = dkim.parse_pem_private_key
_parsed: dict[bytes, dict] = {}


def _parse_pem_cached(pem: bytes) -> dict:
    """dkimpy parses the PEM (pure-Python ASN.1) on every signature; parse each key once."""
    parsed = _parsed.get(pem)
    if parsed is None:
        parsed = _pure_python_parse(pem)
        if len(_parsed) >= _MAX_KEYS:
            _parsed.clear()
        _parsed[pem] = parsed
    return dict(parsed)


dkim.parse_pem_private_key = _parse_pem_cached  # the name dkim.DKIM.sign calls

# -- canonicalisation without a regular expression when there is nothing to change ---------------
# dkimpy's relaxed canonicalisation calls re.sub() with a pattern string three times per header
# (each signed header is canonicalised twice) and twice on the body: about 24 calls, a quarter of a
# signature's Python time.  The same functions, answering at once when the value holds nothing the
# expression would match, and otherwise running the same expression compiled once.  Equality with
# dkimpy's own functions is tested on generated input (tests/test_relay_dkim.py).
_canon = dkim.canonicalization
_ORIGINAL_CANON = {name: getattr(_canon, name)
                   for name in ("unfold_header_value", "compress_whitespace", "strip_trailing_whitespace")}
_UNFOLD = re.compile(b"\r?\n")
_WSP = re.compile(b"[\t ]+")
_TRAILING_WSP = re.compile(b"[\t ]+\r\n")


def _unfold_header_value(content: bytes) -> bytes:
    newlines = content.count(b"\n")
    if newlines == 0:
        return content
    if newlines == 1 and content.endswith(b"\r\n"):  # an unfolded value with its line ending
        return content[:-2]
    return _UNFOLD.sub(b"", content)


def _compress_whitespace(content: bytes) -> bytes:
    return _WSP.sub(b" ", content) if b"\t" in content or b"  " in content else content


def _strip_trailing_whitespace(content: bytes) -> bytes:
    if b" \r\n" in content or b"\t\r\n" in content:
        return _TRAILING_WSP.sub(b"\r\n", content)
    return content


_canon.unfold_header_value = _unfold_header_value
_canon.compress_whitespace = _compress_whitespace
_canon.strip_trailing_whitespace = _strip_trailing_whitespace


def canonical_lines(raw: bytes) -> bytes:
    """The message as it is signed and sent: CRLF line endings, ending with CRLF."""
    message = normalize_crlf(raw)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def signature_header(message: bytes, domain: str, selector: str, private_key_pem: str | bytes) -> bytes:
    """The DKIM-Signature header line(s) for `message`, which must be canonical_lines() output."""
    pem = private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else private_key_pem
    try:
        _load_key(pem)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"unusable DKIM private key: {exc}") from exc
    signer = dkim.DKIM(message, linesep=b"\r\n", signature_algorithm=b"rsa-sha256")
    present = [name for name, _ in signer.headers
               if name.lower() in signer.should_sign or name.lower() in OVERSIGNED]
    include = present + [h for h in OVERSIGNED if h not in signer.should_not_sign]
    try:
        return signer.sign(selector.encode("ascii"), domain.encode("ascii"), pem,
                           canonicalize=CANONICALIZE, include_headers=include, length=False)
    except dkim.DKIMException as exc:
        raise SigningError(str(exc)) from exc


def sign(raw: bytes, domain: str, selector: str, private_key_pem: str | bytes) -> bytes:
    """Return the message with a DKIM-Signature header prepended (line endings CRLF)."""
    message = canonical_lines(raw)
    return signature_header(message, domain, selector, private_key_pem) + message
