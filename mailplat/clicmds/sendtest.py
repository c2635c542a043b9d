"""`mailplat send-test`: send one message through this host's own HTTP API.

Owns what the command sends and prints.  It goes through POST /v3/<domain>/messages like any
application would (so it proves the API, the send path and the queue end to end), to the API
URL of the running server (config api.public_url, else the port in <data dir>/ports.json, else
the configured port).  With no --key (or MAILPLAT_API_KEY) it makes a sending key for the
domain in the store, uses it once and revokes it.
"""
from __future__ import annotations

import json
import os
import sys


def register(sub, common) -> None:
    p = sub.add_parser("send-test", parents=[common], help="send a test message through the HTTP API")
    p.add_argument("--from", dest="from_", required=True, help="From address (its domain sends unless --domain)")
    p.add_argument("--to", required=True, action="append", help="recipient (repeat for more)")
    p.add_argument("--domain", help="sending domain (default: the domain of --from)")
    p.add_argument("--subject", default="mailplat test message")
    p.add_argument("--text", default="This is a test message sent by `mailplat send-test`.")
    p.add_argument("--testmode", action="store_true", help="accept and queue, but never connect out (o:testmode)")
    p.add_argument("--key", help="API key (default $MAILPLAT_API_KEY, else a one-use sending key)")
    p.add_argument("--url", help="API base URL (default: the running server's)")
    p.set_defaults(fn=cmd_send_test)


def _api_url(cfg, given: str | None) -> str:
    if given:
        return given.rstrip("/")
    if cfg.api.public_url:
        return cfg.api.public_url.rstrip("/")
    ports = cfg.data_dir / "ports.json"
    port = cfg.api.port
    try:
        port = int(json.loads(ports.read_text())["api"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    host = cfg.server.bind if cfg.server.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def cmd_send_test(args) -> int:
    import requests

    from ..cli import _load, _open_store
    from ..core import auth
    from ..errors import MailplatError

    cfg = _load(args)
    domain = (args.domain or args.from_.rsplit("@", 1)[-1].strip(" >")).lower()
    key = args.key or os.environ.get("MAILPLAT_API_KEY")
    temp_key_id = None
    store = None
    if not key:
        store = _open_store(cfg)
        try:
            with store.sync():
                row, key = auth.create_key_sync("sending", domain, "send-test (one use)")
                temp_key_id = row.key_id
        except MailplatError as exc:
            store.close()
            print(f"mailplat: {exc.message}", file=sys.stderr)
            return 1
    url = f"{_api_url(cfg, args.url)}/v3/{domain}/messages"
    data = {"from": args.from_, "to": args.to, "subject": args.subject, "text": args.text}
    if args.testmode:
        data["o:testmode"] = "yes"
    try:
        resp = requests.post(url, data=data, auth=("api", key), timeout=60)
    except requests.RequestException as exc:
        print(f"mailplat: cannot reach the API at {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        if temp_key_id is not None:
            with store.sync():
                auth.revoke_key_sync(temp_key_id)
            store.close()
    try:
        body = resp.json()
    except ValueError:
        body = {"message": resp.text[:500]}
    if resp.status_code != 200:
        print(f"mailplat: the API answered {resp.status_code}: {body.get('message', body)}", file=sys.stderr)
        return 1
    print(f"{body.get('message', '')} id={body.get('id', '')}")
    return 0
