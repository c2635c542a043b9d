"""Runs services on one asyncio loop: start, ports.json, sd_notify, signals, orderly stop.

Owns the process lifecycle of `mailplat serve`.  Each service module has `create(ctx)`
returning an object with `start() -> {port name: port}` and `stop()`.  Services share nothing
but the store and never import one another; this module is the only one that knows them all.
On SIGTERM/SIGINT: stop accepting, let in-flight work finish, exit 0.
"""
from __future__ import annotations

import asyncio
import fcntl
import importlib
import json
import os
import signal
import socket

from . import logs
from .core.context import Context

log = logs.get("mailplat.supervisor")

SERVICES = {
    "api": "mailplat.api.app",
    "smtpd": "mailplat.smtpd.service",
    "relay": "mailplat.relay.service",
    "mailaccess": "mailplat.mailaccess.service",
    "hooks": "mailplat.hooks.service",
}


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
            sock.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def install_twisted_reactor(loop: asyncio.AbstractEventLoop) -> None:
    """Twisted (IMAP/POP3) runs on this same asyncio loop."""
    from twisted.internet import asyncioreactor
    import sys
    if "twisted.internet.reactor" not in sys.modules:
        asyncioreactor.install(loop)


def _update_ports(data_dir, add: dict[str, int], remove=()) -> None:
    """Merge into <data_dir>/ports.json under a lock: several `serve <service>` processes (the
    systemd instances) share one data dir, each adding its ports and removing them on stop."""
    path = data_dir / "ports.json"
    with open(data_dir / ".ports.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            current = {}
        for name in remove:
            current.pop(name, None)
        current.update(add)
        if not current and remove:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(f"ports.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        os.replace(tmp, path)


def write_ports(ctx: Context) -> None:
    _update_ports(ctx.config.data_dir, ctx.ports)


def forget_ports(ctx: Context) -> None:
    _update_ports(ctx.config.data_dir, {}, remove=list(ctx.ports))


async def run(ctx: Context, names: list[str], on_ready=None) -> int:
    loop = asyncio.get_running_loop()
    if "mailaccess" in names:
        install_twisted_reactor(loop)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    started = []
    try:
        for name in names:
            service = importlib.import_module(SERVICES[name]).create(ctx)
            ctx.ports.update(await service.start())
            started.append(service)
        write_ports(ctx)
        log.info("ready", extra={"fields": {"services": names, "ports": ctx.ports}})
        if on_ready:
            on_ready(ctx)
        sd_notify("READY=1")
        await stopping.wait()
        log.info("stopping")
        sd_notify("STOPPING=1")
    finally:
        # All at once: every listener closes now, and each service drains its in-flight work
        # in parallel (one service draining must not keep another's port open).
        results = await asyncio.gather(*(service.stop() for service in started),
                                       return_exceptions=True)
        for service, result in zip(started, results):
            if isinstance(result, BaseException):  # keep stopping the others
                log.error("error while stopping %s", service.name, exc_info=result)
        if ctx.ports:
            forget_ports(ctx)
        ctx.store.close()
    log.info("stopped")
    return 0
