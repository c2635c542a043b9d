"""Spam filtering of inbound mail: SpamAssassin's spamd (through aiospamc) and an SPF check of
the envelope sender (pyspf, over the configured resolver).

Owns the verdict for one inbound message (`check`: spam or not, score, SPF result; spamd
unreachable or the message over `spam.max_bytes` means "unchecked", never a lost message), the
per-domain decision (`spam_action`: disabled = no check, tag = X-Mailgun-Sflag / -Sscore / -Spf
headers prepended, block = not delivered, with a `rejected` event saying why) and those headers.
core.routejobs asks it before routes and lists run.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import aiospamc
import dns.exception
import dns.resolver

from .. import logs

log = logs.get("mailplat.spam")
_spf_lock = threading.Lock()


@dataclass
class Verdict:
    checked: bool
    is_spam: bool = False
    score: float = 0.0
    spf: str = "None"


def _spf_lookup_factory(cfg):
    resolver = dns.resolver.Resolver(configure=not cfg.nameserver)
    if cfg.nameserver:
        resolver.nameservers = [cfg.nameserver]
        resolver.port = cfg.port
    resolver.timeout = resolver.lifetime = cfg.timeout
    import spf

    def lookup(name, qtype, tcpfallback=True, timeout=30):
        out = []
        try:
            for rdata in resolver.resolve(name, qtype, lifetime=min(timeout, cfg.timeout)):
                if qtype in ("A", "AAAA"):
                    out.append(((name, qtype), rdata.address))
                elif qtype == "MX":
                    out.append(((name, qtype), (rdata.preference, rdata.exchange)))
                elif qtype == "PTR":
                    out.append(((name, qtype), rdata.target.to_text(True)))
                elif qtype in ("TXT", "SPF"):
                    out.append(((name, qtype), rdata.strings))
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            pass
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {exc}") from None
        return out
    return lookup


def _spf_sync(dns_cfg, ip: str, mail_from: str, helo: str) -> str:
    import spf
    if not ip or not mail_from:
        return "None"
    with _spf_lock:  # pyspf's resolver hook is module-global
        spf.DNSLookup = _spf_lookup_factory(dns_cfg)
        try:
            result, _ = spf.check2(i=ip, s=mail_from, h=helo or ip, timeout=dns_cfg.timeout * 2)
        except Exception:  # noqa: BLE001 - an SPF failure to evaluate is "temperror", not a crash
            result = "temperror"
    names = {"pass": "Pass", "fail": "Fail", "softfail": "SoftFail", "neutral": "Neutral",
             "none": "None", "temperror": "TempError", "permerror": "PermError"}
    return names.get(result, "None")


async def check(ctx, raw: bytes, peer: str, mail_from: str) -> Verdict:
    cfg = ctx.config.spam
    spf_task = asyncio.to_thread(_spf_sync, ctx.config.dns, peer, mail_from, "")
    verdict = Verdict(checked=False)
    if cfg.spamd_host and len(raw) <= cfg.max_bytes:
        try:
            resp = await asyncio.wait_for(
                aiospamc.check(raw, host=cfg.spamd_host, port=cfg.spamd_port,
                               timeout=aiospamc.Timeout(total=cfg.timeout, connection=min(5.0, cfg.timeout))),
                cfg.timeout + 1)
            value = resp.headers.spam
            verdict = Verdict(checked=True, is_spam=bool(value.value), score=float(value.score))
        except Exception as exc:  # noqa: BLE001 - spamd down: accept, tag unchecked
            log.warning("spamd unavailable; message left unchecked",
                        extra={"fields": {"error": f"{type(exc).__name__}: {exc}"[:200]}})
    try:
        verdict.spf = await asyncio.wait_for(spf_task, ctx.config.dns.timeout * 3 + 1)
    except Exception:  # noqa: BLE001
        verdict.spf = "TempError"
    return verdict


def tag_headers(v: Verdict) -> bytes:
    if not v.checked:
        lines = ["X-Mailgun-Sflag: Unchecked", f"X-Mailgun-Spf: {v.spf}"]
    else:
        lines = [f"X-Mailgun-Sflag: {'Yes' if v.is_spam else 'No'}", f"X-Mailgun-Sscore: {v.score:.1f}",
                 f"X-Mailgun-Spf: {v.spf}"]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
