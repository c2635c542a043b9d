"""SMTP defences over real sockets (SECURITY.md's SMTP rows): strict address syntax, SMTP
smuggling, STARTTLS plaintext injection, line limits, the error budget, the per-command
deadline, the per-IP connection cap, the AUTH throttle, AUTH never logged, and an orderly stop
that lets a message in DATA finish."""
from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import threading
import time
import uuid

import pytest

from tests.conftest import PG_BASE
from tests.support import MailplatServer, pg_database, start_server, wait_for
from tests.test_domains_api import store_query

PASSWORD = "Hardening-pw-1"


class Raw:
    """A bare SMTP client: exact bytes out, whole replies (code, lines) back."""

    def __init__(self, port: int, source: str | None = None, timeout: float = 15.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, list[bytes]]:
        lines = []
        while True:
            line = self.file.readline(100_000)
            if not line:
                raise ConnectionError("closed by server")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> tuple[int, list[bytes]]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the server has closed the connection (reads EOF)."""
        try:
            return self.file.readline() == b""
        except (ConnectionError, socket.timeout):
            return False

    def starttls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_database(PG_BASE)) if os.environ.get("MAILPLAT_TEST_PG_SERVER") and PG_BASE else None
        srv = start_server(tmp_path_factory.mktemp("smtphard"), db_url=url,
                           sets=["smtp.command_timeout=1.5", "smtp.max_connections_per_ip=4"],
                           services=["api", "smtpd"])
        try:
            yield from _with_domain(srv)
        finally:
            srv.stop()


def _with_domain(srv):
    domain = f"h{uuid.uuid4().hex[:8]}.example.test"
    r = srv.api("POST", "/v3/domains", data={"name": domain, "smtp_password": PASSWORD})
    assert r.status_code == 200, r.text
    r = srv.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": "bob", "password": "bob-pass-1"})
    assert r.status_code == 200, r.text
    srv.domain = domain
    yield srv


def mx(srv: MailplatServer, **kw) -> Raw:
    c = Raw(srv.ports["smtp"], **kw)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    return c


def jobs(srv: MailplatServer) -> int:
    return store_query(srv, "select count(*) from inbound_job")[0][0]


@pytest.mark.parametrize("arg,code,enhanced", [
    ("MAIL FROM:<a@b", 501, b"5.1.7"),
    ("MAIL FROM:a@b.test", 501, b"5.1.7"),
    ("MAIL FROM:<a@b.test> junk", 555, b"5.5.4"),
    ("MAIL FROM:<a@b.test> BODY=BINARY=X", 501, b"5.5.4"),
    ("MAIL FROM:<a@@b.test>", 501, b"5.1.7"),
    ("MAIL FROM:<a b@b.test>", 501, b"5.1.7"),
    ("MAIL FROM:<a@b.test>x", 501, b"5.1.7"),
    ("MAIL FROM:<a@-b.test>", 501, b"5.1.7"),
    ("MAIL FROM:<a..b@b.test>", 501, b"5.1.7"),
    ("MAIL FROM:<a@b.test> SIZE=999999999", 552, b"5.3.4"),
    ("MAIL FROM:<a@b.test> FOO=1", 555, b"5.5.4"),
    ("MAIL TO:<a@b.test>", 501, b"5.5.4"),
])
def test_strict_sender_syntax(hard, arg, code, enhanced):
    c = mx(hard)
    got, lines = c.cmd(arg)
    assert (got, lines[0].split()[1]) == (code, enhanced), lines
    # The session is still usable: a good MAIL is accepted afterwards.
    assert c.cmd("MAIL FROM:<ok@b.test>")[0] == 250
    c.close()


@pytest.mark.parametrize("arg", ["RCPT TO:<bob@x.test", "RCPT TO:bob@x.test", "RCPT TO:<>",
                                 "RCPT TO:<@x.test>", "RCPT TO:<bob@x.test>>"])
def test_strict_recipient_syntax(hard, arg):
    c = mx(hard)
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    code, lines = c.cmd(arg.replace("x.test", hard.domain))
    assert code == 501 and lines[0].startswith(b"501 5.1.3"), lines
    c.close()


@pytest.mark.parametrize("body", [
    b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<x@evil.test>\r\n",
    b"Subject: s\r\n\r\nhello\n.\r\nMAIL FROM:<x@evil.test>\r\n",
    b"Subject: s\r\n\r\nhello\r\n.\nMAIL FROM:<x@evil.test>\r\n",
    b"Subject: s\r\n\r\nhello\r.\r\nMAIL FROM:<x@evil.test>\r\n",
    b"Subject: s\r\n\r\nbare\rcr\r\n",
    b"Subject: s\r\n\r\nbare\nlf\r\n",
])
def test_smtp_smuggling_is_refused(hard, body):
    """Only <CRLF>.<CRLF> ends DATA; bare CR or LF rejects the whole message, so a smuggled
    second transaction is neither executed nor stored."""
    before = jobs(hard)
    c = mx(hard)
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<bob@{hard.domain}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    smuggled = (body + f"RCPT TO:<bob@{hard.domain}>\r\nDATA\r\nsmuggled\r\n".encode())
    code, lines = c.cmd(smuggled + b".")
    assert code == 554 and lines[0].startswith(b"554 5.6.0"), lines
    # Exactly one reply for the whole thing: the next command gets its own answer.
    assert c.cmd("NOOP") == (250, [b"250 2.0.0 OK"])
    assert jobs(hard) == before
    c.close()


def test_dot_stuffing_and_pipelined_commands_after_data(hard):
    before = jobs(hard)
    c = mx(hard)
    c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bob@" + hard.domain.encode() + b">\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: dots\r\n\r\n..leading dot\r\n.\r\nNOOP\r\nQUIT\r\n")
    code, lines = c.reply()
    assert code == 250, lines
    assert c.reply()[0] == 250
    assert c.reply()[0] == 221
    assert jobs(hard) == before + 1
    job_blob = store_query(hard, "select blob from inbound_job order by id desc limit 1")[0][0]
    data = bytes(store_query(hard, "select data from blob where sha256 = ?", job_blob)[0][0])
    assert data.startswith(b"Received: ")  # our trace header, then the client's bytes unstuffed
    assert data.split(b"\r\n", 2)[2] == b"Subject: dots\r\n\r\n.leading dot\r\n"


def test_starttls_drops_pipelined_plaintext(hard):
    """CVE-2011-0411 class: a command sent in plaintext after STARTTLS must not be executed
    as if it came over TLS."""
    c = mx(hard)
    c.send(b"STARTTLS\r\nNOOP\r\n")
    code, lines = c.reply()
    assert code == 220, lines
    c.starttls()
    code, lines = c.cmd("EHLO again.test")
    # The first reply over TLS answers EHLO, not the injected NOOP.
    assert code == 250 and len(lines) > 1 and b"STARTTLS" not in b"".join(lines), lines
    assert c.cmd("NOOP") == (250, [b"250 2.0.0 OK"])
    c.close()


def test_command_line_limit(hard):
    c = mx(hard)
    code, lines = c.cmd("NOOP " + "x" * 600)
    assert code == 500 and lines[0].startswith(b"500 5.5.2"), lines
    code, lines = c.cmd("NOOP " + "x" * 100_000)
    assert code == 500, lines
    assert c.cmd("NOOP")[0] == 250
    code, lines = c.cmd(b"NOOP\n")  # bare LF ending
    assert code == 500, lines
    c.close()


def test_too_many_errors_closes(hard):
    c = mx(hard)
    codes = []
    for i in range(25):
        try:
            codes.append(c.cmd(f"BOGUS{i}")[0])
        except ConnectionError:
            break
    assert codes[:20] == [500] * 20 and codes[20:] == [421], codes
    assert c.closed()
    c.close()


def test_command_deadline_moves_with_each_command_on_one_timer():
    """Unit test of the lazily moved deadline, on a fake clock: a session whose commands each
    come in time is never timed out however long it lasts, time spent on our side (paused)
    does not count, and one late command still ends it."""
    import asyncio
    import types

    from mailplat.smtpd.protocol import Session

    class Clock:
        now = 0.0
        timers: list = []

        def time(self):
            return self.now

        def call_at(self, when, cb):
            handle = asyncio.TimerHandle(when, cb, (), loop)
            self.timers.append(handle)
            return handle

        def run_until(self, t):
            self.now = t
            for handle in list(self.timers):
                if handle.when() <= t and not handle.cancelled():
                    self.timers.remove(handle)
                    handle._run()

    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        shared = types.SimpleNamespace(hostname="h.test", max_size=1000, timeout=1.5)
        session = Session(shared, None, False)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    clock = session.loop = Clock()
    fired = []
    session._timeout_cb = lambda: fired.append(clock.now)
    session._reset_timeout()
    clock.run_until(1.0)
    session._reset_timeout()  # the next command: its deadline is 2.5, no new timer
    assert len(clock.timers) == 1
    clock.run_until(1.5)
    assert fired == [] and [h.when() for h in clock.timers] == [2.5]
    session._pause_timeout()  # our own work from here on
    clock.run_until(9.0)
    assert fired == [] and clock.timers == []
    session._reset_timeout()
    clock.run_until(10.0)
    assert fired == []
    clock.run_until(10.5)
    assert fired == [10.5]


def test_idle_and_half_sent_command_time_out(hard):
    c = mx(hard)
    c.send(b"NOOP")  # never finished: the per-command deadline (1.5 s here) ends the session
    c.sock.settimeout(10)
    code, lines = c.reply()
    assert code == 421 and lines[0].startswith(b"421 4.4.2"), lines
    assert c.closed()
    c.close()


def test_per_ip_connection_cap(hard):
    held = [mx(hard) for _ in range(4)]
    extra = Raw(hard.ports["smtp"])
    code, lines = extra.reply()
    assert code == 421 and lines[0].startswith(b"421 4.7.0"), lines
    extra.close()
    other = mx(hard, source="127.0.0.2")  # another address is not affected
    assert other.cmd("NOOP")[0] == 250
    other.close()
    held[0].cmd("QUIT")
    held[0].close()
    # A slot frees up once a session ends.
    again = wait_for(lambda: _try_session(hard), timeout=10, what="a free connection slot")
    again.close()
    for c in held[1:]:
        c.close()


def _try_session(srv):
    c = Raw(srv.ports["smtp"])
    if c.reply()[0] == 220:
        return c
    c.close()
    return None


def test_long_body_lines_accepted_up_to_cap(hard):
    before = jobs(hard)
    c = mx(hard)
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<bob@{hard.domain}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    body = b"Subject: long\r\n\r\n" + b"y" * 200_000 + b"\r\n"
    assert c.cmd(body + b".")[0] == 250
    assert jobs(hard) == before + 1
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<bob@{hard.domain}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    code, lines = c.cmd(b"Subject: huge line\r\n\r\n" + b"z" * 1_200_000 + b"\r\n.")
    assert code == 500 and lines[0].startswith(b"500 5.5.2"), lines
    assert jobs(hard) == before + 1
    c.close()


def _auth_plain(c: Raw, login: str, password: str) -> tuple[int, list[bytes]]:
    blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return c.cmd(f"AUTH PLAIN {blob}")


def _submission(srv, source=None) -> Raw:
    c = Raw(srv.ports["submission"], source=source)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    return c


def test_auth_failures_escalate_then_421_and_valid_logins_still_work(hard):
    login = f"postmaster@{hard.domain}"
    attacker = "127.0.0.5"
    timings = []
    refused = None
    for attempt in range(12):
        c = _submission(hard, source=attacker)
        start = time.monotonic()
        code, lines = _auth_plain(c, login, f"wrong-{attempt}")
        timings.append(time.monotonic() - start)
        c.close()
        if code == 421:
            refused = (attempt, lines)
            break
        assert code == 535 and lines[0].startswith(b"535 5.7.8"), lines
    assert refused is not None and refused[1][0].startswith(b"421 4.7.0"), timings
    # The first failures are answered at once; later ones wait longer and longer (the
    # comparisons are relative: argon2 itself is slow on a loaded machine).
    slowest = timings[refused[0] - 1]
    assert slowest >= 1.9 and slowest - max(timings[0], timings[1]) >= 1.5, timings
    assert timings[2] < timings[3] < timings[4], timings
    # The same account from another address still logs in with the right password, without
    # the escalated delay.
    c = _submission(hard, source="127.0.0.6")
    start = time.monotonic()
    code, lines = _auth_plain(c, login, PASSWORD)
    assert code == 235, lines
    assert time.monotonic() - start < slowest - 1.0
    assert c.cmd(f"MAIL FROM:<postmaster@{hard.domain}>")[0] == 250
    c.close()
    # The attacker's address stays refused, even with the right password.
    c = _submission(hard, source=attacker)
    assert _auth_plain(c, login, PASSWORD)[0] == 421
    c.close()
    assert "AUTH failed" in hard.logs()


def test_auth_secrets_never_logged(hard):
    secret = "Never-Log-Me-7"
    c = _submission(hard, source="127.0.0.7")
    login = f"nobody@{hard.domain}"
    _auth_plain(c, login, secret)
    code, _ = c.cmd("AUTH LOGIN")
    assert code == 334
    c.cmd(base64.b64encode(login.encode()))
    c.cmd(base64.b64encode(secret.encode()))
    c.close()
    logs = hard.logs()
    assert "AUTH failed" in logs
    for needle in (secret, base64.b64encode(secret.encode()).decode(),
                   base64.b64encode(f"\0{login}\0{secret}".encode()).decode()):
        assert needle not in logs


def test_stop_lets_a_message_in_data_finish(tmp_path):
    srv = start_server(tmp_path, services=["api", "smtpd"])
    try:
        domain = f"s{uuid.uuid4().hex[:8]}.example.test"
        assert srv.api("POST", "/v3/domains", data={"name": domain}).status_code == 200
        assert srv.api("POST", f"/v3/{domain}/mailboxes",
                       data={"mailbox": "bob", "password": "bob-pass-1"}).status_code == 200
        idle = mx(srv)
        c = mx(srv)
        assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
        assert c.cmd(f"RCPT TO:<bob@{domain}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        # The idle session is told 421 and new connections are refused...
        code, lines = idle.reply()
        assert code == 421 and lines[0].startswith(b"421 4.3.2"), lines
        wait_for(lambda: _refused(srv.ports["smtp"]), timeout=20, what="listener to close")
        # ...while the session in DATA finishes its message and gets 250.
        code, lines = c.cmd(b"second half\r\n.")
        assert code == 250, lines
        stopper.join(60)
        assert srv.proc.returncode == 0
        rows = store_query(srv, "select count(*) from inbound_job")
        assert rows[0][0] == 1
    finally:
        srv.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


def test_unanswered_auth_challenge_times_out(hard):
    c = _submission(hard, source="127.0.0.8")
    assert c.cmd("AUTH LOGIN")[0] == 334
    c.sock.settimeout(10)
    code, lines = c.reply()  # no answer sent: the command deadline (1.5 s here) applies
    assert code == 421 and lines[0].startswith(b"421 4.4.2"), lines
    assert c.closed()
    c.close()


def test_address_length_limits(hard):
    c = mx(hard)
    # Long return paths (VERP, SRS) are real mail: only the 256-octet path limit applies.
    assert c.cmd(f"MAIL FROM:<SRS0=ab12=CD=example.org={'x' * 60}@forwarder.test>")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<{'b' * 65}@{hard.domain}>")
    assert code == 501 and lines[0].startswith(b"501 5.1.3"), lines
    c.cmd("RSET")
    code, lines = c.cmd(f"MAIL FROM:<{'a' * 250}@b.test>")
    assert code == 501 and lines[0].startswith(b"501 5.1.7"), lines
    c.close()
