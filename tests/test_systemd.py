"""The systemd units: `systemd-analyze verify` finds nothing to say about them, capabilities go
only to the instances that bind low ports, and Type=notify is honest (READY=1 arrives only once
the port accepts connections; STOPPING=1 on SIGTERM)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mailplat.cli import SERVICE_NAMES
from tests.support import MAILPLAT, ROOT, init_data_dir

UNITS = ROOT / "systemd"
INSTALLED_EXEC = "/opt/mailplat/venv/bin/mailplat"
LOW_PORT_SERVICES = {"smtpd", "mailaccess"}  # 25/465/587 and 110/143/993/995

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("MAILPLAT_CI"),
    reason="systemd-analyze is not installed (.ci/run installs it)")


def _read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Unit file -> {section: {key: [values in order]}} (keys may repeat in systemd units)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture
def unit_dir(tmp_path) -> Path:
    """The units copied to a temp dir, ExecStart pointing at this checkout's real executable."""
    exe = Path(sys.executable).parent / "mailplat"
    assert exe.exists(), exe
    dest = tmp_path / "units"
    shutil.copytree(UNITS, dest)
    template = dest / "mailplat@.service"
    text = template.read_text()
    assert INSTALLED_EXEC in text
    template.write_text(text.replace(INSTALLED_EXEC, str(exe)))
    return dest


def _analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: apt-get install systemd"
    # The trailing ':' keeps the standard search path after ours (for network-online.target ...).
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_LEVEL": "info"}
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120,
                          cwd=unit_dir)


def _verify_complaints(unit_dir: Path) -> tuple[int, list[str]]:
    names = ["mailplat.target"] + [f"mailplat@{s}.service" for s in SERVICE_NAMES]
    result = _analyze(unit_dir, "verify", *names)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "mailplat" in line or str(unit_dir) in line]
    return result.returncode, complaints


@needs_systemd
def test_systemd_analyze_verify_is_silent(unit_dir):
    rc, complaints = _verify_complaints(unit_dir)
    assert rc == 0 and complaints == [], "\n".join(complaints)


@needs_systemd
def test_verify_check_catches_a_bad_drop_in(unit_dir):
    """The check above can fail: an unknown key in a drop-in is reported."""
    conf = unit_dir / "mailplat@smtpd.service.d" / "low-ports.conf"
    conf.write_text(conf.read_text() + "BindLowPortz=yes\n")
    _, complaints = _verify_complaints(unit_dir)
    assert any("BindLowPortz" in line for line in complaints), complaints


def _security(unit_dir: Path, instance: str) -> tuple[dict[str, bool], float]:
    unit = f"mailplat@{instance}.service"
    result = _analyze(unit_dir, "security", "--offline=yes", "--json=short", unit)
    assert result.returncode == 0, result.stderr
    checks = {c["name"]: c["set"] for c in json.loads(result.stdout)}
    text = _analyze(unit_dir, "security", "--offline=yes", unit).stdout
    exposure = float(re.search(rf"Overall exposure level for {re.escape(unit)}: ([\d.]+)", text).group(1))
    return checks, exposure


@needs_systemd
@pytest.mark.parametrize("instance", SERVICE_NAMES)
def test_low_port_capability_only_where_needed(unit_dir, instance):
    """systemd's own evaluation of each instance (template plus its drop-ins)."""
    checks, exposure = _security(unit_dir, instance)
    no_bind = checks["CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)"]
    no_ambient = checks["AmbientCapabilities="]
    if instance in LOW_PORT_SERVICES:
        assert not no_bind and not no_ambient, f"{instance} must be able to bind ports < 1024"
    else:
        assert no_bind and no_ambient, f"{instance} binds no low port and must get no capability"
    for name in ("NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=", "ProtectHome=",
                 "PrivateDevices=", "User=/DynamicUser=", "CapabilityBoundingSet=~CAP_SYS_ADMIN",
                 "RestrictAddressFamilies=~AF_PACKET", "SystemCallFilter=~@privileged"):
        assert checks[name], f"{instance}: {name} not hardened"
    assert exposure < 2.5, f"{instance}: systemd rates exposure {exposure}"


def test_unit_shape():
    template = _read_unit(UNITS / "mailplat@.service")
    svc = template["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["User"] == ["mailplat"]
    assert svc["ExecStart"][0].endswith("serve --config /etc/mailplat/mailplat.toml %i")
    assert svc["ExecStart"][0].startswith(INSTALLED_EXEC)
    assert svc["StateDirectory"] == ["mailplat"]
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["NoNewPrivileges"] == ["yes"]
    # The template grants nothing; the last assignment of each capability list is empty.
    assert svc["CapabilityBoundingSet"][-1] == "" and svc["AmbientCapabilities"][-1] == ""
    assert "SystemCallFilter" in svc and "@system-service" in svc["SystemCallFilter"]
    dropins = {p.parent.name for p in UNITS.glob("mailplat@*.service.d/*.conf")}
    assert dropins == {f"mailplat@{s}.service.d" for s in LOW_PORT_SERVICES}
    for s in LOW_PORT_SERVICES:
        conf = _read_unit(UNITS / f"mailplat@{s}.service.d" / "low-ports.conf")["Service"]
        assert conf["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
        assert conf["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    target = _read_unit(UNITS / "mailplat.target")
    wants = " ".join(target["Unit"]["Wants"]).split()
    assert sorted(wants) == sorted(f"mailplat@{s}.service" for s in SERVICE_NAMES)
    # Every service the supervisor knows has an instance in the target.
    from mailplat.supervisor import SERVICES
    assert set(SERVICES) == set(SERVICE_NAMES)


# -- sd_notify, for real ----------------------------------------------------------------------
def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("abstract,services", [(False, []), (True, ["api"])],
                         ids=["path-all-services", "abstract-api"])
def test_sd_notify_ready_only_when_listening(tmp_path, abstract, services):
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    sockdir = Path(tempfile.mkdtemp(prefix="mp-notify-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"mailplat-test-{os.getpid()}-{sockdir.name}"
        listener.bind("\0" + name)
        notify_socket = "@" + name
    else:
        listener.bind(str(sockdir / "notify"))
        notify_socket = str(sockdir / "notify")
    listener.settimeout(60)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(MAILPLAT + ["serve", "--data-dir", str(data_dir), *services],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "NOTIFY_SOCKET": notify_socket})
    try:
        message = listener.recv(4096).decode()
        # At the moment READY=1 arrives, every port already accepts connections.
        ports = json.loads((data_dir / "ports.json").read_text())
        assert message == "READY=1"
        if services == ["api"]:
            assert set(ports) == {"api"}
        else:
            assert {"api", "smtp", "submission"} <= set(ports)
        assert all(_accepts(p) for p in ports.values())
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(30) == 0
        assert not any(_accepts(p) for p in ports.values())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        shutil.rmtree(sockdir, ignore_errors=True)
        log.close()
