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

_SECRET_NAME = r"(?:password|passwd|secret|api[_-]?key|smtp_password|token)"
# name=value, name: value, "name": "value with spaces"
_SECRET = re.compile(rf"(?i)({_SECRET_NAME}[\"']?\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s\"',&]+)")
# Authorization: Basic <credentials>: the credentials, not the scheme, are the secret
_AUTHZ = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:(?:basic|bearer|digest)\s+)?)([^\s\"',&]+)")
# an API key anywhere (key-<id>-<secret>): keep the public id, drop the secret
_API_KEY = re.compile(r"\b(key-[0-9a-f]{4,32}-)[0-9A-Za-z_]{8,}")
_SECRET_FIELD = re.compile(rf"(?i){_SECRET_NAME}|authorization")


def redact(text: str) -> str:
    text = _AUTHZ.sub(lambda m: m.group(1) + "***", text)
    text = _SECRET.sub(lambda m: m.group(1) + ("\"***\"" if m.group(2)[:1] in "\"'" else "***"), text)
    return _API_KEY.sub(lambda m: m.group(1) + "***", text)


def _safe_fields(values: dict) -> dict:
    """Structured fields: a secret-named field is masked, strings are redacted."""
    out = {}
    for k, v in values.items():
        if _SECRET_FIELD.search(str(k)):
            out[k] = "***"
        elif isinstance(v, str):
            out[k] = redact(v)
        else:
            out[k] = v
    return out


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
        entry.update(_safe_fields(_context.get()))
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(_safe_fields(extra))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = _safe_fields({**_context.get(), **(getattr(record, "fields", None) or {})})
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
