"""The README's set-up commands: there are exactly two, CI runs the second, and the first, run
from a clean copy of the checkout with a fresh home directory, installs mailplat, starts it and
prints an API URL, a working primary key and every port.  (Takes about a minute: it builds a
venv and installs the package; it runs in every full suite run, so in CI.)"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from tests.support import ROOT, wait_for

README = ROOT / "README.md"


def setup_commands() -> list[str]:
    """The shell commands in the README's "Set up" section, in order."""
    text = README.read_text()
    section = re.search(r"^## Set up\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Set up' section"
    blocks = re.findall(r"```sh\n(.*?)```", section.group(1), re.S)
    return [b.strip() for b in blocks]


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each set-up command is one line"
    assert "mailplat serve" in commands[0]
    assert "pytest" in commands[1] and "[test]" in commands[1]


def test_ci_runs_readme_command_2():
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_commands()[1].replace("pip install", "pip install -q") in ci
    assert "MAILPLAT_TEST_PG=" in ci and "MAILPLAT_TEST_PG_SERVER=1" in ci  # the PostgreSQL pass
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def _clean_copy(dest: Path) -> None:
    """The files git tracks, as they are in this checkout: what a fresh clone holds."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    assert (dest / "pyproject.toml").exists() and not (dest / ".venv").exists()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.timeout(900)
def test_readme_command_1_from_a_clean_checkout(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("this test copies the checkout's tracked files and needs git")
    checkout, home = tmp_path / "checkout", tmp_path / "home"
    checkout.mkdir()
    home.mkdir()
    _clean_copy(checkout)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAILPLAT_", "VIRTUAL_ENV", "PYTHON"))}
    env["HOME"] = str(home)  # so the default data dir (~/.local/share/mailplat) is fresh
    # Free ports, so a mailplat already running on the defaults cannot collide with this one.
    for name in ("API", "SMTP", "SUBMISSION", "SUBMISSIONS", "IMAP", "IMAPS", "POP3", "POP3S"):
        env[f"MAILPLAT_{name}_PORT"] = "0"
    proc = subprocess.Popen(["bash", "-c", setup_commands()[0]], cwd=checkout, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        def banner():
            if proc.poll() is not None:
                reader.join(5)
                raise AssertionError(f"command 1 exited {proc.returncode}:\n{''.join(lines)}")
            out = "".join(lines)
            return "data dir:" in out and out  # the banner's last line
        out = wait_for(banner, timeout=600, interval=0.2, what="the README run command's banner")
        base = re.search(r"API base URL: (http://\S+)", out).group(1)
        key = re.search(r"API key: +(key-[0-9a-f]+-[0-9a-f]+)", out).group(1)
        data_dir = home / ".local" / "share" / "mailplat"
        assert f"data dir:     {data_dir}" in out
        ports = json.loads((data_dir / "ports.json").read_text())
        assert base == f"http://127.0.0.1:{ports['api']}"
        for name, port in ports.items():
            assert re.search(rf"^  {name}: +127\.0\.0\.1:{port}$", out, re.M), (name, out)
        assert {"api", "smtp", "submission"} <= set(ports)
        assert requests.get(f"{base}/v1/keys", auth=("api", key), timeout=30).status_code == 200
        assert requests.get(f"{base}/v4/domains", auth=("api", key), timeout=30).status_code == 200
        assert requests.get(f"{base}/v4/domains", auth=("api", key[:-1] + "x"), timeout=30).status_code == 401
        # the key is stored hashed, never in clear, in the data dir
        assert not any(key.split("-")[2].encode() in p.read_bytes()
                       for p in data_dir.rglob("*") if p.is_file())
        # SIGTERM to mailplat itself: bash either exec'd it or waits for it and exits as it
        # does.  (mailplat has children of its own: the relay's DKIM signing helper.)
        [mailplat] = [pid for pid in [proc.pid, *_children(proc.pid)]
                      if b"bin/mailplat\0serve" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(mailplat, signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)
        assert "stopped" in "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
