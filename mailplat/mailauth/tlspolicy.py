"""Outbound TLS policy: what the relay demands of a remote MX's TLS, and the client SSLContext.

Owns the decision "must this delivery be encrypted, and must the certificate verify" from the
sending domain's connection settings (`Domain.require_tls`, `Domain.skip_verification`),
overridden per message by `o:require-tls` / `o:skip-verification` (Message.options keys
`require_tls`, `skip_verification`; None means "the domain's setting").  relay.client applies it:
- require_tls: STARTTLS must succeed, else the recipient is not delivered (never plaintext);
- not require_tls: STARTTLS is tried, and on a missing extension or a failed handshake the
  message goes over plaintext on a fresh connection;
- verify (not skip_verification): the certificate chain AND the MX host name must verify,
  against the system store or `relay.ca_file`; a failed verification means no TLS session.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class TlsPolicy:
    require_tls: bool = False
    verify: bool = True

    def describe(self) -> str:
        return (f"require_tls={'true' if self.require_tls else 'false'} "
                f"skip_verification={'false' if self.verify else 'true'}")


def policy_for(domain_row, options: dict | None) -> TlsPolicy:
    """The policy for one message: the domain's settings, then the message's overrides."""
    options = options or {}
    require = bool(getattr(domain_row, "require_tls", False)) if domain_row is not None else False
    skip = bool(getattr(domain_row, "skip_verification", False)) if domain_row is not None else False
    if options.get("require_tls") is not None:
        require = bool(options["require_tls"])
    if options.get("skip_verification") is not None:
        skip = bool(options["skip_verification"])
    return TlsPolicy(require_tls=require, verify=not skip)


_contexts: dict[tuple[bool, str], ssl.SSLContext] = {}


def client_context(policy: TlsPolicy, ca_file: str = "") -> ssl.SSLContext:
    """A client SSLContext for the policy (cached: building one loads the CA store)."""
    key = (policy.verify, ca_file)
    ctx = _contexts.get(key)
    if ctx is not None:
        return ctx
    if policy.verify:
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _contexts[key] = ctx
    return ctx
