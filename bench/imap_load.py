"""IMAP load: N concurrent sessions doing LOGIN, SELECT, FETCH (flags, envelope, bodies), STORE,
APPEND, EXPUNGE; commands/s and server CPU seconds per 1,000 commands; plus a big-mailbox check
(SELECT time and `FETCH 1:* (UID FLAGS)` time and server peak memory on --big messages).

Starts a private `mailplat serve api mailaccess` (SQLite in a temporary data dir).  With
--dovecot (Debian package dovecot-imapd installed), runs the same load against a private Dovecot
(own config, passwd-file, Maildir under the temp dir, no root needed beyond reading its binary),
side by side in the same run.  Every tagged response must be OK: any NO/BAD is counted as a
protocol error and printed.

    .venv/bin/python bench/imap_load.py [--sessions 10] [--seconds 20] [--messages 50]
                                         [--big 100000] [--idle 20] [--dovecot]
"""
from __future__ import annotations

import argparse
import imaplib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import start_server  # noqa: E402

PASSWORD = "bench-password"
MSG = (b"From: Bench <bench@far.example>\r\nTo: user@bench.example\r\nSubject: load test\r\n"
       b"Message-ID: <%d@far.example>\r\nDate: Thu, 26 Nov 2026 01:00:00 +0000\r\n"
       b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + b"0123456789abcdef" * 120 + b"\r\n")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its children that have exited and been waited for
    (cutime + cstime): a server that forks a process per session (Dovecot's imap) keeps the
    CPU of sessions that ended during the run only there."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in [pid] + children(pid):
        try:
            total += cpu_seconds(p)
        except FileNotFoundError:
            pass
    return total


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == pid:
                out.append(int(d.name))
                out += children(int(d.name))
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def session_loop(port: int, user: str, stop: threading.Event, counts: list, errors: list, i: int):
    n = 0
    try:
        m = imaplib.IMAP4("127.0.0.1", port)
        m.login(user, PASSWORD)
        n += 1
        k = 0
        while not stop.is_set():
            k += 1
            for typ, data in (
                m.select("INBOX"),
                m.fetch("1:*", "(FLAGS ENVELOPE)"),
                m.fetch("1", "(BODY.PEEK[])"),
                m.store("1:5", "+FLAGS", r"(\Seen)"),
                m.append("INBOX", None, None, MSG % (i * 1_000_000 + k)),
                m.search(None, "UNSEEN"),
                m.store("*", "+FLAGS", r"(\Deleted)"),
                m.expunge(),
            ):
                n += 1
                if typ != "OK":
                    errors.append((typ, data))
        m.logout()
    except Exception as exc:  # noqa: BLE001 - reported as a protocol error
        errors.append(repr(exc))
    counts[i] = n


def run_load(label: str, port: int, users: list[str], seconds: float, pid: int) -> dict:
    stop = threading.Event()
    counts = [0] * len(users)
    errors: list = []
    threads = [threading.Thread(target=session_loop, args=(port, u, stop, counts, errors, i))
               for i, u in enumerate(users)]
    cpu0, t0 = tree_cpu(pid), time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed, cpu = time.monotonic() - t0, tree_cpu(pid) - cpu0
    total = sum(counts)
    res = {"label": label, "commands": total, "per_s": total / elapsed,
           "cpu_s_per_1000": 1000 * cpu / max(total, 1), "errors": len(errors)}
    print(f"{label:9s} sessions={len(users)} commands={total} {res['per_s']:.0f} cmd/s "
          f"server CPU {res['cpu_s_per_1000']:.2f} s/1000 cmd, protocol errors {len(errors)}")
    for e in errors[:5]:
        print("   error:", e)
    return res


def fill(port: int, users: list[str], messages: int):
    for u in users:
        m = imaplib.IMAP4("127.0.0.1", port)
        m.login(u, PASSWORD)
        for k in range(messages):
            m.append("INBOX", None, None, MSG % k)
        m.logout()


def mailplat_bench(args) -> tuple[dict, int]:
    data_dir = Path(tempfile.mkdtemp(prefix="imapbench-"))
    srv = start_server(data_dir, services=["api", "smtpd", "mailaccess"])
    try:
        domain = "bench.example"
        srv.api("POST", "/v3/domains", data={"name": domain}).raise_for_status()
        users = []
        for i in range(args.sessions):
            u = f"u{i}@{domain}"
            srv.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": u, "password": PASSWORD}).raise_for_status()
            users.append(u)
        fill(srv.ports["imap"], users, args.messages)
        res = run_load("mailplat", srv.ports["imap"], users, args.seconds, srv.proc.pid)
        if args.idle:
            idle_latency(srv, domain, args.idle)
        if args.big:
            big_mailbox(srv, domain, args.big)
        return res, srv.proc.pid
    finally:
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def idle_latency(srv, domain: str, rounds: int):
    """Seconds from the MX's 250 to `* n EXISTS` in an IDLE session (the services in one process)."""
    import smtplib
    u = f"idle@{domain}"
    srv.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": u, "password": PASSWORD}).raise_for_status()
    sock = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=10)
    f = sock.makefile("rb")
    f.readline()

    def cmd(tag: bytes, text: bytes):
        sock.sendall(tag + b" " + text + b"\r\n")
        while not f.readline().startswith(tag + b" "):
            pass

    cmd(b"a", f'LOGIN "{u}" "{PASSWORD}"'.encode())
    cmd(b"b", b"SELECT INBOX")
    sock.sendall(b"c IDLE\r\n")
    f.readline()
    lat = []
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
        for i in range(rounds):
            s.sendmail("x@far.example", [u], MSG % i)
            t0 = time.monotonic()
            while not f.readline().endswith(b"EXISTS\r\n"):
                pass
            lat.append(time.monotonic() - t0)
    sock.sendall(b"DONE\r\n")
    sock.close()
    lat.sort()
    print(f"IDLE push after SMTP 250: {rounds} messages, median {1000 * lat[len(lat) // 2]:.0f} ms, "
          f"max {1000 * lat[-1]:.0f} ms")


