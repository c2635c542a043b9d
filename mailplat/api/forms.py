"""Request bodies and query strings, whatever their encoding.

Owns turning urlencoded, multipart and JSON bodies into one `Form` (repeated fields as lists,
file parts kept apart), loose booleans, and integer parameters with clamps.  Malformed bodies
raise InputError (400), never a 500.  Views read fields only through a Form.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

from ..core.options import yes_no
from ..errors import InputError, TooLarge

MAX_FIELDS = 10_000


def loose_bool(value, name: str = "value") -> bool:
    return yes_no(value, name)


@dataclass
class UploadedFile:
    name: str  # form field name
    filename: str
    content_type: str | None
    data: bytes


@dataclass
class Form:
    fields: MultiDict = field(default_factory=MultiDict)
    files: list[UploadedFile] = field(default_factory=list)
    json_body: object = None  # set when the body was JSON

    def get(self, name: str, default=None):
        value = self.fields.get(name, default)
        return value

    def getall(self, name: str) -> list:
        return list(self.fields.getall(name, []))

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def str(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.fields.get(name)
        if value is None or (isinstance(value, str) and value == "" and required):
            if required:
                raise InputError(f"'{name}' parameter is missing")
            return default
        if not isinstance(value, str):
            value = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        return value

    def bool(self, name: str, default: bool | None = None) -> bool | None:
        value = self.fields.get(name)
        if value is None or value == "":
            return default
        return loose_bool(value, name)

    def int(self, name: str, default: int | None = None, lo: int | None = None,
            hi: int | None = None, clamp: bool = True) -> int | None:
        value = self.fields.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(str(value).strip())
        except ValueError:
            raise InputError(f"'{name}' parameter should be an integer") from None
        if lo is not None and number < lo:
            if not clamp:
                raise InputError(f"'{name}' parameter should be at least {lo}")
            number = lo
        if hi is not None and number > hi:
            if not clamp:
                raise InputError(f"'{name}' parameter should be at most {hi}")
            number = hi
        return number

    def files_named(self, name: str) -> list[UploadedFile]:
        return [f for f in self.files if f.name == name]


def query(request: web.Request) -> Form:
    return Form(fields=MultiDict(request.query))


async def read_form(request: web.Request, max_bytes: int) -> Form:
    """Parse the body of a POST/PUT (and merge the query string under it)."""
    if request.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
        raise web.HTTPUnsupportedMediaType(text=json.dumps({"message": "Content-Encoding is not supported on uploads"}),
                                           content_type="application/json")
    if request.content_length is not None and request.content_length > max_bytes:
        raise TooLarge("Request entity too large")
    form = Form(fields=MultiDict(request.query))
    ctype = request.content_type
    if not request.body_exists:
        return form
    try:
        if ctype == "multipart/form-data":
            await _read_multipart(request, form, max_bytes)
        elif ctype == "application/json":
            raw = await request.read()
            try:
                body = json.loads(raw or b"null")
            except (ValueError, UnicodeDecodeError):
                raise InputError("Invalid JSON body") from None
            form.json_body = body
            if isinstance(body, dict):
                for k, v in body.items():
                    for item in (v if isinstance(v, list) and k in _REPEATABLE else [v]):
                        form.fields.add(str(k), item if isinstance(item, (str, dict, list)) or item is None
                                        else (str(item).lower() if isinstance(item, bool) else str(item)))
        else:
            raw = await request.read()
            try:
                text = raw.decode("utf-8")
                pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                                  max_num_fields=MAX_FIELDS, errors="strict")
            except (UnicodeDecodeError, ValueError):
                raise InputError("Malformed form body") from None
            for k, v in pairs:
                form.fields.add(k, v)
    except web.HTTPRequestEntityTooLarge:
        raise TooLarge("Request entity too large") from None
    except (InputError, TooLarge):
        raise
    except (ValueError, AssertionError, RuntimeError, LookupError, TypeError) as exc:
        raise InputError(f"Malformed request body: {type(exc).__name__}") from None
    return form


_REPEATABLE = {"to", "cc", "bcc", "o:tag", "action", "url", "event_types", "event"}


async def _read_multipart(request: web.Request, form: Form, max_bytes: int) -> None:
    reader = await request.multipart()
    total = 0
    count = 0
    while True:
        part = await reader.next()
        if part is None:
            break
        count += 1
        if count > MAX_FIELDS:
            raise InputError("Too many form fields")
        if not hasattr(part, "read_chunk"):
            raise InputError("Nested multipart bodies are not supported")
        chunks = []
        while True:
            chunk = await part.read_chunk(65536)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise TooLarge("Request entity too large")
            chunks.append(chunk)
        data = b"".join(chunks)
        if part.headers.get("Content-Transfer-Encoding", "").lower() == "base64":
            import base64
            data = base64.b64decode(data)
        name = part.name
        if not name:
            raise InputError("A multipart part has no name")
        if part.filename is not None:
            ctype = part.headers.get("Content-Type")
            form.files.append(UploadedFile(name=name, filename=part.filename, content_type=ctype, data=data))
        else:
            charset = part.get_charset(default="utf-8")
            try:
                form.fields.add(name, data.decode(charset))
            except (UnicodeDecodeError, LookupError):
                raise InputError(f"Field '{name}' is not valid text") from None
