"""Process lifecycle of `mailplat serve`: SIGTERM stops accepting, lets in-flight work finish and
exits 0; each service runs alone, several at once on one store; secrets never reach the logs."""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from tests.support import MAILPLAT, ROOT, init_data_dir, run_cli, start_server, wait_for

SERVICE_PORTS = {
    "api": {"api"},
    "smtpd": {"smtp", "submission", "submissions"},
    "mailaccess": {"imap", "imaps", "pop3", "pop3s"},
    "relay": set(),
    "hooks": set(),
}


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _recv_all(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _add_domain(srv, name: str, password: str | None = None) -> None:
    data = {"name": name, "dkim_key_size": "1024"}
    if password:
        data["smtp_password"] = password
    r = srv.api("POST", "/v4/domains", data=data)
    assert r.status_code == 200, r.text


# -- SIGTERM ----------------------------------------------------------------------------------
def _server_unread_bytes(server_port: int, client_port: int) -> int | None:
    """Bytes the server process has not yet read from our connection (kernel rx queue)."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[1], 16)
    return None


def _post_keys_head(srv, body: bytes, expect: bool = False) -> bytes:
    auth = base64.b64encode(f"api:{srv.key}".encode()).decode()
    return (f"POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            + ("Expect: 100-continue\r\n" if expect else "")
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()


def _http_json(response: bytes) -> tuple[bytes, dict]:
    status, _, rest = response.partition(b"\r\n")
    return status, json.loads(rest.partition(b"\r\n\r\n")[2] or b"{}")


def test_sigterm_finishes_an_api_request_in_flight(tmp_path):
    """A request whose handler is waiting on the store when SIGTERM arrives still gets its 200
    (and its commit); the listener closes meanwhile; the process then exits 0."""
    srv = start_server(tmp_path / "d", services=["api"])
    port = srv.ports["api"]
    body = b"description=finished-after-sigterm&role=admin"
    blocker = sqlite3.connect(srv.data_dir / "mailplat.db", isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the handler's write must wait
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(_post_keys_head(srv, body) + body)
        client_port = sock.getsockname()[1]
        wait_for(lambda: _server_unread_bytes(port, client_port) == 0, timeout=15,
                 what="the server to read the whole request")
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # no answer yet: the handler waits on the store
            sock.recv(1)
        sock.setblocking(True)
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not _accepts(port), timeout=15, what="the listener to close")
        assert srv.proc.poll() is None, "exited with a request in flight"
        blocker.execute("ROLLBACK")
        status, payload = _http_json(_recv_all(sock))
    finally:
        sock.close()
        blocker.close()
    assert status == b"HTTP/1.1 200 OK", payload
    assert payload["key"]["description"] == "finished-after-sigterm"
    assert srv.proc.wait(30) == 0
    # committed before the 200: the key is in the store after the process is gone
    assert payload["key"]["id"] in run_cli(srv.data_dir, "key", "list").stdout


def test_sigterm_finishes_a_request_whose_body_is_still_uploading(tmp_path):
    srv = start_server(tmp_path / "d", services=["api"])
    port = srv.ports["api"]
    body = b"description=uploading-at-sigterm&role=admin"
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(_post_keys_head(srv, body, expect=True))
        sock.settimeout(30)
        # "100 Continue": the server is handling this request and waits for its body
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not _accepts(port), timeout=15, what="the listener to close")
        sock.sendall(body)
        try:
            status, _ = _http_json(_recv_all(sock, timeout=5))
        except (socket.timeout, ValueError):
            status = b"no response"
    finally:
        sock.close()
        srv.stop(timeout=5)
    assert status == b"HTTP/1.1 200 OK"


def test_sigterm_finishes_an_smtp_message_in_data(tmp_path):
    domain = f"life{secrets.token_hex(4)}.example.test"
    password = "pw-" + secrets.token_hex(6)
    srv = start_server(tmp_path / "d", services=["api", "smtpd"])
    _add_domain(srv, domain, password)
    port = srv.ports["submission"]
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        smtp.ehlo("client.example.test")
        smtp.login(f"postmaster@{domain}", password)
        assert smtp.mail(f"postmaster@{domain}")[0] == 250
        assert smtp.rcpt("someone@elsewhere.example.test")[0] == 250
        smtp.putcmd("data")
        assert smtp.getreply()[0] == 354
        smtp.send(f"From: postmaster@{domain}\r\nTo: someone@elsewhere.example.test\r\n"
                  "Subject: in flight at SIGTERM\r\nMessage-ID: <inflight@test>\r\n\r\nfirst half\r\n")
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not _accepts(port) and not _accepts(srv.ports["api"]), timeout=15,
                 what="the listeners to close")
        assert srv.proc.poll() is None, "exited with a message in DATA"
        smtp.send("second half\r\n.\r\n")
        code, text = smtp.getreply()
        assert code == 250, text
    finally:
        smtp.close()
    assert srv.proc.wait(30) == 0


def test_sigterm_when_idle_exits_0_and_closes_every_port(tmp_path):
    srv = start_server(tmp_path / "d")
    assert srv.ports and all(_accepts(p) for p in srv.ports.values())
    assert srv.stop(signal.SIGTERM) == 0
    assert not any(_accepts(p) for p in srv.ports.values())
    assert "Traceback" not in srv.logs()


def test_sigint_exits_0(tmp_path):
    srv = start_server(tmp_path / "d", services=["api"])
    assert srv.stop(signal.SIGINT) == 0


# -- each service alone, together on one store -----------------------------------------------
def test_each_service_runs_alone_on_one_store(tmp_path):
    shared_db = f"sqlite:///{tmp_path / 'shared.db'}"
    dirs = {name: tmp_path / name for name in SERVICE_PORTS}
    key = init_data_dir(dirs["api"], db_url=shared_db)
    for name, d in dirs.items():
        if name != "api":
            out = run_cli(d, "init", "--hostname", "mail.example.test", "--dev-mode",
                          "--db-url", shared_db, *[a for p in ("api", "smtp", "submission",
                          "submissions", "imap", "imaps", "pop3", "pop3s") for a in (f"--{p}-port", "0")],
                          "--set", "log.format=text").stdout
            assert "already created" in out  # one store, one primary key
    procs = {}
    for name, d in dirs.items():  # all at once
        procs[name] = subprocess.Popen(MAILPLAT + ["serve", "--data-dir", str(d), name],
                                       stdout=open(d / "serve.log", "wb"), stderr=subprocess.STDOUT,
                                       cwd=ROOT)
    try:
        ports = {}
        for name, d in dirs.items():
            def ready(name=name, d=d):
                assert procs[name].poll() is None, (d / "serve.log").read_text()
                f = d / "ports.json"
                return f.exists() and (json.loads(f.read_text()),)  # {} is a valid answer
            ports[name] = wait_for(ready, timeout=60, what=f"{name} to listen")[0]
        for name, got in ports.items():
            assert set(got) <= SERVICE_PORTS[name], (name, got)
        assert set(ports["api"]) == {"api"}
        assert {"smtp", "submission"} <= set(ports["smtpd"])
        # one store: a domain made through the api process logs in on the smtpd process
        domain = f"alone{secrets.token_hex(4)}.example.test"
        password = "pw-" + secrets.token_hex(6)
        r = requests.post(f"http://127.0.0.1:{ports['api']['api']}/v4/domains",
                                        auth=("api", key), timeout=30,
                                        data={"name": domain, "smtp_password": password,
                                              "dkim_key_size": "1024"})
        assert r.status_code == 200, r.text
        with smtplib.SMTP("127.0.0.1", ports["smtpd"]["submission"], timeout=30) as smtp:
            smtp.ehlo("client.example.test")
            assert smtp.login(f"postmaster@{domain}", password)[0] == 235
        # and a key made by the CLI in another data dir works on the api process
        other_key = run_cli(dirs["relay"], "key", "create").stdout.strip()
        r = requests.get(f"http://127.0.0.1:{ports['api']['api']}/v1/keys",
                                       auth=("api", other_key), timeout=30)
        assert r.status_code == 200
        for name, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            assert proc.wait(30) == 0, (name, (dirs[name] / "serve.log").read_text())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- secrets stay out of the logs -------------------------------------------------------------
def test_logs_never_contain_keys_or_passwords(tmp_path):
    srv = start_server(tmp_path / "d", services=["api", "smtpd"])
    domain = f"logs{secrets.token_hex(4)}.example.test"
    pw_domain = "Dpw-" + secrets.token_hex(8)
    pw_cred = "Cpw-" + secrets.token_hex(8)
    pw_changed = "Xpw-" + secrets.token_hex(8)
    wrong_pw = "Wpw-" + secrets.token_hex(8)
    wrong_key = f"key-{secrets.token_hex(6)}-{secrets.token_hex(16)}"
    _add_domain(srv, domain, pw_domain)
    r = srv.api("POST", f"/v3/domains/{domain}/credentials", data={"login": "alice", "password": pw_cred})
    assert r.status_code == 200, r.text
    r = srv.api("PUT", f"/v3/domains/{domain}/credentials/alice", data={"password": pw_changed})
    assert r.status_code == 200, r.text
    new_key = srv.api("POST", "/v1/keys", data={"description": "logged?"}).json()["key"]["secret"]
    assert srv.api("GET", "/v1/keys", key=new_key).status_code == 200
    assert srv.api("GET", "/v1/keys", key=wrong_key).status_code == 401
    # bad input that echoes fields back must not echo a password into the log either
    srv.api("POST", "/v4/domains", data={"name": "bad name!", "smtp_password": wrong_pw})
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as smtp:
        smtp.ehlo("client.example.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login(f"alice@{domain}", wrong_pw)
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as smtp:
        smtp.ehlo("client.example.test")
        assert smtp.login(f"alice@{domain}", pw_changed)[0] == 235
    assert srv.stop() == 0
    logs = srv.logs()
    assert "smtpd" in logs and "api" in logs  # the log is the server's, at DEBUG
    secrets_used = {
        "primary key": srv.key, "primary key secret": srv.key.split("-")[2],
        "new key secret": new_key.split("-")[2], "wrong key secret": wrong_key.split("-")[2],
        "domain smtp_password": pw_domain, "credential password": pw_cred,
        "changed password": pw_changed, "wrong password": wrong_pw,
        "AUTH PLAIN blob": base64.b64encode(f"\0alice@{domain}\0{pw_changed}".encode()).decode(),
        "AUTH PLAIN blob (wrong)": base64.b64encode(f"\0alice@{domain}\0{wrong_pw}".encode()).decode(),
    }
    leaked = [what for what, value in secrets_used.items() if value in logs]
    assert not leaked, f"secrets in the server log: {leaked}"


def test_services_sharing_one_data_dir_merge_ports_json(tmp_path):
    """As the systemd instances do: five `serve <service>` processes on one data dir.  Each adds
    its ports to ports.json and takes them out again when it stops."""
    d = tmp_path / "d"
    key = init_data_dir(d)
    sockdir = Path(tempfile.mkdtemp(prefix="mp-life-"))
    procs, listeners = {}, {}
    try:
        for name in SERVICE_PORTS:
            listener = listeners[name] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            listener.bind(str(sockdir / name))
            listener.settimeout(60)
            procs[name] = subprocess.Popen(
                MAILPLAT + ["serve", "--data-dir", str(d), name], cwd=ROOT,
                stdout=open(d / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(sockdir / name)})
        for name, listener in listeners.items():  # every process reports READY=1
            assert listener.recv(100) == b"READY=1", (d / f"{name}.log").read_text()
        ports = json.loads((d / "ports.json").read_text())
        assert set(ports) <= set().union(*SERVICE_PORTS.values())
        assert {"api", "smtp", "submission"} <= set(ports)
        assert all(_accepts(p) for p in ports.values())
        assert requests.get(f"http://127.0.0.1:{ports['api']}/v1/keys", auth=("api", key),
                            timeout=30).status_code == 200
        procs["api"].send_signal(signal.SIGTERM)
        assert procs["api"].wait(30) == 0
        left = json.loads((d / "ports.json").read_text())
        assert "api" not in left and {k: ports[k] for k in left} == left and "smtp" in left
        for name, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            assert proc.wait(30) == 0, (d / f"{name}.log").read_text()
        assert not (d / "ports.json").exists()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for listener in listeners.values():
            listener.close()
        shutil.rmtree(sockdir, ignore_errors=True)


# -- the log format itself --------------------------------------------------------------------
@pytest.fixture
def log_stream():
    import io
    import logging

    from mailplat import logs
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    yield stream, logs
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_json_logs_carry_context_and_redact_secrets(log_stream):
    stream, logs = log_stream
    logs.setup("DEBUG", "json", stream=stream)
    key = f"key-{secrets.token_hex(6)}-{secrets.token_hex(16)}"
    log = logs.get("mailplat.test")
    with logs.context(request_id="r-1", domain="example.test"):
        log.info("auth header Authorization: Basic %s", base64.b64encode(f"api:{key}".encode()).decode())
        log.warning("form was password=hunter2&name=x and key %s", key)
        logs.event(log, "created", smtp_password="hunter3", note=f"uses {key}", size=3)
    log.info("outside")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"].split()[0] for line in lines] == ["auth", "form", "created", "outside"]
    assert all(line["request_id"] == "r-1" and line["domain"] == "example.test" for line in lines[:3])
    assert "request_id" not in lines[3]
    assert lines[2]["smtp_password"] == "***" and lines[2]["size"] == 3
    text = stream.getvalue()
    for secret in (key.split("-")[2], "hunter2", "hunter3", base64.b64encode(f"api:{key}".encode()).decode()):
        assert secret not in text
    assert key.split("-")[1] in text  # the public key id stays, for tracing


def test_text_logs_redact_too(log_stream):
    stream, logs = log_stream
    logs.setup("INFO", "text", stream=stream)
    with logs.context(peer="127.0.0.1"):
        logs.event(logs.get("mailplat.test"), 'got {"password": "two words"}', api_key="k-123")
    out = stream.getvalue()
    assert "two words" not in out and "k-123" not in out and "peer=127.0.0.1" in out
