"""mailauth.dkim: what the relay signs with (end-to-end verification by Mail::DKIM is in
tests/test_relay.py; here the signer's own guarantees)."""
from __future__ import annotations

import hashlib
import re

import dkim
import dkim.crypto
import pytest

from mailplat.mailauth import dkim as signer
from mailplat.mailauth import dkimkeys


@pytest.fixture(scope="module")
def key():
    return dkimkeys.generate(2048)


def verify(message: bytes, key) -> bool:
    record = f"v=DKIM1; k=rsa; p={key.public_key_b64}".encode()
    return dkim.verify(message, dnsfunc=lambda name, timeout=5: record)


MSG = (b"From: Alice <alice@example.test>\nTo: bob@example.test\nSubject: Hi\n"
       b"Date: Thu, 26 Nov 2026 01:00:00 +0000\nMessage-Id: <m1@example.test>\n\nBody line\n.dot line\n")


def test_signature_tags_and_oversigning(key):
    signed = signer.sign(MSG, "example.test", "mx1", key.private_key_pem)
    header = signed.split(b"\r\n\r\n")[0].split(b"\r\nFrom:")[0].replace(b"\r\n", b"")
    tags = dict(t.strip().split(b"=", 1) for t in header[len(b"DKIM-Signature:"):].split(b";") if t.strip())
    assert tags[b"a"] == b"rsa-sha256" and tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.test" and tags[b"s"] == b"mx1"
    assert b"l" not in tags
    signed_headers = re.split(rb"\s*:\s*", tags[b"h"].strip())
    for name in (b"from", b"to", b"subject", b"date", b"message-id"):
        assert signed_headers.count(name) == 2, name  # present once, signed twice
    assert b"cc" in signed_headers and b"reply-to" in signed_headers  # absent, signed as absent
    assert b"\n" not in signed.replace(b"\r\n", b"")  # CRLF throughout
    assert verify(signed, key)


def test_tampering_breaks_it(key):
    signed = signer.sign(MSG, "example.test", "mx1", key.private_key_pem)
    assert not verify(signed.replace(b"Body line", b"Body lime"), key)
    assert not verify(signed.replace(b"\r\n\r\n", b"\r\nCc: eve@example.test\r\n\r\n", 1), key)
    assert not verify(signed.replace(b"\r\n\r\n", b"\r\nFrom: eve@example.test\r\n\r\n", 1), key)


def test_openssl_rsa_step_gives_the_same_bytes_as_dkimpy(key):
    signer.sign(MSG, "example.test", "mx1", key.private_key_pem)  # loads the key
    pk = dkim.crypto.parse_pem_private_key(key.private_key_pem.encode())
    for payload in (b"one", b"two" * 1000):
        fast = signer._openssl_rsa_sign(hashlib.sha256(payload), pk)
        slow = signer._pure_python_sign(hashlib.sha256(payload), pk)
        assert fast == slow


def test_bad_key_is_a_signing_error():
    with pytest.raises(signer.SigningError):
        signer.sign(MSG, "example.test", "mx1", "-----BEGIN RSA PRIVATE KEY-----\nnope\n-----END RSA PRIVATE KEY-----\n")


def test_bare_cr_and_lf_are_normalised_before_signing(key):
    raw = b"From: a@example.test\nSubject: x\r\n\r\nline one\nline two\rline three\r\n"
    assert signer.normalize_crlf(raw) == (b"From: a@example.test\r\nSubject: x\r\n\r\n"
                                          b"line one\r\nline two\r\nline three\r\n")
    signed = signer.sign(raw, "example.test", "mx1", key.private_key_pem)
    assert b"\r" not in signed.replace(b"\r\n", b"") and b"\n" not in signed.replace(b"\r\n", b"")
    assert verify(signed, key)


def test_fast_canonicalisation_helpers_equal_dkimpys():
    """mailauth.dkim replaces three of dkimpy's canonicalisation helpers with ones that skip the
    regular expression when nothing would change: the same output on every generated input."""
    import random

    rng = random.Random(1234)
    alphabet = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"b:", b"  ", b" \r\n", b"\t\r\n"]
    samples = [b"", b"\r\n", b"plain value\r\n", b"folded\r\n value\r\n"]
    samples += [b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(20000)]
    for name, original in signer._ORIGINAL_CANON.items():
        fast = getattr(dkim.canonicalization, name)
        assert fast is not original
        for sample in samples:
            assert fast(sample) == original(sample), (name, sample)
