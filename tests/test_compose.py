"""Unit tests of the send path's pure parts: address parsing, X-Mailgun-* header options,
MIME composition and per-recipient rendering (core.compose, core.options, core.render)."""
from __future__ import annotations

import binascii
import email
import email.parser
import random
import time
from email import policy

import pytest

from mailplat.core import compose, options, render
from mailplat.core.compose import Attachment
from mailplat.errors import InputError
from mailplat.store.models import Message


# -- addresses ---------------------------------------------------------------------------------
def test_address_lists_with_display_names_and_commas():
    addrs = compose.parse_addresses(['a@x.test, "Lee, Alex" <alex@X.Test>', "B <b@x.test>"], "to")
    assert [(a.display, a.address) for a in addrs] == [
        ("", "a@x.test"), ("Lee, Alex", "alex@x.test"), ("B", "b@x.test")]
    assert addrs[1].formatted() == '"Lee, Alex" <alex@x.test>'


@pytest.mark.parametrize("bad", ["not-an-address", "a@", "@b.test", "a@b@c.test", "a b@x.test",
                                 "a@x", "a@-x.test", "Bob <a@x.test> junk", "a@x.test;b@x.test",
                                 "müller@x.test", "x@[1.2.3.4]"])
def test_bad_addresses_are_refused_with_mailguns_wording(bad):
    with pytest.raises(InputError) as exc:
        compose.parse_addresses([bad], "to")
    assert exc.value.message == "to parameter is not a valid address. please check documentation"


def test_unique_recipients_ignores_case_of_repeats():
    addrs = compose.parse_addresses(["a@x.test, A@X.TEST, b@x.test"], "to")
    assert compose.unique_recipients(addrs) == ["a@x.test", "b@x.test"]


@pytest.mark.parametrize("value", ["a\r\nBcc: evil@x.test", "a\nb", "a\rb", "a\x00b"])
def test_line_breaks_and_nul_never_reach_a_header(value):
    with pytest.raises(InputError):
        compose.check_header_value("subject", value)
    with pytest.raises(InputError):
        compose.parse_addresses([f"x@y.test, {value}"], "to")


# -- X-Mailgun-* headers ---------------------------------------------------------------------------
def test_x_mailgun_headers_are_read_and_stripped_byte_for_byte():
    raw = (b"From: a@x.test\r\nX-Mailgun-Tag: t1\r\nx-mailgun-tag: t2\r\n"
           b"X-Mailgun-Variables: {\"a\":\r\n 1}\r\nSubject: hi\r\nX-Mailgun-Variables: {\"b\": \"c\"}\r\n"
           b"X-Mailgun-Campaign-Id: spring\r\nX-Mailgun-Dkim: no\r\nX-Mailgun-Track: yes\r\n"
           b"X-Mailgun-Track-Clicks: htmlonly\r\nX-Mailgun-Track-Opens: no\r\n"
           b"X-Mailgun-Require-TLS: yes\r\nX-Mailgun-Skip-Verification: no\r\n"
           b"X-Mailgun-Drop-Message: yes\r\nX-Other: keep\r\n\r\nbody\r\nX-Mailgun-Tag: in-body\r\n")
    opts, user_vars, out = options.from_headers(raw)
    assert out == (b"From: a@x.test\r\nSubject: hi\r\nX-Other: keep\r\n\r\nbody\r\n"
                   b"X-Mailgun-Tag: in-body\r\n")
    assert opts.tags == ["t1", "t2"] and opts.campaigns == ["spring"]
    assert user_vars == {"a": 1, "b": "c"}
    assert (opts.dkim, opts.tracking, opts.tracking_clicks, opts.tracking_opens) == (False, True, "htmlonly", False)
    assert (opts.require_tls, opts.skip_verification) == (True, False)
    assert opts.testmode and opts.as_stored()["testmode"] is True


def test_message_without_mailgun_headers_is_untouched():
    raw = b"From: a@x.test\nSubject: x\n\nbody"
    opts, user_vars, out = options.from_headers(raw)
    assert out is raw and opts == options.Options() and user_vars == {}


def test_deliver_by_header_schedules_and_past_means_now():
    now = time.time()
    future = email.utils.formatdate(now + 3600, usegmt=True)
    opts, _, _ = options.from_headers(f"X-Mailgun-Deliver-By: {future}\r\n\r\nx".encode(), now=now)
    assert abs(opts.deliver_at - (int(now) + 3600)) < 1.0
    opts, _, _ = options.from_headers(b"X-Mailgun-Deliver-By: Fri, 25 Oct 2011 23:10:10 -0000\r\n\r\nx", now=now)
    assert opts.deliver_at == now


