"""Wake-ups between the processes of one host (mailplat.triggers), over real Unix sockets: a
poke reaches a listener of its topic in another process, a dead process's socket is
removed, and in a split deployment (services as separate `serve` processes, as the systemd
units run them) a message sent through the API wakes the relay process, and mail taken by the
MX wakes the mailaccess process that files it."""
from __future__ import annotations

import imaplib
import smtplib
import subprocess
import sys
import uuid

import pytest

from mailplat import triggers
from tests.conftest import dns_sets
from tests.relaytest import create_domain, point_mx, send, start_relay
from tests.smtpsink import SmtpSink
from tests.support import ROOT, serve, start_server, wait_for

pytestmark = pytest.mark.timeout(120)

LISTENER = """
import asyncio, sys
from mailplat import triggers
async def main():
    done = asyncio.Event()
    listeners = [triggers.listen(sys.argv[1], topic, lambda topic=topic: print(topic, flush=True))
                 for topic in ("queue", "inbound")]
    listeners.append(triggers.listen(sys.argv[1], "done", lambda: (print("done", flush=True), done.set())))
    print("listening", flush=True)
    await done.wait()
    for listener in listeners:
        listener.close()
asyncio.run(main())
"""


def test_poke_wakes_another_process_and_clears_dead_sockets(tmp_path):
    """Each poke wakes the other process's listener of its own topic and no other one."""
    child = subprocess.Popen([sys.executable, "-c", LISTENER, str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "listening"
        names = sorted(p.name.split(".")[:2] for p in triggers.run_dir(tmp_path).iterdir())
        assert names == [[t, str(child.pid)] for t in ("done", "inbound", "queue")]
        triggers.poke(tmp_path, "inbound")
        assert child.stdout.readline().strip() == "inbound"
        triggers.poke(tmp_path, "done")
        assert child.wait(30) == 0
        # Its queue listener was never woken: neither poke was for it.
        assert child.stdout.read() == "done\n"
    finally:
        child.kill()
    assert not list(triggers.run_dir(tmp_path).iterdir())  # it removed its sockets on close

    # A socket left by a process that died without closing it goes at the next poke.
    dead = subprocess.run([sys.executable, "-c", "import socket, sys; socket.socket(socket.AF_UNIX, "
                           "socket.SOCK_DGRAM).bind(sys.argv[1] + '/run/queue.1.dead')", str(tmp_path)],
                          cwd=ROOT, check=True)
    assert dead.returncode == 0 and (triggers.run_dir(tmp_path) / "queue.1.dead").exists()
    triggers._peers.clear()  # forget the listing cached a moment ago
    triggers.poke(tmp_path, "queue")
    assert not (triggers.run_dir(tmp_path) / "queue.1.dead").exists()


def test_api_process_wakes_a_separate_relay_process(tmp_path, dns_server):
    sink = SmtpSink().start()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={sink.port}"]
    api = start_server(tmp_path / "data", sets=sets, services=["api"])
    relay_log = tmp_path / "relay.log"
    relay = None
    try:
        relay = start_relay(tmp_path / "data", relay_log)
        wait_for(lambda: any(p.name.startswith(f"queue.{relay.pid}.")
                             for p in triggers.run_dir(tmp_path / "data").iterdir()),
                 timeout=30, what="the relay's wake-up socket")
        sender = f"s{uuid.uuid4().hex[:8]}.example.test"
        create_domain(api, dns_server, sender)
        rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
        point_mx(dns_server, rdom, "127.0.0.1")
        send(api, sender, [f"user@{rdom}"])
        wait_for(lambda: any(f"user@{rdom}" in m.rcpt_tos for m in sink.messages), timeout=30,
                 what="the relay process to deliver")
        assert "woken by another process [topic=queue]" in relay_log.read_text()
    finally:
        if relay is not None:
            relay.terminate()
            assert relay.wait(30) == 0
        assert api.stop() == 0
        sink.stop()
    assert not [p for p in triggers.run_dir(tmp_path / "data").iterdir() if p.name.startswith("queue.")]


def test_mx_process_wakes_a_separate_mailaccess_process(tmp_path):
    smtpd = start_server(tmp_path / "data", services=["api", "smtpd"])
    mailaccess = None
    try:
        mailaccess = serve(tmp_path / "data", smtpd.key, ["mailaccess"])
        domain = f"m{uuid.uuid4().hex[:8]}.example.test"
        assert smtpd.api("POST", "/v3/domains", data={"name": domain}).status_code == 200
        r = smtpd.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": "ann", "password": "a long password"})
        assert r.status_code == 200, r.text
        with smtplib.SMTP("127.0.0.1", smtpd.ports["smtp"], timeout=30) as c:
            c.sendmail("someone@elsewhere.test", [f"ann@{domain}"], b"Subject: hi\r\n\r\nhello\r\n")
        imap = imaplib.IMAP4("127.0.0.1", mailaccess.ports["imap"])
        try:
            imap.login(f"ann@{domain}", "a long password")
            wait_for(lambda: imap.select("INBOX")[1] == [b"1"], timeout=30, what="the message to be filed")
        finally:
            imap.logout()
        assert "woken by another process [topic=inbound]" in mailaccess.logs()
    finally:
        if mailaccess is not None:
            assert mailaccess.stop() == 0
        assert smtpd.stop() == 0
