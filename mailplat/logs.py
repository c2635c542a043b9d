"""Structured logging.

Owns the log format (JSON lines or text) and the per-task context (request id, message id,
queue id, peer, domain) carried in a ContextVar, so every line logged while handling one request
or one SMTP session says which it belongs to.  `redact()` masks secrets; callers never log
passwords, keys or AUTH lines in the first place.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from contextlib import contextmanager

_context: contextvars.ContextVar[dict] = contextvars.ContextVar("mailplat_log_context", default={})

_SECRET = re.compile(r"(?i)(password|passwd|secret|api[_-]?key|authorization|smtp_password)([\"']?\s*[:=]\s*[\"']?)([^\s\"',&]+)")


def redact(text: str) -> str:
    return _SECRET.sub(lambda m: m.group(1) + m.group(2) + "***", text)


@contextmanager
def context(**values):
    """Add fields to every log line emitted inside the block (and tasks it starts)."""
    token = _context.set({**_context.get(), **{k: v for k, v in values.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**values) -> None:
    """Add fields for the rest of the current task."""
    _context.set({**_context.get(), **{k: v for k, v in values.items() if v is not None}})


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        entry.update(_context.get())
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = {**_context.get(), **(getattr(record, "fields", None) or {})}
        tail = " ".join(f"{k}={v}" for k, v in ctx.items())
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.name}: {redact(record.getMessage())}"
        if tail:
            line += f" [{tail}]"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def setup(level: str = "INFO", fmt: str = "json", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("peewee", "aiohttp.access", "mail.log", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get(name: str) -> logging.Logger:
    return logging.getLogger(name)


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    """Log `msg` with structured fields."""
    logger.log(level, msg, extra={"fields": fields})