@pytest.mark.parametrize("header", [b"X-Mailgun-Variables: not json", b"X-Mailgun-Variables: [1]",
                                    b"X-Mailgun-Dkim: maybe", b"X-Mailgun-Deliver-By: someday",
                                    b"X-Mailgun-Track-Clicks: sometimes"])
def test_bad_option_headers_are_input_errors(header):
    with pytest.raises(InputError):
        options.from_headers(header + b"\r\n\r\nx")


def test_option_limits():
    opts = options.Options()
    for t in ("a", "b", "c"):
        options.apply(opts, {}, "o:tag", t)
    options.apply(opts, {}, "o:tag", "A")  # same tag, case-insensitively: not a fourth
    with pytest.raises(InputError):
        options.apply(opts, {}, "o:tag", "d")
    with pytest.raises(InputError):
        options.apply(options.Options(), {}, "o:tag", "x" * 129)
    with pytest.raises(InputError):
        options.check_variables_size({"v": "x" * 5000})
    with pytest.raises(InputError):
        options.delivery_time(str(time.time() + 30 * 86400))


# -- composition ------------------------------------------------------------------------------------
def _compose(**kw):
    args = dict(from_="Sender <s@ex.test>", to=compose.parse_addresses(["a@x.test"], "to"), cc=[],
                subject="Hi", text="plain", html=None, amp_html=None, attachments=[], inline=[],
                headers=[], message_id="id1@ex.test", date=time.time())
    args.update(kw)
    return email.message_from_bytes(compose.compose(**args), policy=policy.default)


def test_compose_alternative_related_and_mixed():
    msg = _compose(html='<img src="cid:logo.png">', amp_html="<html amp4email></html>",
                   attachments=[Attachment("report.txt", None, b"numbers"),
                                Attachment("data.bin", None, b"\x00\x01")],
                   inline=[Attachment("logo.png", None, b"\x89PNG....")],
                   headers=[("Reply-To", "r@x.test")])
    assert msg.get_content_type() == "multipart/mixed"
    assert msg["Message-Id"] == "<id1@ex.test>" and msg["Reply-To"] == "r@x.test"
    alt = next(msg.iter_parts())
    assert alt.get_content_type() == "multipart/alternative"
    kinds = [p.get_content_type() for p in alt.iter_parts()]
    assert kinds == ["text/plain", "text/x-amp-html", "multipart/related"]
    related = list(alt.iter_parts())[2]
    html, logo = list(related.iter_parts())
    assert html.get_content_type() == "text/html"
    assert logo["Content-ID"] == "<logo.png>" and logo.get_content_type() == "image/png"
    atts = list(msg.iter_attachments())
    assert [(a.get_filename(), a.get_content_type()) for a in atts] == [
        ("report.txt", "text/plain"), ("data.bin", "application/octet-stream")]
    assert atts[1].get_content() == b"\x00\x01"


def test_compose_html_only_with_inline():
    msg = _compose(text=None, html="<p>x</p>", inline=[Attachment("logo", "image/gif", b"GIF89a")])
    assert msg.get_content_type() == "multipart/related"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/html", "image/gif"]
    assert list(msg.iter_parts())[1]["Content-ID"] == "<logo>"


def test_complete_mime_adds_only_missing_ids():
    raw = b"From: a@ex.test\r\nSubject: x\r\n\r\nbody\r\n"
    out, mid, _ = compose.complete_mime(raw, "ex.test", time.time())
    assert out.endswith(raw) and out.startswith(b"Message-Id: <") and mid.endswith("@ex.test")
    assert b"\r\nDate: " in out or out.split(b"\r\n")[1].startswith(b"Date: ")
    raw2 = b"Message-ID: <own@x.test>\nDate: Thu, 01 Jan 2026 00:00:00 +0000\nSubject: y\n\nb"
    out2, mid2, _ = compose.complete_mime(raw2, "ex.test", time.time())
    assert out2 == raw2 and mid2 == "own@x.test"



