"""smtp.processes = 2: a second process serves the submission port (SO_REUSEPORT) on the same
store.  Over real sockets with smtplib: connections are spread over both processes, each
accepts and commits mail (its queue row is there when 250 comes), the MX port stays in the
first process, a second process killed with -9 is started again and the port keeps working
meanwhile,
and none outlives the service."""
from __future__ import annotations

import contextlib
import os
import signal
import smtplib

import pytest

from tests.support import spawned_children, wait_for
from tests.test_domains_api import store_query
from tests.test_smtp_submission import queued_id
from tests.test_smtp_trusted import smtpd_with_domain

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def two(tmp_path):
    with smtpd_with_domain(tmp_path / "data", "p", ["smtp.processes=2", "smtp.trusted_networks=127.0.0.0/8"]) as srv:
        yield srv


def _listeners(port: int) -> int:
    """How many sockets listen on loopback TCP `port`."""
    with open("/proc/net/tcp") as f:
        next(f)
        return sum(1 for line in f if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port)


def _tcp_inodes() -> dict[tuple[int, int], int]:
    """(local port, remote port) -> socket inode, for the loopback TCP connections."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, remote, inode = cols[1], cols[2], int(cols[9])
            out[(int(local.split(":")[1], 16), int(remote.split(":")[1], 16))] = inode
    return out


def _owner(pids: list[int], inode: int) -> int | None:
    """The process among `pids` holding the socket `inode`."""
    want = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                        return pid
    return None


def _submit(srv, c: smtplib.SMTP, n: int) -> str:
    sender = f"app@{srv.domain}"
    c.mail(sender)
    c.rcpt(f"user{n}@remote.test")
    code, reply = c.data(f"From: <{sender}>\r\nTo: user{n}@remote.test\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode())
    assert code == 250, reply
    return queued_id(reply)


def _queued(srv, message_id: str) -> list[tuple]:
    return store_query(srv, "select q.recipient, q.state from queue_item q join message m "
                            "on m.id = q.message_id where m.message_id = ?", message_id)


def test_two_processes_share_the_submission_port(two):
    parent = two.proc.pid
    [child] = wait_for(lambda: spawned_children(parent), timeout=30, what="the second smtpd process")
    port = two.ports["submission"]
    wait_for(lambda: _listeners(port) == 2, timeout=30, what="the second process to listen")

    # Connections are spread over both processes; each one's 250 means its row is committed.
    clients = []
    try:
        for _ in range(24):
            c = smtplib.SMTP("127.0.0.1", port, timeout=30)
            c.ehlo("client.test")
            clients.append(c)
        inodes = _tcp_inodes()
        owners = {_owner([parent, child], inodes[(port, c.sock.getsockname()[1])]) for c in clients}
        assert owners == {parent, child}
        for n, c in enumerate(clients):
            message_id = _submit(two, c, n)
            assert _queued(two, message_id) == [(f"user{n}@remote.test", "queued")]
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.quit()

    # The MX port is served by the first process alone.
    mx = smtplib.SMTP("127.0.0.1", two.ports["smtp"], timeout=30)
    try:
        mx.ehlo("client.test")
        inodes = _tcp_inodes()
        assert _owner([parent, child], inodes[(two.ports["smtp"], mx.sock.getsockname()[1])]) == parent
    finally:
        mx.quit()

    # A second process killed with -9 is started again; the port keeps accepting meanwhile
    # (once its socket is gone: connections already queued on it are reset by the kernel).
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: _listeners(port) == 1, timeout=30, what="the killed process's socket to close")
    for n in range(100, 110):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("client.test")
            assert _queued(two, _submit(two, c, n)) == [(f"user{n}@remote.test", "queued")]
    [again] = wait_for(lambda: [p for p in spawned_children(parent) if p != child], timeout=30,
                       what="the second smtpd process to be started again")
    wait_for(lambda: _listeners(port) == 2, timeout=30, what="the new second process to listen")

    two.stop()
    assert not spawned_children(parent)
    wait_for(lambda: not os.path.exists(f"/proc/{again}") or "Z" in open(f"/proc/{again}/stat").read().split(")")[1][:3],
             timeout=30, what="the second process to exit with the service")
