"""Configuration: one TOML file loaded into frozen dataclasses.

Owns the settings schema, defaults, environment overrides and validation. Every error is
collected and reported at once (`ConfigError.problems`), each with its key and reason.
Other modules receive a `Config` and never read the file or the environment themselves.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(os.path.expanduser("~/.local/share/mailplat"))
CONFIG_NAME = "mailplat.toml"


class ConfigError(Exception):
    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {r}" for k, r in problems))


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost"
    # dev_mode lets loopback clients AUTH/LOGIN without TLS; never set it in production.
    dev_mode: bool = False
    bind: str = "127.0.0.1"


@dataclass(frozen=True)
class DatabaseConfig:
    # Empty means SQLite at <data_dir>/mailplat.db.  postgresql://user@host:port/dbname for PostgreSQL.
    url: str = ""
    read_threads: int = 4
    # Days the body of a sent message is kept once every recipient is delivered or failed
    # (then the body goes; the message's row and events stay).  0: kept forever.
    keep_sent_bodies_days: float = 30.0


@dataclass(frozen=True)
class ApiConfig:
    port: int = 5080
    # Base URL printed and used in absolute paging links; empty means http://<bind>:<port>.
    public_url: str = ""
    domains_rate_limit_per_minute: int = 300
    max_request_bytes: int = 26_214_400 + 1_048_576


@dataclass(frozen=True)
class SmtpConfig:
    mx_port: int = 2525
    submission_port: int = 5587
    submissions_port: int = 5465
    max_message_bytes: int = 26_214_400
    max_recipients: int = 1000
    max_errors: int = 20
    command_timeout: float = 300.0
    max_connections_per_ip: int = 50
    # Plus-addressing: mail to user<delimiter>anything@domain is filed in user@domain's mailbox
    # when no mailbox, route or list names the full address.  Empty: off.
    recipient_delimiter: str = "+"
    # Mailbox (a full address) that gets postmaster@<domain> mail for a domain with no
    # postmaster mailbox and no route or list for it.  Empty: postmaster@<domain> is created
    # as a locked mailbox (readable once the operator sets its password).
    postmaster_mailbox: str = ""
    # Client networks (CIDRs) that may submit on the submission ports without AUTH, but only
    # with a MAIL FROM in one of our domains (never an open relay).  Empty: nobody.
    trusted_networks: tuple[str, ...] = ()
    # Processes accepting on the submission ports (587/465); the first also runs the MX port.
    processes: int = 1


@dataclass(frozen=True)
class MailAccessConfig:
    imap_port: int = 5143
    imaps_port: int = 5993
    pop3_port: int = 5110
    pop3s_port: int = 5995
    quota_bytes: int = 1_073_741_824
    # Days inbound mail for a full mailbox is retried before it is returned to its sender
    # (a delivery status notification).
    over_quota_days: float = 5.0


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""
    key: str = ""


@dataclass(frozen=True)
class DnsConfig:
    # Empty nameserver means the system resolver (/etc/resolv.conf).
    nameserver: str = ""
    port: int = 53
    timeout: float = 5.0
    # What this host publishes for customers' domains.
    mx_hosts: tuple[str, ...] = ("mxa.localhost", "mxb.localhost")
    spf_include: str = "spf.localhost"
    tracking_cname: str = "tracking.localhost"


@dataclass(frozen=True)
class RelayConfig:
    workers: int = 20
    per_destination: int = 5
    # Relay processes `serve relay` runs (workers and per_destination are divided between them).
    processes: int = 1
    lease_seconds: float = 300.0
    # Seconds a connection with nothing more to send stays open for the next message to its
    # destination (a connection cache, like Postfix's 2 s); 0 closes it at once.
    idle_seconds: float = 2.0
    # DKIM signing helper processes per relay process (relay.signer); 0 signs in the relay's
    # own threads.
    signing_processes: int = 1
    max_lifetime_seconds: float = 5 * 86400.0
    # Seconds between attempts; the last figure repeats until the lifetime runs out.
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)
    # Attempts after which temporary failures give up (reason "maxfails"); 0: only the lifetime
    # limits retrying (reason "old").
    max_attempts: int = 0
    connect_timeout: float = 30.0
    # Deliver to MX hosts resolving to loopback/private addresses (tests and closed networks).
    allow_private_mx: bool = False
    # Port remote MXes listen on (25 in production; tests point it at a loopback server).
    remote_port: int = 25
    # Seconds to wait for each reply of a remote MX (RFC 5321 4.5.3.2 suggests minutes).
    command_timeout: float = 300.0
    # CA bundle (PEM) that verifies remote MX certificates; empty means the system store.
    ca_file: str = ""


@dataclass(frozen=True)
class HooksConfig:
    # Let route forward()/store(notify=) and webhook URLs reach loopback, private and
    # link-local addresses (tests and closed networks only).
    allow_private_targets: bool = False
    timeout: float = 30.0
    # Seconds between attempts of an HTTP post; the last figure repeats until max_attempts.
    retry_schedule: tuple[float, ...] = (10.0, 60.0, 300.0, 900.0, 3600.0)
    max_attempts: int = 8
    # Days a route's store() keeps a message.
    stored_message_days: float = 3.0


@dataclass(frozen=True)
class SpamConfig:
    # SpamAssassin's spamd; empty host disables checking (mail is tagged unchecked).
    spamd_host: str = "127.0.0.1"
    spamd_port: int = 783
    timeout: float = 20.0
    max_bytes: int = 524_288


@dataclass(frozen=True)
class TrackingConfig:
    # Days events stay queryable and stored; 0 keeps them forever.
    events_retention_days: float = 30.0
    # Seconds between webhook attempts (Mailgun: three retries 10 minutes apart, then four
    # 30 minutes apart); a delivered-event webhook is posted once and never retried.
    webhook_retry_schedule: tuple[float, ...] = (600.0, 600.0, 600.0, 1800.0, 1800.0, 1800.0, 1800.0)
    webhook_max_attempts: int = 8
    # Local parts, on any of our domains, that take ARF complaints and DSN bounce reports.
    feedback_addresses: tuple[str, ...] = ("postmaster", "abuse", "fbl", "bounces")


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    # "json" or "text"
    format: str = "json"


@dataclass(frozen=True)
class Config:
    data_dir: Path = DEFAULT_DATA_DIR
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    mailaccess: MailAccessConfig = field(default_factory=MailAccessConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    log: LogConfig = field(default_factory=LogConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    spam: SpamConfig = field(default_factory=SpamConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def db_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'mailplat.db'}"

    @property
    def tls_cert(self) -> Path:
        return Path(self.tls.cert) if self.tls.cert else self.data_dir / "tls" / "cert.pem"

    @property
    def tls_key(self) -> Path:
        return Path(self.tls.key) if self.tls.key else self.data_dir / "tls" / "key.pem"

    @property
    def api_base_url(self) -> str:
        return self.api.public_url.rstrip("/") or f"http://{self.server.bind}:{self.api.port}"

    def with_overrides(self, **sections: dict[str, Any]) -> "Config":
        """A copy with some section fields replaced (used by the CLI and tests)."""
        changes = {}
        for name, values in sections.items():
            changes[name] = dataclasses.replace(getattr(self, name), **values)
        return dataclasses.replace(self, **changes)


# Environment overrides: variable -> (section, field).  Section None means a top-level field.
ENV_OVERRIDES = {
    "MAILPLAT_DATA_DIR": (None, "data_dir"),
    "MAILPLAT_DB_URL": ("database", "url"),
    "MAILPLAT_API_PORT": ("api", "port"),
    "MAILPLAT_SMTP_PORT": ("smtp", "mx_port"),
    "MAILPLAT_SUBMISSION_PORT": ("smtp", "submission_port"),
    "MAILPLAT_SUBMISSIONS_PORT": ("smtp", "submissions_port"),
    "MAILPLAT_IMAP_PORT": ("mailaccess", "imap_port"),
    "MAILPLAT_IMAPS_PORT": ("mailaccess", "imaps_port"),
    "MAILPLAT_POP3_PORT": ("mailaccess", "pop3_port"),
    "MAILPLAT_POP3S_PORT": ("mailaccess", "pop3s_port"),
}

_SECTION_CLASSES = {
    "server": ServerConfig, "database": DatabaseConfig, "api": ApiConfig, "smtp": SmtpConfig,
    "mailaccess": MailAccessConfig, "tls": TlsConfig, "dns": DnsConfig, "relay": RelayConfig,
    "log": LogConfig, "hooks": HooksConfig, "spam": SpamConfig, "tracking": TrackingConfig,
}
PORT_FIELDS = {
    "api": ("api", "port"), "smtp": ("smtp", "mx_port"),
    "submission": ("smtp", "submission_port"), "submissions": ("smtp", "submissions_port"),
    "imap": ("mailaccess", "imap_port"), "imaps": ("mailaccess", "imaps_port"),
    "pop3": ("mailaccess", "pop3_port"), "pop3s": ("mailaccess", "pop3s_port"),
}


def _coerce(key: str, value: Any, default: Any, problems: list) -> Any:
    """Convert a TOML or environment value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError("expected true or false")
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError("expected a list")
            kind = type(default[0]) if default else str
            return tuple(kind(v) for v in value)
        if isinstance(default, (str, Path)):
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return type(default)(value) if isinstance(default, Path) else value
    except (TypeError, ValueError) as exc:
        problems.append((key, str(exc) if "expected" in str(exc) else f"invalid value {value!r}"))
        return default
    return value


