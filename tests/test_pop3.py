"""POP3 over real sockets with poplib (plain in dev mode, STLS, implicit TLS on 995), the
no-password-before-TLS rule, every command, AUTH PLAIN (RFC 5034), deletions only at QUIT and
in one go, and fetchmail pulling byte-exact copies."""
from __future__ import annotations

import base64
import imaplib
import poplib
import shutil
import socket
import ssl
import subprocess
import uuid

import pytest

from tests.support import init_data_dir, serve

PASSWORD = "pop3-pass-1"


def new_mailbox(server, messages: list[bytes] = ()) -> str:
    domain = f"p{uuid.uuid4().hex[:8]}.example.test"
    assert server.api("POST", "/v3/domains", data={"name": domain}).status_code == 200
    addr = f"user@{domain}"
    r = server.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": addr, "password": PASSWORD})
    assert r.status_code == 200, r.text
    if messages:
        m = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=ssl._create_unverified_context())
        m.login(addr, PASSWORD)
        for msg in messages:
            assert m.append("INBOX", None, None, msg)[0] == "OK"
        m.logout()
    return addr


def _ctx(server) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.data_dir / "tls" / "cert.pem"))


MSGS = [b"Subject: one\r\nFrom: a@far.test\r\n\r\nfirst\r\n.leading dot\r\n",
        b"Subject: two\r\n\r\nline1\r\nline2\r\nline3\r\n",
        b"Subject: three\r\n\r\n\xe9\xe8 raw latin-1\r\n"]


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("pop3strict")
    key = init_data_dir(data_dir)
    cfg = data_dir / "mailplat.toml"
    cfg.write_text(cfg.read_text().replace("dev_mode = true", "dev_mode = false"))
    srv = serve(data_dir, key, ["api", "mailaccess"])
    yield srv
    srv.stop()


def test_no_password_before_tls_then_stls_and_995(strict):
    addr = new_mailbox(strict, MSGS[:1])
    p = poplib.POP3("127.0.0.1", strict.ports["pop3"], timeout=30)
    assert "STLS" in p.capa()
    with pytest.raises(poplib.error_proto, match="STLS"):
        p.user(addr)
    p.stls(_ctx(strict))
    assert "STLS" not in p.capa()
    p.user(addr)
    p.pass_(PASSWORD)
    assert p.stat() == (1, len(MSGS[0]))
    p.quit()
    s = poplib.POP3_SSL("127.0.0.1", strict.ports["pop3s"], context=_ctx(strict), timeout=30)
    s.user(addr)
    s.pass_(PASSWORD)
    assert s.stat()[0] == 1
    s.quit()


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_auth_plain_only_after_tls(strict):
    addr = new_mailbox(strict, MSGS[:1])
    p = poplib.POP3("127.0.0.1", strict.ports["pop3"], timeout=30)
    assert "SASL" not in p.capa()
    with pytest.raises(poplib.error_proto, match="STLS"):
        p._shortcmd("AUTH PLAIN " + _plain(addr, PASSWORD))
    p.stls(_ctx(strict))
    assert p.capa()["SASL"] == ["PLAIN"]
    assert p._shortcmd("AUTH PLAIN " + _plain(addr, PASSWORD)).startswith(b"+OK")
    assert p.stat()[0] == 1 and "SASL" not in p.capa()
    p.quit()


def test_auth_plain(server):
    addr = new_mailbox(server, MSGS[:2])
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    assert p.capa()["SASL"] == ["PLAIN"]  # dev mode on loopback, as USER/PASS
    for bad, why in ((_plain(addr, "wrong password"), "AUTH"), ("%%%", "Invalid"),
                     (base64.b64encode(b"no-nul-here").decode(), "Invalid"), ("=", "Invalid")):
        with pytest.raises(poplib.error_proto, match=why):
            p._shortcmd("AUTH PLAIN " + bad)
    for line in ("AUTH LOGIN", "AUTH", "AUTH PLAIN a b"):
        with pytest.raises(poplib.error_proto, match="Unsupported"):
            p._shortcmd(line)
    p._putcmd("AUTH PLAIN")  # no initial response: an empty challenge, then "*" cancels
    assert p._getline()[0] == b"+ "
    with pytest.raises(poplib.error_proto, match="cancelled"):
        p._shortcmd("*")
    with pytest.raises(poplib.error_proto):
        p.stat()  # still not logged in
    p._putcmd("AUTH PLAIN")
    assert p._getline()[0] == b"+ "
    assert p._shortcmd(_plain(addr, PASSWORD)).startswith(b"+OK Logged in, 2 messages")
    assert p.stat() == (2, len(MSGS[0]) + len(MSGS[1]))
    with pytest.raises(poplib.error_proto, match="Already"):
        p._shortcmd("AUTH PLAIN " + _plain(addr, PASSWORD))
    p.quit()


