"""Open, click and unsubscribe tracking end to end over real sockets: HTML mail sent through the
API is relayed to a loopback MX with the pixel and rewritten links on the domain's tracking host;
fetching them over HTTP on the api port (with that Host header) records opened / clicked /
unsubscribed events, posts the webhooks (which django-anymail's Mailgun tracking view accepts),
and the unsubscribed address is dropped afterwards.  Bad tokens are 404s; text-only mail gets
no pixel; o:tracking=no and o:tracking-clicks=htmlonly are honoured."""
from __future__ import annotations

import base64
import email
import json
import re
import uuid
from email import policy

import pytest
import requests

from tests.conftest import dns_sets
from tests.relaytest import create_domain, point_mx
from tests.smtpsink import SmtpSink, free_port
from tests.support import start_server, wait_for
from tests.webhookrecv import HookReceiver

pytestmark = pytest.mark.timeout(180)
LINK = "https://example.org/page?a=1&b=2"


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    tmp = tmp_path_factory.mktemp("tracking")
    port = free_port()
    sets = dns_sets(dns_server) + ["relay.allow_private_mx=true", f"relay.remote_port={port}",
                                   "relay.retry_schedule=0.5", "hooks.allow_private_targets=true",
                                   "tracking.webhook_retry_schedule=0.2"]
    server = start_server(tmp / "data", sets=sets)
    sink = SmtpSink(host="127.0.0.41", port=port).start()
    rec = HookReceiver()
    dom = f"t{uuid.uuid4().hex[:8]}.example.test"
    create_domain(server, dns_server, dom)
    rdom = f"r{uuid.uuid4().hex[:8]}.example.test"
    point_mx(dns_server, rdom, "127.0.0.41")
    for kind, data in (("open", {"active": "yes"}), ("click", {"active": "yes"}),
                       ("unsubscribe", {"active": "yes", "html_footer": '<p><a href="%unsubscribe_url%">Stop</a></p>',
                                        "text_footer": "Stop: %unsubscribe_url%"})):
        r = server.api("PUT", f"/v3/domains/{dom}/tracking/{kind}", data=data)
        assert r.status_code == 200, r.text
    for hook in ("opened", "clicked", "unsubscribe", "delivered"):
        r = server.api("POST", f"/v3/domains/{dom}/webhooks", data={"id": hook, "url": rec.url(f"/{hook}", "hook:secret")})
        assert r.status_code == 200, r.text
    yield {"server": server, "sink": sink, "rec": rec, "dom": dom, "rdom": rdom}
    server.stop()
    sink.stop()
    rec.close()


def send(env, rcpt, html=None, text="Plain part " + LINK + "\n", **extra):
    data = {"from": f"News <news@{env['dom']}>", "to": rcpt, "subject": "Tracked", "text": text, **extra}
    if html is not None:
        data["html"] = html
    r = env["server"].api("POST", f"/v3/{env['dom']}/messages", data=data)
    assert r.status_code == 200, r.text
    return r.json()["id"].strip("<>")


def received(env, rcpt):
    got = wait_for(lambda: env["sink"].to(rcpt), timeout=30, what=f"delivery to {rcpt}")[0]
    msg = email.message_from_bytes(got.data, policy=policy.default)
    parts = {p.get_content_type(): p.get_content() for p in msg.walk() if not p.is_multipart()}
    return msg, parts


def fetch(env, url, method="GET", ua="Mozilla/5.0 (Windows NT 10.0) Thunderbird/115.0"):
    """GET a tracking URL the way a mail client would: to the api port, Host = the tracking host."""
    m = re.match(r"^http://([^/]+)(/.*)$", url)
    assert m, url
    host, path = m.groups()
    return requests.request(method, env["server"].url + path, headers={"Host": host, "User-Agent": ua},
                            allow_redirects=False, timeout=10)