def _validate(cfg: Config, problems: list) -> None:
    for name, (section, attr) in PORT_FIELDS.items():
        port = getattr(getattr(cfg, section), attr)
        if not 0 <= port <= 65535:
            problems.append((f"{section}.{attr}", f"port {port} is outside 0..65535"))
    if cfg.smtp.max_message_bytes < 1024:
        problems.append(("smtp.max_message_bytes", "must be at least 1024"))
    if cfg.smtp.max_recipients < 1:
        problems.append(("smtp.max_recipients", "must be at least 1"))
    if len(cfg.smtp.recipient_delimiter) > 1 or cfg.smtp.recipient_delimiter.isalnum() \
            or cfg.smtp.recipient_delimiter in ("@", ".", '"'):
        problems.append(("smtp.recipient_delimiter", "must be one character other than a letter, a digit, @, . or \""))
    if cfg.smtp.postmaster_mailbox and "@" not in cfg.smtp.postmaster_mailbox:
        problems.append(("smtp.postmaster_mailbox", "must be a full address (or empty)"))
    if cfg.database.keep_sent_bodies_days < 0:
        problems.append(("database.keep_sent_bodies_days", "must not be negative"))
    if cfg.mailaccess.over_quota_days < 0:
        problems.append(("mailaccess.over_quota_days", "must not be negative"))
    for net in cfg.smtp.trusted_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append(("smtp.trusted_networks", f"{net!r} is not a network (CIDR like 10.0.0.0/8)"))
    if cfg.api.domains_rate_limit_per_minute < 1:
        problems.append(("api.domains_rate_limit_per_minute", "must be at least 1"))
    if cfg.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(("log.level", "must be DEBUG, INFO, WARNING or ERROR"))
    if cfg.log.format not in ("json", "text"):
        problems.append(("log.format", "must be json or text"))
    url = cfg.database.url
    if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        problems.append(("database.url", "must start with sqlite:/// or postgresql://"))
    if cfg.relay.per_destination < 1 or cfg.relay.workers < 1:
        problems.append(("relay.workers", "workers and per_destination must be at least 1"))
    if cfg.relay.signing_processes < 0:
        problems.append(("relay.signing_processes", "must be 0 (sign in the relay) or more processes"))
    if cfg.relay.idle_seconds < 0:
        problems.append(("relay.idle_seconds", "must be 0 (close at once) or more seconds"))
    if cfg.smtp.processes < 1:
        problems.append(("smtp.processes", "must be at least 1"))
    if cfg.relay.processes < 1:
        problems.append(("relay.processes", "must be at least 1"))
    if not cfg.relay.retry_schedule or any(s <= 0 for s in cfg.relay.retry_schedule):
        problems.append(("relay.retry_schedule", "must be a non-empty list of positive seconds"))
    if cfg.relay.max_attempts < 0:
        problems.append(("relay.max_attempts", "must be 0 (no limit) or a positive number of attempts"))
    if bool(cfg.tls.cert) != bool(cfg.tls.key):
        problems.append(("tls", "set both cert and key, or neither"))
    for key_name, path in (("tls.cert", cfg.tls.cert), ("tls.key", cfg.tls.key)):
        if path and not Path(path).is_file():
            problems.append((key_name, f"file {path} does not exist"))
    if not cfg.server.hostname or " " in cfg.server.hostname:
        problems.append(("server.hostname", "must be a host name"))


