"""DKIM signing helper processes (relay.signer) over their real pipes, and the relay without them
(relay.signing_processes = 0: signed in the relay's threads).  The helpers' use inside a running
relay (a helper killed and replaced) is in tests/test_relay_connections.py."""
from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailplat.mailauth import dkim as dkimsign
from mailplat.relay import signer
from tests.conftest import dns_sets
from tests.relaytest import create_domain, dkim_verify_perl, point_mx, send
from tests.smtpsink import SmtpSink
from tests.support import spawned_children, start_server

pytestmark = pytest.mark.timeout(120)

RAW = (b"From: Ann <ann@example.test>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
       b"Message-Id: <1@example.test>\r\n\r\nHello Bob.\r\n")


@pytest.fixture(scope="module")
def pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_helper_signs_exactly_as_the_relay_would(pem):
    async def run():
        pool = signer.SignerPool(2)
        await pool.start()
        try:
            message = dkimsign.canonical_lines(RAW)
            headers = await asyncio.gather(*(pool.signature(message, "example.test", "s1", pem)
                                             for _ in range(10)))
            with pytest.raises(signer.SigningFailed, match="unusable DKIM private key"):
                await pool.signature(message, "example.test", "s1", b"not a key")
            return headers, [h.proc.pid for h in pool.slots]
        finally:
            await pool.close()
    headers, pids = asyncio.run(run())
    # RSASSA-PKCS1-v1_5 is deterministic: the same bytes as signing in this process.
    assert set(headers) == {dkimsign.sign(RAW, "example.test", "s1", pem)[:len(headers[0])]}
    assert headers[0].startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;")
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # close() ended both


def test_requests_of_a_dead_helper_fail_over_and_a_new_one_starts(pem, monkeypatch):
    monkeypatch.setattr(signer, "RESTART_DELAY", 0.0)

    async def run():
        pool = signer.SignerPool(1)
        await pool.start()
        try:
            message = dkimsign.canonical_lines(RAW)
            await pool.signature(message, "example.test", "s1", pem)  # the helper is up
            first = pool.slots[0].proc.pid
            # Killed with requests waiting: each one fails with SignerUnavailable, none hangs.
            waiting = [asyncio.ensure_future(pool.signature(message, "example.test", "s1", pem))
                       for _ in range(50)]
            await asyncio.sleep(0)
            os.kill(first, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 30)
            failed = [r for r in results if isinstance(r, signer.SignerUnavailable)]
            assert failed and all(isinstance(r, (bytes, signer.SignerUnavailable)) for r in results)
            # The next request starts a new helper, which signs.
            header = await pool.signature(message, "example.test", "s1", pem)
            assert pool.slots[0].proc.pid != first
            return header
        finally:
            await pool.close()
    assert asyncio.run(run()).startswith(b"DKIM-Signature:")


def test_relay_signs_in_a_thread_when_no_helper_can(tmp_path, pem, monkeypatch):
    """The relay's own fallback: its helper is dead and not due to be started again, so the
    copy is signed in a thread, byte for byte as a helper would have, instead of failing."""
    from types import SimpleNamespace

    from mailplat import config as configmod
    from mailplat.relay.worker import Job, Worker
    monkeypatch.setattr(signer, "RESTART_DELAY", 3600.0)
    cfg = configmod.load(data_dir=tmp_path, env={}, check_files=False)

    async def run():
        relay = Worker(SimpleNamespace(config=cfg, clock=lambda: 0.0, resolver=None))
        relay.signer = signer.SignerPool(1)
        await relay.signer.start()
        helper = relay.signer.slots[0]
        await relay.signer.signature(dkimsign.canonical_lines(RAW), "example.test", "s1", pem)  # up
        relay.signer.restart_at = 1e18  # started "just now": no new helper for a long while
        os.kill(helper.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(helper.reader, 10)  # the relay has seen it exit
        message = SimpleNamespace(recipient_variables={}, options={})
        job = Job(item=SimpleNamespace(message=message, recipient="bob@example.net"), raw=RAW,
                  domain_row=None, signing=("example.test", "s1", pem))
        try:
            with pytest.raises(signer.SignerUnavailable):
                await relay.signer.signature(b"x\r\n", "example.test", "s1", pem)
            return await relay._prepare(job)
        finally:
            await relay.signer.close()
    assert asyncio.run(run()) == dkimsign.sign(RAW, "example.test", "s1", pem)


def test_relay_without_helpers_signs_in_its_threads(tmp_path, dns_server):
    sink = SmtpSink().start()
    server = start_server(tmp_path / "data", sets=dns_sets(dns_server) + [
        "relay.allow_private_mx=true", f"relay.remote_port={sink.port}", "relay.signing_processes=0"])
    try:
        sender = f"s{uuid.uuid4().hex[:8]}.example.test"
        create_domain(server, dns_server, sender)
        rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
        point_mx(dns_server, rdom, "127.0.0.1")
        send(server, sender, [f"tom@{rdom}"])
        got = sink.wait_count(1)[0]
        assert dkim_verify_perl(got.data, dns_server.port) == "pass\npass(pass)"
        assert spawned_children(server.proc.pid, b"mailplat.relay.signer") == []
    finally:
        server.stop()
        sink.stop()
