"""Test support: run mailplat as a real process, wait on conditions, temporary PG databases."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
MAILPLAT = [sys.executable, "-m", "mailplat.cli"]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def spawned_children(pid: int, marker: bytes = b"spawn_main") -> list[int]:
    """Live processes started by `pid` whose command line holds `marker`: by default those
    multiprocessing spawned (relay.processes, smtp.processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and marker in cmdline:
            found.append(int(entry))
    return found


def run_cli(data_dir: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = MAILPLAT + [args[0], "--data-dir", str(data_dir), *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


@dataclass
class MailplatServer:
    data_dir: Path
    key: str
    proc: subprocess.Popen
    ports: dict = field(default_factory=dict)
    log_path: Path | None = None
    dns: object = None  # tests.dnsserver.DnsServer the config resolves through, if any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def api(self, method: str, path: str, key: str | None = None, **kw) -> requests.Response:
        return requests.request(method, self.url + path, auth=("api", self.key if key is None else key), timeout=30, **kw)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli(self.data_dir, *args, check=check)

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def init_data_dir(data_dir: Path, db_url: str | None = None, sets: list[str] = ()) -> str:
    """`mailplat init` on free ports; returns the primary key."""
    args = ["init", "--hostname", "mail.example.test", "--dev-mode"]
    for name in ("api", "smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s"):
        args += [f"--{name}-port", "0"]
    if db_url:
        args += ["--db-url", db_url]
    for s in sets:
        args += ["--set", s]
    args += ["--set", "log.format=text", "--set", "log.level=DEBUG"]
    out = run_cli(data_dir, *args).stdout
    return re.search(r"primary API key: (key-\S+)", out).group(1)


def serve(data_dir: Path, key: str, services: list[str] = (), env: dict | None = None) -> MailplatServer:
    ports_file = data_dir / "ports.json"
    if ports_file.exists():
        ports_file.unlink()
    log_path = data_dir / f"serve-{uuid.uuid4().hex[:6]}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(MAILPLAT + ["serve", "--data-dir", str(data_dir), *services],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    srv = MailplatServer(data_dir=data_dir, key=key, proc=proc, log_path=log_path)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"mailplat exited {proc.returncode}:\n{srv.logs()}")
        return ports_file.exists() and json.loads(ports_file.read_text())

    srv.ports = wait_for(ready, timeout=60, what="mailplat to listen")
    return srv


def start_server(data_dir: Path, db_url: str | None = None, sets: list[str] = (),
                 services: list[str] = (), env: dict | None = None) -> MailplatServer:
    key = init_data_dir(data_dir, db_url, sets)
    return serve(data_dir, key, services, env)


@contextlib.contextmanager
def pg_database(base_url: str):
    """A new empty PostgreSQL database on the server of `base_url`, dropped afterwards."""
    import psycopg2
    from urllib.parse import urlparse, urlunparse

    name = f"mailplat_t_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(base_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    parsed = urlparse(base_url)
    try:
        yield urlunparse(parsed._replace(path="/" + name))
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