def load(path: Path | None = None, data_dir: Path | None = None, env: dict | None = None,
         check_files: bool = True, extra: dict | None = None) -> Config:
    """Load config from `path` (or <data_dir>/mailplat.toml when it exists), then `extra`
    section values (from CLI flags), then env overrides.  Raises ConfigError listing every
    problem found."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if data_dir is None and env.get("MAILPLAT_DATA_DIR"):
        data_dir = Path(env["MAILPLAT_DATA_DIR"])
    if path is None:
        candidate = (data_dir or DEFAULT_DATA_DIR) / CONFIG_NAME
        path = candidate if candidate.exists() else None
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError([("config", f"file {path} does not exist")])
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([("config", f"{path} is not valid TOML: {exc}")])
    for section, values in (extra or {}).items():
        raw.setdefault(section, {}).update(values)
    for var, (section, fname) in ENV_OVERRIDES.items():
        if var in env and section is not None:
            raw.setdefault(section, {})[fname] = env[var]
    if data_dir is None:
        data_dir = Path(raw.get("data_dir") or DEFAULT_DATA_DIR)
    return from_raw(raw, data_dir, check_files)


def from_raw(raw: dict[str, Any], data_dir: Path, check_files: bool = True) -> Config:
    problems: list[tuple[str, str]] = []
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "data_dir":
            continue
        cls = _SECTION_CLASSES.get(key)
        if cls is None or not isinstance(value, dict):
            problems.append((key, "unknown setting" if cls is None else "expected a table"))
            continue
        defaults = cls()
        known = {f.name for f in fields(cls)}
        values = {}
        for fname, fvalue in value.items():
            if fname not in known:
                problems.append((f"{key}.{fname}", "unknown setting"))
                continue
            values[fname] = _coerce(f"{key}.{fname}", fvalue, getattr(defaults, fname), problems)
        sections[key] = values
    built = {name: _SECTION_CLASSES[name](**sections.get(name, {})) for name in _SECTION_CLASSES}
    cfg = Config(data_dir=Path(data_dir).expanduser(), **built)
    if check_files:
        _validate(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def render_toml(cfg: Config) -> str:
    """Serialise a Config back to TOML (written by `mailplat init`)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"data_dir = {fmt(str(cfg.data_dir))}", ""]
    for name in _SECTION_CLASSES:
        lines.append(f"[{name}]")
        section = getattr(cfg, name)
        for f in fields(section):
            lines.append(f"{f.name} = {fmt(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)
