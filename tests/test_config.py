"""Config: the example file documents every setting at its default, the file loads into frozen
dataclasses, environment overrides apply, and every problem is reported at once."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mailplat import config as configmod
from tests.support import ROOT

EXAMPLE = ROOT / "config" / "mailplat.example.toml"


def _settings() -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = [(None, "data_dir")]
    for section in dataclasses.fields(configmod.Config):
        if section.name == "data_dir":
            continue
        cls = configmod._SECTION_CLASSES[section.name]
        out += [(section.name, f.name) for f in dataclasses.fields(cls)]
    return out


def _example_lines() -> dict[tuple[str | None, str], list[str]]:
    """(section, key) -> the comment lines directly above it."""
    found: dict[tuple[str | None, str], list[str]] = {}
    section, comments = None, []
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comments.append(stripped)
        elif stripped.startswith("["):
            section, comments = stripped.strip("[]"), []
        elif "=" in stripped:
            key = stripped.split("=", 1)[0].strip()
            found[(section, key)] = list(comments)
            comments = []
        else:
            comments = []
    return found


def test_example_documents_every_setting_with_a_comment():
    documented = _example_lines()
    missing = [f"{s}.{k}" if s else k for s, k in _settings() if (s, k) not in documented]
    assert not missing, f"config/mailplat.example.toml lacks: {missing}"
    undocumented = [f"{s}.{k}" for (s, k), comments in documented.items() if not comments]
    assert not undocumented, f"settings without a comment: {undocumented}"
    unknown = [f"{s}.{k}" for s, k in documented if (s, k) not in set(_settings())]
    assert not unknown, f"the example names settings that do not exist: {unknown}"


def test_example_loads_and_states_the_defaults():
    cfg = configmod.load(EXAMPLE, env={})
    assert cfg.data_dir == Path("/var/lib/mailplat")
    defaults = configmod.Config(data_dir=cfg.data_dir)
    assert cfg == defaults, "the example's values must be the real defaults"


def test_config_is_frozen():
    cfg = configmod.load(EXAMPLE, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.api.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data_dir = Path("/")  # type: ignore[misc]


def test_render_round_trips(tmp_path):
    cfg = configmod.from_raw({"api": {"port": 6000}, "dns": {"mx_hosts": ["a.test"]},
                              "relay": {"retry_schedule": [1, 2]}}, tmp_path)
    path = tmp_path / "mailplat.toml"
    path.write_text(configmod.render_toml(cfg))
    assert configmod.load(path, env={}) == cfg


def test_environment_overrides(tmp_path):
    env = {"MAILPLAT_DATA_DIR": str(tmp_path / "d"), "MAILPLAT_DB_URL": "postgresql://u@h:5432/x"}
    for var, (section, field) in configmod.ENV_OVERRIDES.items():
        if section and field.endswith("port"):
            env[var] = str(10000 + len(var))
    cfg = configmod.load(EXAMPLE, env=env)
    assert cfg.database.url == "postgresql://u@h:5432/x"
    for var, (section, field) in configmod.ENV_OVERRIDES.items():
        if section and field.endswith("port"):
            assert getattr(getattr(cfg, section), field) == 10000 + len(var), var
    # MAILPLAT_DATA_DIR picks the data dir (and its config file) when no path is given
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mailplat.toml").write_text("[api]\nport = 7001\n")
    cfg = configmod.load(None, env={"MAILPLAT_DATA_DIR": str(tmp_path / "d")})
    assert cfg.data_dir == tmp_path / "d" and cfg.api.port == 7001


def test_every_problem_reported_at_once(tmp_path):
    raw = {
        "api": {"port": 70000, "domains_rate_limit_per_minute": 0},
        "smtp": {"max_recipients": "lots", "max_message_bytes": 10, "processes": 0},
        "server": {"dev_mode": "maybe", "hostname": "has space"},
        "database": {"url": "mysql://x"},
        "log": {"level": "LOUD", "format": "xml"},
        "tls": {"cert": str(tmp_path / "nope.pem")},
        "relay": {"retry_schedule": [], "nonsense": 1, "idle_seconds": -1, "signing_processes": -1},
        "bogus": {"x": 1},
    }
    with pytest.raises(configmod.ConfigError) as info:
        configmod.from_raw(raw, tmp_path)
    keys = {k for k, _ in info.value.problems}
    assert {"api.port", "api.domains_rate_limit_per_minute", "smtp.max_recipients",
            "smtp.max_message_bytes", "smtp.processes", "server.dev_mode", "server.hostname", "database.url",
            "log.level", "log.format", "tls", "tls.cert", "relay.retry_schedule",
            "relay.nonsense", "relay.idle_seconds", "relay.signing_processes", "bogus"} <= keys
    reasons = dict(info.value.problems)
    assert "65535" in reasons["api.port"]
    assert reasons["relay.nonsense"] == "unknown setting"
    assert "0 (close at once) or more seconds" in reasons["relay.idle_seconds"]
    assert "expected true or false" in reasons["server.dev_mode"]


def test_bad_toml_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[api\nport = ")
    with pytest.raises(configmod.ConfigError) as info:
        configmod.load(path, env={})
    (key, reason), = info.value.problems
    assert key == "config" and "not valid TOML" in reason
    assert re.search(r"line \d+", reason)


def test_trusted_networks_are_validated(tmp_path):
    cfg = configmod.from_raw({"smtp": {"trusted_networks": ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]}},
                             tmp_path)
    assert cfg.smtp.trusted_networks == ("10.0.0.0/8", "fd00::/8", "192.0.2.7")
    assert configmod.Config(data_dir=tmp_path).smtp.trusted_networks == ()  # nobody by default
    with pytest.raises(configmod.ConfigError) as info:
        configmod.from_raw({"smtp": {"trusted_networks": ["10.0.0.0/8", "10.0.0.0/33", "lan"]}}, tmp_path)
    reasons = [r for k, r in info.value.problems if k == "smtp.trusted_networks"]
    assert len(reasons) == 2 and "'lan'" in reasons[1], reasons
    env = {"MAILPLAT_DATA_DIR": str(tmp_path)}
    (tmp_path / "mailplat.toml").write_text('[smtp]\ntrusted_networks = ["127.0.0.1/8"]\n')
    assert configmod.load(env=env).smtp.trusted_networks == ("127.0.0.1/8",)
