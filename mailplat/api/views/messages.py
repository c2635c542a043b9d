"""Sending by HTTP: POST /v3/<domain>/messages and /messages.mime (and the /v2/ paths).

Owns reading Mailgun's sending fields (from, to, cc, bcc, subject, text, html, amp-html,
attachment/inline files, o:*, h:*, v:*, recipient-variables; for messages.mime the `message`
as a file part or a plain field) into one core.send.SendRequest.  core.send.submit() decides
what they mean and commits; this module answers 200 {"id", "message"} only after it returns.
"""
from __future__ import annotations

import json

from aiohttp import web

from ...core import options as optmod
from ...core.context import Context
from ...core.send import Attachment, SendRequest, submit
from ...errors import InputError
from ..forms import Form, read_form
from ..middleware import json_response, sending

BODY_FIELDS = ("text", "html", "amp-html")


def _text(form: Form, name: str) -> str | None:
    value = form.str(name)
    return value if value not in (None, "") else None


def _apply_options(form: Form, opts: optmod.Options, user_variables: dict,
                   headers: list[tuple[str, str]] | None, now: float) -> None:
    for key, value in form.fields.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, (dict, list)) and not key.startswith("v:"):
            value = json.dumps(value)
        if key.startswith("o:"):
            optmod.apply(opts, user_variables, key, value if value is not None else "", now)
        elif key.startswith("v:"):
            optmod.merge_variables(user_variables, key[2:], value)
        elif key.startswith("h:") and len(key) > 2:
            name = key[2:]
            if name.lower() in optmod.HEADER_OPTIONS:
                optmod.apply(opts, user_variables, name, "" if value is None else str(value), now)
            elif headers is not None:
                headers.append((name, "" if value is None else str(value)))
    if opts.drop_message:
        opts.testmode = True
    optmod.check_variables_size(user_variables)


def _recipient_variables(form: Form) -> dict:
    raw = form.get("recipient-variables")
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return {str(k).strip().lower(): v for k, v in raw.items()}
    return optmod.parse_recipient_variables(str(raw))


def _files(form: Form, name: str) -> list[Attachment]:
    return [Attachment(filename=f.filename or name, content_type=f.content_type, data=f.data)
            for f in form.files_named(name)]


def setup(app: web.Application, ctx: Context) -> None:
    limit = ctx.config.api.max_request_bytes

    @sending
    async def send_message(request: web.Request) -> web.Response:
        domain = request.match_info["domain"].strip().lower()
        principal = request["principal"]
        principal.require_sending(domain)
        form = await read_form(request, limit)
        opts = optmod.Options()
        user_variables: dict = {}
        headers: list[tuple[str, str]] = []
        _apply_options(form, opts, user_variables, headers, ctx.clock())
        if form.get("template") not in (None, "") and not any(_text(form, f) for f in BODY_FIELDS):
            raise InputError("Templates are not supported: send 'text', 'html' or 'amp-html'")
        req = SendRequest(
            domain=domain, source="api",
            from_=_text(form, "from"),
            to=[str(v) for v in form.getall("to")], cc=[str(v) for v in form.getall("cc")],
            bcc=[str(v) for v in form.getall("bcc")],
            subject=form.str("subject"),
            text=form.str("text"), html=_text(form, "html"), amp_html=_text(form, "amp-html"),
            attachments=_files(form, "attachment"), inline=_files(form, "inline"),
            headers=headers, options=opts, user_variables=user_variables,
            recipient_variables=_recipient_variables(form),
        )
        if req.text == "" and req.html is None and req.amp_html is None:
            req.text = None
        result = await submit(ctx, req, principal)
        return json_response({"id": f"<{result.message_id}>", "message": "Queued. Thank you."})

    @sending
    async def send_mime(request: web.Request) -> web.Response:
        domain = request.match_info["domain"].strip().lower()
        principal = request["principal"]
        principal.require_sending(domain)
        form = await read_form(request, limit)
        files = form.files_named("message")
        if files:
            raw = files[0].data
        else:
            text = form.str("message")
            if text in (None, ""):
                raise InputError("message parameter is missing")
            raw = text.encode("utf-8")
        to = [str(v) for v in form.getall("to")]
        if not any(t.strip() for t in to):
            raise InputError("to parameter is missing")
        opts, user_variables, raw = optmod.from_headers(raw, ctx.clock())
        _apply_options(form, opts, user_variables, None, ctx.clock())
        req = SendRequest(domain=domain, source="api", mime=raw, to=to, options=opts,
                          user_variables=user_variables,
                          recipient_variables=_recipient_variables(form))
        result = await submit(ctx, req, principal)
        return json_response({"id": f"<{result.message_id}>", "message": "Queued. Thank you."})

    for version in ("v3", "v2"):
        app.router.add_post(f"/{version}/{{domain}}/messages", send_message)
        app.router.add_post(f"/{version}/{{domain}}/messages.mime", send_mime)