def events(env, **params):
    r = env["server"].api("GET", f"/v3/{env['dom']}/events", params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_open_click_unsubscribe_end_to_end(env):
    rcpt = f"reader@{env['rdom']}"
    html = f'<html><body><p>Hi</p><a href="{LINK.replace("&", "&amp;")}">Read</a> <a href="mailto:x@y.test">m</a></body></html>'
    mid = send(env, rcpt, html=html, **{"o:tag": "news"})
    msg, parts = received(env, rcpt)
    host = f"http://email.{env['dom']}"
    body_html, body_text = parts["text/html"], parts["text/plain"]
    pixel = re.search(r'<img[^>]+src="([^"]+)"', body_html).group(1)
    assert pixel.startswith(host + "/o/")
    click = re.search(r'<a href="([^"]+)">Read</a>', body_html).group(1).replace("&amp;", "&")
    assert click.startswith(host + "/c/") and LINK not in body_html
    assert 'href="mailto:x@y.test"' in body_html
    unsub = re.search(r'<a href="([^"]+)">Stop</a>', body_html).group(1)
    assert unsub.startswith(host + "/u/")
    assert re.search(r"Stop: " + re.escape(host) + r"/u/\S+", body_text)
    assert "%unsubscribe_url%" not in body_html + body_text
    assert msg["To"] == rcpt

    r = fetch(env, pixel)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png" and r.content[:4] == b"\x89PNG"
    r = fetch(env, click)
    assert r.status_code == 302 and r.headers["Location"] == LINK
    opened = wait_for(lambda: events(env, event="opened", recipient=rcpt), what="opened event")[0]
    assert opened["ip"] == "127.0.0.1" and opened["client-info"]["user-agent"].endswith("Thunderbird/115.0")
    assert opened["client-info"]["bot"] == "" and opened["message"]["headers"]["message-id"] == mid
    clicked = events(env, event="clicked", recipient=rcpt)[0]
    assert clicked["url"] == LINK and clicked["tags"] == ["news"]

    # A proxy that prefetches images is flagged as a bot.
    fetch(env, pixel, ua="Mozilla/5.0 (via ggpht.com GoogleImageProxy)")
    bot = wait_for(lambda: [e for e in events(env, event="opened", recipient=rcpt) if e["client-info"]["bot"]],
                   what="bot open")[0]
    assert bot["client-info"]["bot"] == "gmail" and bot["flags"]["is-bot"] is True

    # A link scanner's GET of the unsubscribe link unsubscribes nobody.
    r = fetch(env, unsub, ua="Barracuda link scanner")
    assert r.status_code == 200 and "<form" in r.text
    assert env["server"].api("GET", f"/v3/{env['dom']}/unsubscribes/{rcpt}").status_code == 404
    r = fetch(env, unsub)
    assert r.status_code == 200 and "unsubscribed" in r.text
    got = env["server"].api("GET", f"/v3/{env['dom']}/unsubscribes/{rcpt}").json()
    assert got["tags"] == ["*"]
    assert events(env, event="unsubscribed", recipient=rcpt)

    # Webhooks for each, with Basic auth from the URL's userinfo.
    rec = env["rec"]
    for path in ("/opened", "/clicked", "/unsubscribe", "/delivered"):
        post = wait_for(lambda: rec.to(path), timeout=20, what=f"webhook {path}")[0]
        assert post["headers"]["Authorization"] == "Basic " + base64.b64encode(b"hook:secret").decode()
    assert json.loads(rec.to("/clicked")[0]["body"])["event-data"]["url"] == LINK

    # django-anymail's Mailgun tracking view verifies and parses our posts.
    key = env["server"].api("GET", "/v5/accounts/http_signing_key").json()["http_signing_key"]
    # Two opens were posted (the reader's and the image proxy's), in either order: take the reader's.
    human_open = wait_for(lambda: [p for p in rec.to("/opened") if b"Thunderbird/115.0" in p["body"]],
                          timeout=20, what="the reader's open webhook")[0]
    parsed = anymail_parse(key, [human_open] + [rec.to(p)[0] for p in ("/clicked", "/unsubscribe", "/delivered")])
    assert [e.event_type for e in parsed] == ["opened", "clicked", "unsubscribed", "delivered"]
    assert all(e.recipient == rcpt and e.message_id == f"<{mid}>" for e in parsed)
    assert parsed[1].click_url == LINK and parsed[0].user_agent.endswith("Thunderbird/115.0")

    # The unsubscribed address is dropped from now on.
    mid2 = send(env, rcpt, html="<p>again</p>")
    dropped = wait_for(lambda: events(env, event="failed", **{"message-id": mid2}), what="drop")[0]
    assert dropped["reason"] == "suppress-unsubscribe" and dropped["delivery-status"]["code"] == 606


def anymail_parse(key, posts):
    from django.conf import settings
    if not settings.configured:
        settings.configure(DEBUG=False, SECRET_KEY="t", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
                           INSTALLED_APPS=["anymail"], ANYMAIL={})
        import django
        django.setup()
    settings.ANYMAIL = {"MAILGUN_WEBHOOK_SIGNING_KEY": key, "WEBHOOK_SECRET": "hook:secret"}
    from anymail.exceptions import AnymailWebhookValidationFailure
    from anymail.signals import tracking
    from anymail.webhooks.mailgun import MailgunTrackingWebhookView
    from django.test import RequestFactory
    seen = []

    def handler(sender, event, esp_name, **kw):
        seen.append(event)
    tracking.connect(handler, weak=False)
    try:
        for post in posts:
            req = RequestFactory().generic("POST", "/anymail/mailgun/tracking/", data=post["body"],
                                           content_type=post["headers"]["Content-Type"],
                                           HTTP_AUTHORIZATION=post["headers"]["Authorization"])
            assert MailgunTrackingWebhookView.as_view()(req).status_code == 200
        forged = json.loads(posts[0]["body"])
        forged["signature"]["signature"] = "0" * 64
        req = RequestFactory().generic("POST", "/anymail/mailgun/tracking/", data=json.dumps(forged),
                                       content_type="application/json",
                                       HTTP_AUTHORIZATION=posts[0]["headers"]["Authorization"])
        with pytest.raises(AnymailWebhookValidationFailure):
            MailgunTrackingWebhookView.as_view()(req)
    finally:
        tracking.disconnect(handler)
    return seen


urlpatterns: list = []


def test_bad_tokens_are_404(env):
    for path in ("/o/x", "/c/" + "A" * 80, "/u/%00%ff", "/c/" + "B" * 5000):
        r = requests.get(env["server"].url + path, timeout=10, allow_redirects=False)
        assert r.status_code == 404, path
    rcpt = f"tamper@{env['rdom']}"
    send(env, rcpt, html=f'<a href="{LINK}">x</a>')
    _, parts = received(env, rcpt)
    click = re.search(r'href="([^"]+)"', parts["text/html"]).group(1)
    token = click.rsplit("/", 1)[1]
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert fetch(env, click.rsplit("/", 1)[0] + "/" + flipped).status_code == 404
    # An open token does not work as a click token.
    pixel = re.search(r'<img[^>]+src="([^"]+)"', parts["text/html"]).group(1)
    assert fetch(env, pixel.replace("/o/", "/c/")).status_code == 404


def test_text_only_and_per_message_switches(env):
    plain = f"plain@{env['rdom']}"
    send(env, plain, text="Only text " + LINK + "\n")
    _, parts = received(env, plain)
    assert list(parts) == ["text/plain"] and "/o/" not in parts["text/plain"]
    assert f"http://email.{env['dom']}/c/" in parts["text/plain"]  # domain click tracking: yes
    off = f"off@{env['rdom']}"
    send(env, off, html=f'<a href="{LINK}">x</a>', **{"o:tracking": "no"})
    _, parts = received(env, off)
    assert LINK in parts["text/html"] and "<img" not in parts["text/html"]
    assert "Stop:" not in parts["text/plain"]
    html_only = f"htmlonly@{env['rdom']}"
    send(env, html_only, html=f'<a href="{LINK}">x</a>', **{"o:tracking-clicks": "htmlonly", "o:tracking-opens": "no"})
    _, parts = received(env, html_only)
    assert LINK in parts["text/plain"] and LINK not in parts["text/html"] and "<img" not in parts["text/html"]


def test_tag_unsubscribe_link(env):
    rcpt = f"tagged@{env['rdom']}"
    send(env, rcpt, text="Leave the digest: %tag_unsubscribe_url%\n", **{"o:tag": ["digest", "weekly"],
                                                                            "o:tracking-clicks": "no"})
    _, parts = received(env, rcpt)
    link = re.search(r"Leave the digest: (\S+)", parts["text/plain"]).group(1)
    assert link.startswith(f"http://email.{env['dom']}/u/")
    assert fetch(env, link, method="POST").status_code == 200  # RFC 8058 one-click
    got = env["server"].api("GET", f"/v3/{env['dom']}/unsubscribes/{rcpt}").json()
    assert sorted(got["tags"]) == ["digest", "weekly"]
    mid = send(env, rcpt, text="more", **{"o:tag": "digest"})
    dropped = wait_for(lambda: events(env, event="failed", **{"message-id": mid}), what="tag drop")[0]
    assert dropped["reason"] == "suppress-unsubscribe"
    other = f"other-{uuid.uuid4().hex[:6]}"
    send(env, rcpt, text=other, **{"o:tag": "announcements"})
    wait_for(lambda: [m for m in env["sink"].to(rcpt) if other.encode() in m.data], timeout=30,
             what="mail with another tag delivered")


def test_campaign_stats_count_unique_opens_and_clicks(env):
    """The legacy campaign stats in the seed's shape: totals from the counters, `unique` from
    the opens and clicks (one reader opening twice is two opens, one unique opener)."""
    server, dom = env["server"], env["dom"]
    cid = f"c{uuid.uuid4().hex[:8]}"
    assert server.api("POST", f"/v3/{dom}/campaigns", data={"name": "Autumn", "id": cid}).status_code == 200
    readers = [f"camp{i}@{env['rdom']}" for i in range(2)]
    for rcpt in readers:
        send(env, rcpt, html=f'<p>Hi</p><a href="{LINK}">Read</a>', **{"o:campaign": cid})
    for n, rcpt in enumerate(readers):
        _, parts = received(env, rcpt)
        pixel = re.search(r'<img[^>]+src="([^"]+)"', parts["text/html"]).group(1)
        for _ in range(2 - n):  # the first reader opens twice
            assert fetch(env, pixel).status_code == 200
        click = re.search(r'<a href="([^"]+)">Read</a>', parts["text/html"]).group(1).replace("&amp;", "&")
        assert fetch(env, click).status_code == 302

    def stats(**params):
        r = server.api("GET", f"/v3/{dom}/campaigns/{cid}/stats", params=params)
        assert r.status_code == 200, r.text
        return r.json()
    whole = wait_for(lambda: (lambda s: s if s["total"]["clicked"] == 2 and s["total"]["delivered"] == 2 else None)(stats()),
                     timeout=30, what="campaign counters")
    assert whole["total"] == {"delivered": 2, "opened": 3, "clicked": 2, "unsubscribed": 0, "complained": 0,
                              "bounced": 0}
    assert whole["unique"] == {"opened": {"recipient": 2}, "clicked": {"recipient": 2, "link": 1}}
    hourly = stats(groupby="daily_hour")
    assert all(0 <= h["daily_hour"] <= 23 for h in hourly)
    assert sum(h["total"]["opened"] for h in hourly) == 3
    assert sum(h["unique"]["opened"]["recipient"] for h in hourly) >= 2
    by_domain = stats(groupby="domain")
    assert [(d["domain"], d["total"]["opened"], d["unique"]["clicked"]["recipient"]) for d in by_domain] == \
        [(env["rdom"], 3, 2)]
    assert server.api("GET", f"/v3/{dom}/campaigns/{cid}/stats", params={"groupby": "month"}).status_code == 400
    history = server.api("GET", f"/v3/{dom}/campaigns/{cid}/events",
                         params={"recipient": readers[1], "event": "opened"}).json()
    assert [(h["event"], h["recipient"], h["domain"]) for h in history] == [("opened", readers[1], dom)]
    assert set(history[0]) == {"timestamp", "user_vars", "domain", "recipient", "tags", "event"}