# Header blocks read_headers takes without the parser (ASCII, CRLF, plain fields) and blocks
# it leaves to the parser (envelope lines, bare LF, leading continuation, non-fields, 8-bit).
HEADER_BLOCKS = [
    b"From: A <a@ex.test>\r\nTo: b@ex.test,\r\n\tc@ex.test\r\nSubject:\r\n  folded\r\n",
    b"Subject: \t \r\nX-Empty:\r\nMessage-Id: <m@x>\r\nmessage-id: <n@x>\r\nX-A: b: c \r\n",
    b"From sender@ex.test Thu Nov 26 00:00:00 2026\r\nFrom: a@ex.test\r\n",
    b"From: a@ex.test\r\nFrom b@ex.test\r\nTo: c@ex.test\r\n",
    b" leading: continuation\r\nFrom: a@ex.test\r\n",
    b"From: a@ex.test\r\nnot a field\r\nTo: b@ex.test\r\n",
    b"From: a@ex.test\nTo: b@ex.test\r\n",
    b":no name\r\nFrom: a@ex.test\r\n",
    b"From : a@ex.test\r\nSubject: caf\xc3\xa9\r\n",
]


@pytest.mark.parametrize("block", HEADER_BLOCKS)
def test_read_headers_is_the_parsers_message(block):
    raw = block + b"\r\nbody\r\nFrom: not@header.test\r\n"
    want = email.parser.BytesHeaderParser(policy=policy.compat32).parsebytes(block + b"\r\n")
    got = compose.read_headers(raw)
    assert got._headers == want._headers and got.get_payload() == want.get_payload()
    assert got.get_unixfrom() == want.get_unixfrom()
    assert [type(d) for d in got.defects] == [type(d) for d in want.defects]
    assert [compose.decoded(got, n) for n in ("From", "To", "Subject")] == \
        [compose.decoded(want, n) for n in ("From", "To", "Subject")]


def test_header_items_splits_only_plain_blocks():
    assert compose.header_items(HEADER_BLOCKS[0]) == [
        (b"From", b"A <a@ex.test>"), (b"To", b"b@ex.test,\r\n\tc@ex.test"), (b"Subject", b"\r\n  folded")]
    assert [compose.header_items(b) for b in HEADER_BLOCKS[2:8]] == [None] * 6


# -- rendering ---------------------------------------------------------------------------------------
def _batch_message(rv):
    raw = compose.compose(
        from_="s@ex.test", to=compose.parse_addresses(["Alice Liddell <a@x.test>, b@x.test"], "to"), cc=[],
        subject="Hi %recipient.name%", text="Hello %recipient.name%, you are %recipient%. %tag_unsubscribe_email%",
        html="<p>Hi %recipient.name% %unsubscribe_url% %recipient.missing%</p>", amp_html=None,
        attachments=[Attachment("notes.txt", "text/plain", b"keep %recipient.name% literally")], inline=[],
        headers=[("List-Unsubscribe", "<mailto:u+%recipient.id%@ex.test>")], message_id="b1@ex.test",
        date=time.time())
    return Message(recipient_variables=rv), raw


def test_render_substitutes_per_recipient():
    row, raw = _batch_message({"a@x.test": {"name": "Alice", "id": 7}, "b@x.test": {"name": "Bob", "id": 8}})
    a = email.message_from_bytes(render.for_recipient(row, raw, "a@x.test"), policy=policy.default)
    b = email.message_from_bytes(render.for_recipient(row, raw, "b@x.test"), policy=policy.default)
    assert a["To"] == "Alice Liddell <a@x.test>" and b["To"] == "b@x.test"
    assert a["Subject"] == "Hi Alice" and b["Subject"] == "Hi Bob"
    assert a["List-Unsubscribe"] == "<mailto:u+7@ex.test>"
    assert a["Message-Id"] == "<b1@ex.test>"
    text_a = a.get_body(("plain",)).get_content()
    assert text_a.strip() == "Hello Alice, you are Alice Liddell <a@x.test>."
    html_b = b.get_body(("html",)).get_content()
    assert "Hi Bob" in html_b and "%" not in html_b
    att = next(a.iter_attachments())
    assert att.get_payload(decode=True) == b"keep %recipient.name% literally"


def test_render_without_recipient_variables_is_byte_for_byte():
    row, raw = _batch_message({})
    assert render.for_recipient(row, raw, "a@x.test") is raw


