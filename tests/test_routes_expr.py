"""Route expressions and actions without a server: parsing (with errors that say where),
evaluation with captures, the priority waterfall (catch_all, stop()), the regex time budget,
the egress guard's address rules and the signing key's HMAC."""
from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from mailplat.core import egress, routes, signing
from mailplat.errors import InputError


def route(rid, expression, *actions, priority=0):
    return {"id": rid, "priority": priority, "expression": expression, "actions": list(actions)}


def test_parse_filters_and_and():
    e = routes.parse_expression('match_recipient("(.*)@bar.test") and match_header(\'Subject\', ".*support")')
    assert [f.kind for f in e.filters] == ["recipient", "header"]
    assert e.filters[1].header == "Subject"
    assert routes.parse_expression("catch_all()").catch_all


@pytest.mark.parametrize("text, where", [
    ('match_recipient("(")', "position 16"),
    ('match_recipient("a") or catch_all()', "position 21"),
    ("frobnicate()", "unknown filter"),
    ("match_recipient(a)", "quoted pattern"),
    ("catch_all(", "found the end"),
    ("", "empty"),
    ('match_header("Sub ject", "x")', "bad header name"),
    ('match_recipient("' + "a" * 1200 + '")', "longer than"),
])
def test_invalid_expressions_say_where(text, where):
    with pytest.raises(InputError) as exc:
        routes.parse_expression(text)
    assert where in exc.value.message


@pytest.mark.parametrize("text, where", [
    ('forward("http://127.0.0.1/x")', "private"),
    ('forward("http://169.254.169.254/latest")', "private"),
    ('forward("http://localhost:8080/")', "internal"),
    ('forward("nope")', "neither a URL nor an address"),
    ('forward("ftp://example.com/")', "only http"),
    ('store(notify="ftp://x")', "http or https"),
    ("stop", "expected '('"),
    ('forward("a@b.test") x', "end of the action"),
    ("explode()", "unknown action"),
])
def test_invalid_actions_say_where(text, where):
    with pytest.raises(InputError) as exc:
        routes.parse_action(text)
    assert where in exc.value.message


def test_private_targets_allowed_when_configured():
    assert routes.parse_action('forward("http://127.0.0.1:9/x")', allow_private=True).destinations == ("http://127.0.0.1:9/x",)
    a = routes.parse_action('forward("https://hooks.example.com/in, bob@x.test")')
    assert a.destinations == ("https://hooks.example.com/in", "bob@x.test")
    assert routes.parse_action('store(notify="https://n.example.com/s")').notify == "https://n.example.com/s"
    assert routes.parse_action("store()").notify == ""


def test_captures_positional_and_named():
    steps = routes.plan([route("r1", r'match_recipient("(?P<user>.*?)@(?P<domain>.*)")',
                               r'forward("http://h.example.com/domains/\g<domain>/users/\g<user>?m=\1")',
                               r'forward("\1@elsewhere.test")')],
                        "bob@bar.test", [])
    assert [(s.kind, s.target) for s in steps] == [
        ("forward_url", "http://h.example.com/domains/bar.test/users/bob?m=bob"),
        ("forward_address", "bob@elsewhere.test")]


def test_capture_in_url_is_quoted():
    steps = routes.plan([route("r", r'match_header("Subject", "(.*)")', r'forward("http://h.example.com/?s=\1")')],
                        "a@b.test", [("Subject", "a&b=c /x")])
    assert steps[0].target == "http://h.example.com/?s=a%26b%3Dc%20%2Fx"


def test_waterfall_priority_stop_and_catch_all():
    table = [
        route("support", 'match_header("Subject", ".*support")', 'forward("http://s.example.com/")'),
        route("bob", 'match_recipient("bob@x.test")', 'forward("http://b.example.com/")', "stop()"),
        route("late", 'match_recipient(".*@x.test")', 'forward("http://late.example.com/")'),
        route("rest", "catch_all()", 'forward("http://all.example.com/")'),
    ]
    def targets(rcpt, subject=""):
        return [s.target for s in routes.plan(table, rcpt, [("Subject", subject)])]
    # support and bob both match; bob stops the waterfall.
    assert targets("bob@x.test", "need support") == ["http://s.example.com/", "http://b.example.com/"]
    # no stop: later routes run too, but catch_all does not (something matched before it).
    assert targets("carol@x.test") == ["http://late.example.com/"]
    # nothing matched: catch_all takes it.
    assert targets("dan@y.test") == ["http://all.example.com/"]


def test_recipient_match_is_case_insensitive_and_anchored():
    e = routes.parse_expression('match_recipient("bob@x.test")')
    assert routes.evaluate(e, "BOB@X.TEST".lower(), [], False) is not None
    assert routes.evaluate(e, "notbob@x.test", [], False) is None


def test_hostile_regex_is_cut_off():
    e = routes.parse_expression('match_recipient("(a+)+$")')
    start = time.monotonic()
    assert routes.evaluate(e, "a" * 64 + "!", [], False) is None
    assert time.monotonic() - start < 2.0


def test_egress_address_rules():
    for ip in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "::1",
               "fe80::1", "::ffff:127.0.0.1", "100.64.0.1", "0.0.0.0", "fd00::1"):
        assert not egress.address_allowed(ip, False), ip
    assert egress.address_allowed("93.184.216.34", False)
    assert egress.address_allowed("127.0.0.1", True)
    assert not egress.address_allowed("0.0.0.0", True)


def test_signature_is_hmac_sha256_of_timestamp_and_token():
    sig = signing.new_signature("key-abc", 1700000000)
    assert sig["timestamp"] == "1700000000" and len(sig["token"]) == 50
    expected = hmac.new(b"key-abc", (sig["timestamp"] + sig["token"]).encode(), hashlib.sha256).hexdigest()
    assert sig["signature"] == expected
    assert signing.verify("key-abc", sig["timestamp"], sig["token"], sig["signature"])
    assert not signing.verify("key-abd", sig["timestamp"], sig["token"], sig["signature"])
