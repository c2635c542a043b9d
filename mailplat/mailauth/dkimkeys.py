"""DKIM key pairs: generation and the DNS TXT record that publishes the public half.

Owns making RSA key pairs (1024 or 2048 bits, with `cryptography`, off the event loop) and
turning a stored public key into the `k=rsa; p=...` TXT value and back.  Private keys are PEM
(PKCS#1, which dkimpy reads); public keys are base64 DER SubjectPublicKeyInfo, exactly what a
DKIM `p=` tag carries.  core.domains stores them in DkimKey rows; mailauth.dkim signs with them.
"""
from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KEY_SIZES = (1024, 2048)
PUBLIC_EXPONENT = 65537


@dataclass(frozen=True)
class KeyPair:
    key_size: int
    private_key_pem: str
    public_key_b64: str


def generate(key_size: int) -> KeyPair:
    """A new RSA key pair. CPU-bound (tens to hundreds of ms): call `generate_async` on a loop."""
    if key_size not in KEY_SIZES:
        raise ValueError(f"DKIM key size must be one of {KEY_SIZES}")
    key = rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=key_size)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()).decode("ascii")
    return KeyPair(key_size=key_size, private_key_pem=pem, public_key_b64=public_b64(key.public_key()))


async def generate_async(key_size: int) -> KeyPair:
    return await asyncio.to_thread(generate, key_size)


def public_b64(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def public_from_private(private_key_pem: str) -> str:
    """The `p=` value belonging to a stored private key."""
    key = serialization.load_pem_private_key(private_key_pem.encode("ascii"), password=None)
    return public_b64(key.public_key())


def txt_value(public_key_b64: str) -> str:
    """The DNS TXT record value published at `<selector>._domainkey.<domain>`."""
    return f"k=rsa; p={public_key_b64}"


def txt_public_key(txt: str) -> str | None:
    """The `p=` tag of a DKIM TXT record (whitespace removed), or None when it has none."""
    for tag in txt.split(";"):
        name, sep, value = tag.partition("=")
        if sep and name.strip().lower() == "p":
            return re.sub(r"\s+", "", value)
    return None


def published(txt_values: list[str], expected: str) -> bool:
    """Whether any of the TXT strings found in DNS publishes the key of the `expected` value."""
    want = txt_public_key(expected)
    return want is not None and any(txt_public_key(v) == want for v in txt_values)