def test_compose_non_ascii_and_long_lines_round_trip():
    long_line = "word " * 400  # one 2,000-character line: must be encoded, never cut
    msg = _compose(from_="Jöhn Dœ <j@ex.test>", to=compose.parse_addresses(["Zoë <z@bücher.example>"], "to"),
                   subject="Grüße, " + "ü" * 100, text="Grüße\n" + long_line, html="<p>ñ</p>",
                   attachments=[Attachment("répört.txt", None, "ünïcode".encode())],
                   headers=[("X-Note", "naïve"), ("X-Long", "v " * 600)])
    raw = msg.as_bytes()
    assert raw.isascii() and max(len(l) for l in raw.split(b"\n")) <= 998
    assert str(msg["From"]) == "Jöhn Dœ <j@ex.test>"
    assert msg["To"].addresses[0].addr_spec == "z@xn--bcher-kva.example"
    assert msg["Subject"] == "Grüße, " + "ü" * 100
    assert msg["X-Note"] == "naïve" and msg["X-Long"].split() == ["v"] * 600
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == "Grüße\n" + long_line
    att = next(msg.iter_attachments())
    assert att.get_filename() == "répört.txt" and att.get_payload(decode=True) == "ünïcode".encode()


def test_long_ascii_lines_are_quoted_printable_exactly_as_binascii_encodes_them():
    """Long ASCII lines take a fast path (soft breaks only); its bytes must be b2a_qp's, also
    around what b2a_qp encodes (=, a trailing space, a lone dot, tabs, controls, DEL)."""
    def expected(text: str) -> bytes:
        data = text.replace("\r\n", "\n").replace("\r", "\n")
        body = binascii.b2a_qp(data.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
        return body if body.endswith(b"\r\n") else body + b"\r\n"

    rnd = random.Random(7)
    alphabet = ["a", "Z", "~", "!", " ", ".", "\n", "=", "\t", "\x7f", "\x01", "\r"]
    fast = 0
    for _ in range(3000):
        rare = rnd.choice([0, 0, 0.01, 0.1])  # the characters b2a_qp encodes: none in half the texts
        weights = [30, 30, 5, 5, 5, 2, 1, rare, rare, rare, rare, rare]
        n = rnd.choice([999, 1000, 1051, 1052, 1053, 1127, 1128, rnd.randrange(999, 4000)])
        text = "".join(rnd.choices(alphabet, weights, k=n))
        long = "x" * rnd.randrange(999, 1100)  # at least one line over 998: never 7bit
        text = long + "\n" + text if rnd.random() < 0.5 else text + "\n" + long
        part = compose._text_part(text, "plain")
        head, body = part.split(b"\r\n\r\n", 1)
        assert head.endswith(b"quoted-printable")
        assert body == expected(text), text
        fast += compose._soft_broken(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")) is not None
    assert fast > 300  # the fast path was exercised, not only the fallback
    assert compose._soft_broken(["x" * 1000 + " "]) is None and compose._soft_broken(["a=b" * 400]) is None


def test_render_non_ascii_values_and_encoded_subject():
    raw = compose.compose(
        from_="s@ex.test", to=compose.parse_addresses(["z@x.test"], "to"), cc=[],
        subject="Grüße %recipient.name%", text="Hallo %recipient.name%\n" + "lang " * 300,
        html=None, amp_html=None, attachments=[], inline=[], headers=[], message_id="n1@ex.test",
        date=time.time())
    assert b"%recipient.name%" not in raw.split(b"\r\n\r\n")[0]  # hidden inside an encoded word
    out = render.for_recipient(Message(recipient_variables={"z@x.test": {"name": "Zoë"}}), raw, "z@x.test")
    assert out.isascii()
    msg = email.message_from_bytes(out, policy=policy.default)
    assert msg["Subject"] == "Grüße Zoë" and msg["To"] == "z@x.test"
    assert msg.get_content().replace("\r\n", "\n") == "Hallo Zoë\n" + "lang " * 300 + "\n"
    assert msg["Date"].endswith("+0000")


@pytest.mark.parametrize("given, expected", [
    (None, "image/png"), ("", "image/png"), ("image/gif", "image/gif"), ("IMAGE/GIF; x=1", "image/gif"),
    ('text/plain"; evil="', "image/png"), ("nonsense", "image/png"), ("multipart/../x", "image/png"),
    ("multipart/mixed", "application/octet-stream"), ("message/rfc822", "application/octet-stream")])
def test_part_content_type_is_taken_only_when_well_formed(given, expected):
    assert "/".join(compose.guess_type("logo.png", given)) == expected
    assert "/".join(compose.guess_type("no-extension", None)) == "application/octet-stream"
