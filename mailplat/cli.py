"""The `mailplat` command: init, serve, check-config, domain, key, db (and more as they land).

Owns argument parsing and what each command prints.  Work is done by core (through the store)
and by the supervisor; this module only wires them.  `mailplat key create` prints only the key.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from . import config as configmod
from . import logs
from .store import repair
from .store.db import StoreUnsupported

SERVICE_NAMES = ["api", "smtpd", "relay", "mailaccess", "hooks"]
PORT_FLAGS = {
    "api": ("api", "port"), "smtp": ("smtp", "mx_port"), "submission": ("smtp", "submission_port"),
    "submissions": ("smtp", "submissions_port"), "imap": ("mailaccess", "imap_port"),
    "imaps": ("mailaccess", "imaps_port"), "pop3": ("mailaccess", "pop3_port"),
    "pop3s": ("mailaccess", "pop3s_port"),
}


def _die(msg: str, code: int = 1):
    print(f"mailplat: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _load(args, check_files: bool = True) -> configmod.Config:
    try:
        return configmod.load(Path(args.config) if args.config else None,
                              Path(args.data_dir) if args.data_dir else None,
                              check_files=check_files)
    except configmod.ConfigError as exc:
        for key, reason in exc.problems:
            print(f"config error: {key}: {reason}", file=sys.stderr)
        raise SystemExit(2)


def _open_store(cfg: configmod.Config, migrate: bool = True):
    from .store.db import open_store
    return open_store(cfg.db_url, cfg.database.read_threads, migrate=migrate)


def _parse_sets(values: list[str]) -> dict[str, dict]:
    sections: dict[str, dict] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        section, dot, fname = key.partition(".")
        if not sep or not dot:
            _die(f"--set takes section.field=value, got {item!r}", 2)
        sections.setdefault(section, {})[fname] = value
    return sections


# -- init -----------------------------------------------------------------------------------
def initialise(data_dir: Path, config_path: Path | None = None, overrides: dict | None = None,
               announce=print) -> tuple[configmod.Config, str | None]:
    """Create config, data dir, TLS cert, schema and primary key where missing.

    Returns the config and the new primary key (None when one already existed)."""
    from .core import auth
    from .tls import make_self_signed

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    config_path = config_path or data_dir / configmod.CONFIG_NAME
    if not config_path.exists():
        base = configmod.Config(data_dir=data_dir)
        text = configmod.render_toml(base)
        config_path.write_text(text)
        os.chmod(config_path, 0o600)
    if overrides:  # keep flag values for later runs (env overrides stay transient)
        kept = configmod.load(config_path, data_dir, env={}, extra=overrides)
        config_path.write_text(configmod.render_toml(kept))
    cfg = configmod.load(config_path, data_dir)
    if not cfg.tls.cert and not cfg.tls_cert.exists():
        make_self_signed(cfg.tls_cert, cfg.tls_key, cfg.server.hostname)
    store = _open_store(cfg)
    try:
        with store.sync():
            if auth.has_primary_key_sync():
                return cfg, None
            _, key = auth.create_key_sync("admin", None, "primary key", is_primary=True)
        return cfg, key
    finally:
        store.close()


def cmd_init(args) -> int:
    overrides = _parse_sets(args.set)
    if args.hostname:
        overrides.setdefault("server", {})["hostname"] = args.hostname
    if args.dev_mode:
        overrides.setdefault("server", {})["dev_mode"] = "true"
    if args.db_url:
        overrides.setdefault("database", {})["url"] = args.db_url
    for name, (section, fname) in PORT_FLAGS.items():
        value = getattr(args, f"{name}_port")
        if value is not None:
            overrides.setdefault(section, {})[fname] = str(value)
    data_dir = Path(args.data_dir or os.environ.get("MAILPLAT_DATA_DIR") or configmod.DEFAULT_DATA_DIR)
    try:
        cfg, key = initialise(data_dir, Path(args.config) if args.config else None, overrides)
    except configmod.ConfigError as exc:
        for k, reason in exc.problems:
            print(f"config error: {k}: {reason}", file=sys.stderr)
        return 2
    print(f"data dir: {cfg.data_dir}")
    print(f"config:   {args.config or cfg.data_dir / configmod.CONFIG_NAME}")
    if key:
        print(f"primary API key: {key}")
        print("(shown once: it is stored hashed; `mailplat key create` makes more)")
    else:
        print("primary API key: already created earlier (stored hashed; `mailplat key create` makes another)")
    return 0


# -- serve ----------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    data_dir = Path(args.data_dir or os.environ.get("MAILPLAT_DATA_DIR") or configmod.DEFAULT_DATA_DIR)
    new_key = None
    config_path = Path(args.config) if args.config else data_dir / configmod.CONFIG_NAME
    if not config_path.exists():
        if args.config:
            _die(f"config file {args.config} does not exist", 2)
        _, new_key = initialise(data_dir)
    elif not args.config:
        _, new_key = initialise(data_dir)  # fills anything missing (cert, schema, primary key)
    if not args.config:  # with --config, the file's data_dir holds unless --data-dir/env says
        args.data_dir = str(data_dir)
    cfg = _load(args)
    names = args.services or SERVICE_NAMES
    for name in names:
        if name not in SERVICE_NAMES:
            _die(f"unknown service {name!r} (choose from {', '.join(SERVICE_NAMES)})", 2)
    logs.setup(cfg.log.level, cfg.log.format)

    from .core.context import Context
    from .supervisor import run

    store = _open_store(cfg)
    ctx = Context(config=cfg, store=store)

    def banner(ctx: Context) -> None:
        api_port = ctx.ports.get("api")
        lines = ["mailplat is running"]
        if api_port:
            base = cfg.api.public_url.rstrip("/") or f"http://{cfg.server.bind}:{api_port}"
            lines.append(f"  API base URL: {base}  (Mailgun SDKs: api_url={base})")
        if new_key:
            lines.append(f"  API key:      {new_key}  (primary key, shown only now; stored hashed)")
        else:
            lines.append("  API key:      the primary key printed when this data dir was created "
                         "(`mailplat key create` makes another)")
        for name, port in sorted(ctx.ports.items()):
            lines.append(f"  {name + ':':<13} {cfg.server.bind}:{port}")
        lines.append(f"  data dir:     {cfg.data_dir}")
        print("\n".join(lines), flush=True)

    return asyncio.run(run(ctx, names, on_ready=banner))


# -- check-config ---------------------------------------------------------------------------
def cmd_check_config(args) -> int:
    cfg = _load(args)
    print(f"config OK ({args.config or cfg.data_dir / configmod.CONFIG_NAME})")
    return 0


# -- domain ---------------------------------------------------------------------------------
def cmd_domain(args) -> int:
    cfg = _load(args)
    from .core import domains
    from .core.context import Context
    from .errors import MailplatError

    async def go():
        store = _open_store(cfg)
        ctx = Context(config=cfg, store=store)
        try:
            if args.domain_cmd == "add":
                opts = {"smtp_password": args.smtp_password, "dkim_key_size": args.dkim_key_size,
                        "dkim_selector": args.dkim_selector, "spam_action": args.spam_action,
                        "wildcard": args.wildcard}
                result = await domains.create_domain(ctx, args.name, {k: v for k, v in opts.items() if v is not None})
            elif args.domain_cmd == "list":
                result = await domains.list_domains(ctx, limit=1000, skip=0)
            elif args.domain_cmd == "show":
                result = await domains.get_domain(ctx, args.name)
            elif args.domain_cmd == "delete":
                result = await domains.delete_domain(ctx, args.name)
            else:
                raise AssertionError(args.domain_cmd)
            print(json.dumps(result, indent=2))
            return 0
        except MailplatError as exc:
            print(f"mailplat: {exc.message}", file=sys.stderr)
            return 1
        finally:
            store.close()

    return asyncio.run(go())


# -- key ------------------------------------------------------------------------------------
def cmd_key(args) -> int:
    cfg = _load(args)
    from .core import auth
    from .errors import MailplatError

    store = _open_store(cfg)
    try:
        with store.sync():
            if args.key_cmd == "create":
                domain = args.domain
                if domain:
                    from .core.domains import normalize_name
                    domain = normalize_name(domain)
                _, key = auth.create_key_sync("sending" if domain else args.role, domain,
                                              args.description or "")
                print(key)
            elif args.key_cmd == "list":
                for row in auth.list_keys_sync():
                    d = auth.key_json(row)
                    print(f"{d['id']}\t{d['role']}\t{d['domain_name'] or '-'}\t{d['created_at']}\t{d['description']}")
            elif args.key_cmd == "revoke":
                auth.revoke_key_sync(args.key_id)
                print(f"revoked {args.key_id}")
        return 0
    except MailplatError as exc:
        print(f"mailplat: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()


# -- db -------------------------------------------------------------------------------------
def cmd_db(args) -> int:
    cfg = _load(args)
    if args.db_cmd == "repair":
        return _db_repair(cfg)
    store = _open_store(cfg, migrate=False)
    try:
        if args.db_cmd == "check":
            problems = repair.check(store)
            print("\n".join(problems) if problems else "ok")
            return 1 if problems else 0
        if args.db_cmd == "gc":
            from .core import receive
            from .core.context import Context
            n = asyncio.run(receive.collect_garbage(Context(config=cfg, store=store), args.grace))
            print(f"deleted {n} unreferenced blobs")
            return 0
        applied = store.migrate()
        print("\n".join(f"applied {name}" for name in applied) or "schema is up to date")
        return 0
    finally:
        store.close()


def _live_ports(cfg: configmod.Config) -> list[int]:
    """The ports a running mailplat wrote to ports.json that still accept connections."""
    import socket
    try:
        ports = json.loads((cfg.data_dir / "ports.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    host = "127.0.0.1" if cfg.server.bind in ("0.0.0.0", "::", "") else cfg.server.bind
    live = []
    for port in sorted(set(ports.values())):
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            live.append(int(port))
        except OSError:
            pass
    return live


def _db_repair(cfg: configmod.Config) -> int:
    """Rebuild a damaged SQLite store from what can still be read (services must be stopped)."""
    from .store.db import open_store
    path = repair.sqlite_path(cfg.db_url)
    if path is None:
        _die("db repair works on the SQLite store; PostgreSQL is repaired with its own tools")
    live = _live_ports(cfg)
    if live:
        _die(f"mailplat is running (ports {', '.join(map(str, live))} answer): stop it first")
    recovered = f"{path}.recovered"
    for leftover in (recovered, recovered + "-wal", recovered + "-shm"):
        Path(leftover).unlink(missing_ok=True)
    open_store(f"sqlite:///{recovered}", 1).close()  # the full schema, empty
    result = repair.salvage(path, recovered)
    for table, n in sorted(result.copied.items()):
        lost = result.lost.get(table, 0)
        print(f"{table}: {n} rows kept" + (f", {lost} unreadable rows lost" if lost else ""))
    for table in result.unreadable_tables:
        print(f"{table}: not found in the damaged file (left empty)")
    aside = repair.swap_in(path, recovered)
    print(f"store rebuilt; the damaged file is kept as {aside}")
    return 0


def _seconds(text: str) -> float:
    """A non-negative number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be zero or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailplat", description="Self-hosted mail platform")
    # SUPPRESS: a nested parser (`key create`) must not reset a value given earlier
    # (`key --data-dir D create`); the None defaults live on the top parser.
    parser.set_defaults(data_dir=None, config=None)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="data directory (default $MAILPLAT_DATA_DIR or ~/.local/share/mailplat)")
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="config file (default <data-dir>/mailplat.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common], help="create config, data dir, TLS cert and primary key")
    p.add_argument("--hostname")
    p.add_argument("--db-url")
    p.add_argument("--dev-mode", action="store_true", help="allow AUTH without TLS from loopback")
    for name in PORT_FLAGS:
        p.add_argument(f"--{name}-port", type=int, help=f"{name} port (0 picks a free one)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="any other setting")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("serve", parents=[common], help="run services (all by default)")
    p.add_argument("services", nargs="*", metavar="service", help=f"any of {', '.join(SERVICE_NAMES)}")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("check-config", parents=[common], help="validate the config, listing every error")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser("domain", parents=[common], help="manage domains")
    dsub = p.add_subparsers(dest="domain_cmd", required=True)
    a = dsub.add_parser("add", parents=[common])
    a.add_argument("name")
    a.add_argument("--smtp-password")
    a.add_argument("--dkim-key-size", type=int)
    a.add_argument("--dkim-selector")
    a.add_argument("--spam-action")
    a.add_argument("--wildcard")
    dsub.add_parser("list", parents=[common])
    for verb in ("show", "delete"):
        d = dsub.add_parser(verb, parents=[common])
        d.add_argument("name")
    p.set_defaults(fn=cmd_domain)

    p = sub.add_parser("key", parents=[common], help="manage API keys")
    ksub = p.add_subparsers(dest="key_cmd", required=True)
    c = ksub.add_parser("create", parents=[common])
    c.add_argument("--role", default="admin", choices=["admin", "sending"])
    c.add_argument("--domain", help="make a sending key for this domain")
    c.add_argument("--description")
    ksub.add_parser("list", parents=[common])
    r = ksub.add_parser("revoke", parents=[common])
    r.add_argument("key_id")
    p.set_defaults(fn=cmd_key)

    from .clicmds import queue as queue_cmd
    queue_cmd.register(sub, common)
    from .clicmds import sendtest
    sendtest.register(sub, common)
    from .clicmds import webhooks as webhooks_cmd
    webhooks_cmd.register(sub, common)

    p = sub.add_parser("db", parents=[common], help="database maintenance")
    bsub = p.add_subparsers(dest="db_cmd", required=True)
    bsub.add_parser("migrate", parents=[common])
    bsub.add_parser("check", parents=[common], help="integrity check (exit 1 on problems)")
    bsub.add_parser("repair", parents=[common], help="rebuild a damaged SQLite store (services stopped)")
    gc = bsub.add_parser("gc", parents=[common], help="delete message bodies nothing references any more "
                         "(the inbound worker does it hourly)")
    gc.add_argument("--grace", type=_seconds, default=3600.0,
                    help="only bodies stored at least this many seconds ago (default 3600)")
    p.set_defaults(fn=cmd_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args) or 0
    except (repair.StoreDamaged, StoreUnsupported) as exc:
        _die(str(exc))


if __name__ == "__main__":
    sys.exit(main())