def test_stls_drops_pipelined_plaintext(strict):
    sock = socket.create_connection(("127.0.0.1", strict.ports["pop3"]), timeout=10)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"STLS\r\nCAPA\r\n")
    assert f.readline().startswith(b"+OK")
    tls = _ctx(strict).wrap_socket(sock, server_hostname="localhost")
    tf = tls.makefile("rb")
    tls.sendall(b"NOOP\r\n")
    assert tf.readline().startswith(b"-ERR")  # NOOP before login: the injected CAPA got no answer
    tls.close()


def test_commands_and_deletion_at_quit(server):
    addr = new_mailbox(server, MSGS)
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    assert {"TOP", "UIDL", "USER", "PIPELINING"} <= set(p.capa())
    with pytest.raises(poplib.error_proto):
        p.stat()  # before login
    p.user(addr)
    with pytest.raises(poplib.error_proto, match="AUTH"):
        p.pass_("wrong password")
    p.user(addr)
    p.pass_(PASSWORD)
    assert p.stat() == (3, sum(len(m) for m in MSGS))
    resp, listing, _ = p.list()
    assert listing == [b"%d %d" % (i + 1, len(m)) for i, m in enumerate(MSGS)]
    assert p.list(2) == b"+OK 2 %d" % len(MSGS[1])
    uidls = p.uidl()[1]
    assert len({u.split()[1] for u in uidls}) == 3
    for i, m in enumerate(MSGS, 1):
        assert b"\r\n".join(p.retr(i)[1]) + b"\r\n" == m
    assert p.top(2, 1)[1] == [b"Subject: two", b"", b"line1"]
    assert p.top(2, 0)[1] == [b"Subject: two", b""]
    p.dele(1)
    with pytest.raises(poplib.error_proto):
        p.retr(1)
    assert p.stat()[0] == 2
    p.rset()
    assert p.stat()[0] == 3
    p.dele(1)
    p.dele(3)
    with pytest.raises(poplib.error_proto):
        p.retr(99)
    with pytest.raises(poplib.error_proto):
        p._shortcmd("RETR x")
    p.noop()

    # A second session still sees everything: nothing is deleted before QUIT.
    q = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    q.user(addr)
    q.pass_(PASSWORD)
    assert q.stat()[0] == 3
    q.quit()
    p.quit()

    r = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    r.user(addr)
    r.pass_(PASSWORD)
    assert r.stat() == (1, len(MSGS[1]))
    assert r.uidl(1).split()[2] == uidls[1].split()[1]
    r.quit()


def test_dropped_connection_deletes_nothing(server):
    addr = new_mailbox(server, MSGS[:2])
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    p.user(addr)
    p.pass_(PASSWORD)
    p.dele(1)
    p.sock.close()
    q = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    q.user(addr)
    q.pass_(PASSWORD)
    assert q.stat()[0] == 2
    q.quit()


def test_fetchmail_pulls_byte_exact_copies(server, tmp_path):
    if not shutil.which("fetchmail"):
        pytest.skip("fetchmail is not installed")
    msgs = [b"Subject: fm1\r\n\r\n.dot\r\nFrom the start\r\n", b"Subject: fm2\r\n\r\n" + b"q" * 998 + b"\r\n"]
    addr = new_mailbox(server, msgs)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(f'poll 127.0.0.1 protocol pop3 service {server.ports["pop3s"]} user "{addr}" '
                  f'password "{PASSWORD}" ssl sslcertck sslcertfile "{server.data_dir / "tls" / "cert.pem"}" '
                  f'sslcertpath "{tmp_path}" sslcommonname "localhost" '
                  f'mda "/bin/sh -c \'cat > {out_dir}/msg.$$\'" keep\n')
    rc.chmod(0o600)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(tmp_path)}
    res = subprocess.run(["fetchmail", "-f", str(rc), "--nosyslog", "-v"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    got = []
    for path in out_dir.iterdir():
        data = path.read_bytes()
        # fetchmail prepends its own Received header and delivers LF line ends to an MDA.
        head, _, rest = data.partition(b"\n")
        while rest[:1] in (b" ", b"\t"):
            _, _, rest = rest.partition(b"\n")
        got.append(rest if head.startswith(b"Received:") else data)
    assert sorted(got) == sorted(m.replace(b"\r\n", b"\n") for m in msgs)
