"""The `mailplat` command, run as a real process: init flags, key create/list/revoke against a
running server, domain add/list/show/delete, db migrate, check-config, env overrides."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tomllib

import pytest
from cryptography import x509

from mailplat.config import ApiConfig
from mailplat.core.auth import KEY_CACHE_SECONDS
from tests.support import MAILPLAT, ROOT, run_cli, serve, wait_for

PORT_NAMES = ["api", "smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s"]
KEY_RE = r"key-[0-9a-f]+-[0-9a-f]+"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mailplat(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI without the implicit --data-dir of run_cli (for env-override tests)."""
    return subprocess.run(MAILPLAT + list(args), capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120, check=check)


# -- init -------------------------------------------------------------------------------------
def test_init_flags_are_written_to_the_config(tmp_path):
    d = tmp_path / "data"
    out = run_cli(d, "init", "--hostname", "mail.cli.example.test", "--api-port", "6111",
                  "--smtp-port", "0", "--submission-port", "6587", "--submissions-port", "0",
                  "--imap-port", "0", "--imaps-port", "6993", "--pop3-port", "0", "--pop3s-port", "0",
                  "--set", "relay.workers=3").stdout
    key = re.search(rf"primary API key: ({KEY_RE})", out).group(1)
    raw = tomllib.loads((d / "mailplat.toml").read_text())
    assert raw["server"]["hostname"] == "mail.cli.example.test"
    assert raw["api"]["port"] == 6111 and raw["smtp"]["submission_port"] == 6587
    assert raw["mailaccess"]["imaps_port"] == 6993
    assert raw["smtp"]["mx_port"] == 0 and raw["mailaccess"]["pop3s_port"] == 0
    assert raw["relay"]["workers"] == 3
    assert oct((d).stat().st_mode & 0o777) == "0o700"
    assert oct((d / "mailplat.toml").stat().st_mode & 0o777) == "0o600"
    # the dev certificate names the host
    cert = x509.load_pem_x509_certificate((d / "tls" / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mail.cli.example.test" in names.get_values_for_type(x509.DNSName)
    # a second init keeps the key it made and makes no other
    again = run_cli(d, "init").stdout
    assert key not in again and not re.search(KEY_RE, again)
    assert "already created" in again
    assert len(run_cli(d, "key", "list").stdout.splitlines()) == 1


def test_serve_binds_free_ports_and_reports_them(server):
    """The server fixture ran `init` with every port 0; ports.json has what it really bound."""
    ports = json.loads((server.data_dir / "ports.json").read_text())
    assert ports == server.ports
    assert "api" in ports and set(ports) <= set(PORT_NAMES)
    assert all(p > 0 for p in ports.values()) and len(set(ports.values())) == len(ports)
    for port in ports.values():
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# -- keys -------------------------------------------------------------------------------------
def test_key_create_prints_only_the_key_and_it_works(server):
    result = server.cli("key", "create", "--description", "ci key")
    assert re.fullmatch(rf"{KEY_RE}\n", result.stdout), result.stdout
    key = result.stdout.strip()
    r = server.api("GET", "/v1/keys", key=key)
    assert r.status_code == 200
    assert any(k["description"] == "ci key" for k in r.json()["items"])
    assert server.api("GET", "/v1/keys", key=key + "0").status_code == 401


def test_key_list_and_revoke(server):
    key = server.cli("key", "create", "--description", "to revoke").stdout.strip()
    key_id = key.split("-")[1]
    listing = server.cli("key", "list").stdout
    row = next(line for line in listing.splitlines() if line.startswith(key_id))
    assert row.split("\t")[1] == "admin" and row.endswith("to revoke")
    assert key not in listing and key.split("-")[2] not in listing  # the secret is never shown
    assert server.api("GET", "/v1/keys", key=key).status_code == 200  # now cached by the server
    assert server.cli("key", "revoke", key_id).returncode == 0
    wait_for(lambda: server.api("GET", "/v1/keys", key=key).status_code == 401,
             timeout=KEY_CACHE_SECONDS + 5, what="the revoked key to be refused")
    assert key_id not in server.cli("key", "list").stdout
    again = server.cli("key", "revoke", key_id, check=False)
    assert again.returncode != 0 and "Key not found" in again.stderr


def test_key_create_for_a_domain_is_a_sending_key(server, unique_domain):
    server.cli("domain", "add", unique_domain, "--dkim-key-size", "1024")
    key = server.cli("key", "create", "--domain", unique_domain.upper()).stdout.strip()
    assert re.fullmatch(KEY_RE, key)
    row = next(line for line in server.cli("key", "list").stdout.splitlines()
               if line.startswith(key.split("-")[1]))
    assert row.split("\t")[1:3] == ["sending", unique_domain]
    # a sending key may not manage anything
    assert server.api("GET", "/v4/domains", key=key).status_code in (401, 403)
    assert server.api("GET", "/v1/keys", key=key).status_code in (401, 403)
    missing = server.cli("key", "create", "--domain", "nowhere.example.test", check=False)
    assert missing.returncode != 0 and "Domain not found" in missing.stderr and not missing.stdout


# -- domains ----------------------------------------------------------------------------------
def test_domain_add_list_show_delete(server, unique_domain):
    added = json.loads(server.cli("domain", "add", unique_domain, "--smtp-password", "s3cret-pass",
                                  "--dkim-key-size", "1024", "--spam-action", "tag").stdout)
    assert added["domain"]["name"] == unique_domain
    assert added["domain"]["spam_action"] == "tag"
    # the running server sees what the CLI wrote
    r = server.api("GET", f"/v4/domains/{unique_domain}")
    assert r.status_code == 200 and r.json()["domain"]["name"] == unique_domain
    names = [d["name"] for d in json.loads(server.cli("domain", "list").stdout)["items"]]
    assert unique_domain in names
    shown = json.loads(server.cli("domain", "show", unique_domain).stdout)
    assert shown["domain"]["name"] == unique_domain
    assert any(rec["record_type"] == "TXT" and "._domainkey." in rec["name"]
               for rec in shown["sending_dns_records"])
    dup = server.cli("domain", "add", unique_domain, check=False)
    assert dup.returncode != 0 and dup.stderr.strip()
    assert server.cli("domain", "delete", unique_domain).returncode == 0
    gone = server.cli("domain", "show", unique_domain, check=False)
    assert gone.returncode != 0 and "Domain not found" in gone.stderr
    assert server.api("GET", f"/v4/domains/{unique_domain}").status_code == 404
    bad = server.cli("domain", "add", "not a domain!", check=False)
    assert bad.returncode != 0 and bad.stderr.strip() and "Traceback" not in bad.stderr


# -- db migrate -------------------------------------------------------------------------------
def test_db_migrate_is_idempotent(tmp_path):
    db_file = tmp_path / "other" / "m.db"
    env = {"MAILPLAT_DB_URL": f"sqlite:///{db_file}"}
    d = tmp_path / "data"
    first = run_cli(d, "db", "migrate", env=env)
    applied = re.findall(r"applied (\S+)", first.stdout)
    assert applied and applied[0].startswith("0001") and db_file.exists()
    for _ in range(2):
        again = run_cli(d, "db", "migrate", env=env)
        assert again.stdout.strip() == "schema is up to date"


# -- check-config -----------------------------------------------------------------------------
def test_check_config_lists_every_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[api]\nport = 99999\n'
                    '[smtp]\nmax_recipients = "many"\n'
                    '[log]\nlevel = "LOUD"\nformat = "xml"\n'
                    '[database]\nurl = "mysql://x"\n'
                    '[server]\ncolour = "blue"\n'
                    '[widgets]\nx = 1\n')
    r = run_cli(tmp_path, "check-config", "--config", str(path), check=False)
    assert r.returncode != 0 and "config OK" not in r.stdout
    errors = dict(re.findall(r"config error: (\S+): (.+)", r.stderr))
    assert set(errors) >= {"api.port", "smtp.max_recipients", "log.level", "log.format",
                           "database.url", "server.colour", "widgets"}, r.stderr
    assert all(reason.strip() for reason in errors.values())
    assert errors["server.colour"] == "unknown setting"
    # serve refuses the same file with the same report, and no traceback
    s = run_cli(tmp_path, "serve", "--config", str(path), check=False)
    assert s.returncode != 0 and "api.port" in s.stderr and "Traceback" not in s.stderr
    good = tmp_path / "good.toml"
    good.write_text("[api]\nport = 6000\n")
    ok = run_cli(tmp_path, "check-config", "--config", str(good))
    assert ok.returncode == 0 and "config OK" in ok.stdout


# -- environment overrides --------------------------------------------------------------------
def test_env_data_dir_and_port_overrides(tmp_path):
    d = tmp_path / "envdata"
    env = {"MAILPLAT_DATA_DIR": str(d)}
    for name in PORT_NAMES:
        env[f"MAILPLAT_{name.upper()}_PORT"] = "0"
    out = _mailplat("init", "--hostname", "env.example.test", env=env, check=True).stdout
    key = re.search(rf"primary API key: ({KEY_RE})", out).group(1)
    assert (d / "mailplat.toml").exists() and (d / "mailplat.db").exists()
    listing = _mailplat("key", "list", env=env, check=True).stdout
    assert listing.startswith(key.split("-")[1])
    # the env port wins over the config file's
    port = _free_port()
    srv = serve(d, key, ["api"], env={**env, "MAILPLAT_API_PORT": str(port)})
    try:
        assert srv.ports == {"api": port}
        assert srv.api("GET", "/v1/keys").status_code == 200
    finally:
        assert srv.stop() == 0


def test_unknown_service_is_refused(tmp_path):
    r = run_cli(tmp_path / "d", "serve", "mailman", check=False)
    assert r.returncode == 2 and "unknown service 'mailman'" in r.stderr


@pytest.mark.parametrize("args", [["key", "frobnicate"], ["domain"], ["serve", "--nope"]])
def test_usage_errors_exit_2(tmp_path, args):
    r = run_cli(tmp_path / "d", *args, check=False)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_serve_on_a_fresh_dir_prints_the_key_only_on_the_creating_run(tmp_path):
    d = tmp_path / "fresh"
    d.mkdir()  # empty: no config, store or key yet (the test harness keeps its log here)
    env = {f"MAILPLAT_{name.upper()}_PORT": "0" for name in PORT_NAMES}
    srv = serve(d, "", ["api"], env=env)
    try:
        out = wait_for(lambda: "data dir:" in srv.logs() and srv.logs(), what="the banner")
        key = re.search(rf"API key: +({KEY_RE})", out).group(1)
        assert f"API base URL: http://127.0.0.1:{srv.ports['api']}" in out
        assert srv.api("GET", "/v1/keys", key=key).status_code == 200
    finally:
        assert srv.stop() == 0
    again = serve(d, key, ["api"], env=env)
    try:
        out = wait_for(lambda: "data dir:" in again.logs() and again.logs(), what="the banner")
        assert not re.search(KEY_RE, out) and "printed when this data dir was created" in out
        assert again.api("GET", "/v1/keys").status_code == 200
    finally:
        assert again.stop() == 0


def test_init_keeps_flags_but_not_env_overrides(tmp_path):
    d = tmp_path / "d"
    other_db = tmp_path / "elsewhere.db"
    env = {"MAILPLAT_API_PORT": "6222", "MAILPLAT_DB_URL": f"sqlite:///{other_db}"}
    run_cli(d, "init", "--hostname", "flag.example.test", "--smtp-port", "6225", env=env)
    raw = tomllib.loads((d / "mailplat.toml").read_text())
    assert raw["server"]["hostname"] == "flag.example.test" and raw["smtp"]["mx_port"] == 6225
    assert raw["api"]["port"] == ApiConfig().port and raw["database"]["url"] == ""
    assert other_db.exists()  # this run did use the env's store