def big_mailbox(srv, domain: str, count: int):
    """Insert `count` messages straight into the store (one shared body), then time SELECT and
    FETCH 1:* (UID FLAGS) over IMAP and report the server's peak RSS."""
    u = f"big@{domain}"
    srv.api("POST", f"/v3/{domain}/mailboxes", data={"mailbox": u, "password": PASSWORD}).raise_for_status()
    code = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from mailplat.store import db
from mailplat.store.mailbox_models import Mailbox, MailFolder, MailMessage
from mailplat.core import mailboxes
s = db.open_store("sqlite:///{srv.data_dir / 'mailplat.db'}", migrate=False)
with s.sync():
    mb = Mailbox.get(Mailbox.address == {u!r})
    f = MailFolder.get((MailFolder.mailbox == mb.id) & (MailFolder.name == "INBOX"))
    sha = mailboxes.put_blob_sync({MSG % 0!r})
    rows = [dict(folder=f.id, uid=i + 1, blob=sha, size={len(MSG % 0)}, internal_date=time.time(),
                 flags="\\\\Seen" if i % 3 else "", modseq=2) for i in range({count})]
    for i in range(0, len(rows), 5000):
        MailMessage.insert_many(rows[i:i + 5000]).execute()
    MailFolder.update(uidnext={count} + 1, highestmodseq=2).where(MailFolder.id == f.id).execute()
s.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
    m.login(u, PASSWORD)
    rss0 = peak_rss_mb(srv.proc.pid)
    t0 = time.monotonic()
    typ, data = m.select("INBOX")
    t_select = time.monotonic() - t0
    t0 = time.monotonic()
    typ2, rows = m.fetch("1:*", "(UID FLAGS)")
    t_fetch = time.monotonic() - t0
    t0 = time.monotonic()
    m.select("INBOX")
    t_select2 = time.monotonic() - t0
    m.logout()
    print(f"big mailbox: {int(data[0])} messages; SELECT {1000 * t_select:.0f} ms (again: "
          f"{1000 * t_select2:.0f} ms); FETCH 1:* (UID FLAGS) {len(rows)} responses in {t_fetch:.2f} s; "
          f"server peak RSS {rss0:.0f} MB before, {peak_rss_mb(srv.proc.pid):.0f} MB after")


def dovecot_bench(args) -> dict | None:
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    if not Path(binary).exists():
        print("dovecot: not installed (apt-get install dovecot-imapd); skipped")
        return None
    base = Path(tempfile.mkdtemp(prefix="dovecotbench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    users = [f"u{i}@bench.example" for i in range(args.sessions)]
    pw = subprocess.run(["doveadm", "pw", "-s", "ARGON2ID", "-p", PASSWORD], capture_output=True, text=True)
    scheme_hash = pw.stdout.strip() if pw.returncode == 0 else "{PLAIN}" + PASSWORD
    import pwd
    if os.getuid() == 0:  # Dovecot refuses to run its login and mail processes as root
        login_user, mail_user = "dovenull", "dovecot"
    else:
        login_user = mail_user = pwd.getpwuid(os.getuid()).pw_name
    mail_pw = pwd.getpwnam(mail_user)
    me = mail_pw.pw_uid
    os.chmod(base, 0o755)
    (base / "home").mkdir()
    os.chown(base / "home", me, mail_pw.pw_gid)
    (base / "passwd").write_text("".join(f"{u}:{scheme_hash}:{me}:{mail_pw.pw_gid}::{base}/home/{u}::\n" for u in users))
    user_name = mail_user
    conf = base / "dovecot.conf"
    conf.write_text(f"""base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {user_name}
default_login_user = {login_user}
mail_location = maildir:~/Maildir
first_valid_uid = 0
passdb {{
  driver = passwd-file
  args = {base}/passwd
}}
userdb {{
  driver = passwd-file
  args = {base}/passwd
}}
service imap-login {{
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
""")
    proc = subprocess.Popen([binary, "-F", "-c", str(conf)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        fill(port, users, args.messages)
        return run_load("dovecot", port, users, args.seconds, proc.pid)
    except Exception:
        log = base / "dovecot.log"
        print("dovecot failed; its log:\n" + (log.read_text()[-3000:] if log.exists() else "(none)"))
        raise
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--messages", type=int, default=50)
    ap.add_argument("--big", type=int, default=0)
    ap.add_argument("--dovecot", action="store_true")
    ap.add_argument("--idle", type=int, default=20, help="IDLE push rounds (0: skip)")
    args = ap.parse_args()
    ours, _ = mailplat_bench(args)
    if args.dovecot:
        theirs = dovecot_bench(args)
        if theirs:
            print(f"ratio: mailplat/dovecot CPU per command {ours['cpu_s_per_1000'] / theirs['cpu_s_per_1000']:.2f}x, "
                  f"throughput {ours['per_s'] / theirs['per_s']:.2f}x")


if __name__ == "__main__":
    main()
