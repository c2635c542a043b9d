"""Mailing lists over real sockets: the Lists API (official SDK shapes and paging in the query
string), strict mode and upsert, a 1,000-member members.json upsert, CSV upload, sending to a
list through the HTTP API (one stored body, one queue row per subscribed member, per-member
variables and List-Unsubscribe headers as rendered for each member), the unsubscribe link (GET
and RFC 8058 POST), and inbound posting by access level."""
from __future__ import annotations

import email
import json
import re
import smtplib
import uuid
from email import policy
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from mailplat import config as mconfig
from mailplat.core import render
from mailplat.store import db as storedb
from mailplat.store.models import Message
from tests.conftest import dns_sets
from tests.support import MailplatServer, wait_for
from tests.test_domains_api import store_query
from tests.test_routes import own_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory, dns_server) -> MailplatServer:
    with own_server(tmp_path_factory.mktemp("lists"), dns_sets(dns_server) + [
            "hooks.allow_private_targets=true", "spam.spamd_host=", "api.domains_rate_limit_per_minute=100000"]) as s:
        yield s


@pytest.fixture(scope="module")
def dom(srv) -> str:
    d = f"ls{uuid.uuid4().hex[:8]}.example.test"
    assert srv.api("POST", "/v3/domains", data={"name": d}).status_code == 200
    return d


def new_list(srv, dom, **fields) -> str:
    address = f"list-{uuid.uuid4().hex[:8]}@{dom}"
    r = srv.api("POST", "/v3/lists", data={"address": address, **fields})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Mailing list has been created"
    return address


def test_list_crud_and_errors(srv, dom):
    address = new_list(srv, dom, name="Devs", description="d", access_level="readonly", reply_preference="list")
    got = srv.api("GET", f"/v3/lists/{address.replace('@', '%40')}").json()["list"]
    assert got["address"] == address and got["name"] == "Devs" and got["members_count"] == 0
    assert got["access_level"] == "readonly" and got["reply_preference"] == "list" and got["created_at"]
    r = srv.api("PUT", f"/v3/lists/{address}", data={"description": "d2", "access_level": "members"})
    assert r.status_code == 200 and r.json()["list"]["description"] == "d2"
    assert r.json()["list"]["access_level"] == "members"
    assert srv.api("POST", "/v3/lists", data={"address": address}).status_code == 400
    assert srv.api("POST", "/v3/lists", data={"address": "not-an-address"}).status_code == 400
    assert srv.api("POST", "/v3/lists", data={"address": f"x@{dom}", "access_level": "world"}).status_code == 400
    assert srv.api("POST", "/v3/lists", data={"address": "x@not-ours.test"}).status_code == 400
    assert srv.api("PUT", f"/v3/lists/{address}", data={"address": "x@not-ours.test"}).status_code == 400
    renamed = address.replace("list-", "renamed-")
    assert srv.api("PUT", f"/v3/lists/{address}", data={"address": renamed}).json()["list"]["address"] == renamed
    address = renamed
    d = srv.api("DELETE", f"/v3/lists/{address}")
    assert d.json() == {"address": address, "message": "Mailing list has been removed"}
    assert srv.api("GET", f"/v3/lists/{address}").status_code == 404


def test_members_strict_upsert_update_delete(srv, dom):
    address = new_list(srv, dom)
    r = srv.api("POST", f"/v3/lists/{address}/members",
                data={"address": "Bob <bob@x.test>", "name": "Bob Bar", "vars": '{"age": 26}', "subscribed": "True"})
    assert r.status_code == 200, r.text
    assert r.json()["member"] == {"address": "bob@x.test", "name": "Bob Bar", "vars": {"age": 26}, "subscribed": True}
    strict = srv.api("POST", f"/v3/lists/{address}/members", data={"address": "bob@x.test"})
    assert strict.status_code == 400 and strict.json()["message"] == "Address already exists"
    up = srv.api("POST", f"/v3/lists/{address}/members", data={"address": "bob@x.test", "name": "Robert", "upsert": "yes"})
    assert up.status_code == 200 and up.json()["member"]["name"] == "Robert"
    assert srv.api("POST", f"/v3/lists/{address}/members", data={"address": "c@x.test", "vars": "[1]"}).status_code == 400
    m = srv.api("PUT", f"/v3/lists/{address.replace('@', '%40')}/members/bob%40x.test", data={"subscribed": "no"})
    assert m.status_code == 200 and m.json()["member"]["subscribed"] is False
    assert srv.api("GET", f"/v3/lists/{address}/members/bob@x.test").json()["member"]["subscribed"] is False
    assert srv.api("GET", f"/v3/lists/{address}/members/ghost@x.test").status_code == 404
    d = srv.api("DELETE", f"/v3/lists/{address}/members/bob@x.test")
    assert d.json() == {"member": {"address": "bob@x.test"}, "message": "Mailing list member has been deleted"}


def test_bulk_upsert_of_1000_members_and_paging(srv, dom):
    address = new_list(srv, dom)
    members = [{"address": f"m{i:04d}@bulk.test", "name": f"First{i} Last{i}", "vars": {"n": i}} for i in range(1000)]
    r = srv.api("POST", f"/v3/lists/{address}/members.json", data={"members": json.dumps(members), "upsert": "True"})
    assert r.status_code == 200, r.text
    assert r.json()["list"]["members_count"] == 1000 and r.json()["message"] and r.json()["task-id"]
    # Again, upserting changed values: still 1,000 members, values replaced.
    for m in members:
        m["vars"] = {"n": m["vars"]["n"] * 2}
    members[5]["subscribed"] = False
    r = srv.api("POST", f"/v3/lists/{address}/members.json", data={"members": json.dumps(members), "upsert": "yes"})
    assert r.json()["list"]["members_count"] == 1000
    assert srv.api("GET", f"/v3/lists/{address}/members/m0007@bulk.test").json()["member"]["vars"] == {"n": 14}
    assert srv.api("GET", f"/v3/lists/{address}/members/m0005@bulk.test").json()["member"]["subscribed"] is False
    too_many = [f"x{i}@bulk.test" for i in range(1001)]
    assert srv.api("POST", f"/v3/lists/{address}/members.json", data={"members": json.dumps(too_many)}).status_code == 400
    # Paging: state in the query string, absolute URLs, advancing to the end.
    page = srv.api("GET", f"/v3/lists/{address}/members/pages", params={"limit": 300}).json()
    seen = [i["address"] for i in page["items"]]
    while True:
        nxt = page["paging"]["next"]
        parts = urlsplit(nxt)
        assert parts.scheme == "http" and parts.netloc
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert q["page"] == "next" and q["limit"] == "300"
        page = srv.api("GET", f"/v3/lists/{address}/members/pages", params=q).json()
        if not page["items"]:
            break
        seen += [i["address"] for i in page["items"]]
    assert seen == sorted(m["address"] for m in members)
    listing = srv.api("GET", f"/v3/lists/{address}/members", params={"limit": 10, "subscribed": "no"}).json()
    assert listing["total_count"] == 1 and listing["items"][0]["address"] == "m0005@bulk.test"
    lists_page = srv.api("GET", "/v3/lists/pages", params={"limit": 1}).json()
    assert len(lists_page["items"]) == 1 and "page=next" in lists_page["paging"]["next"]


def test_csv_upload(srv, dom):
    address = new_list(srv, dom)
    data = b"address,name,vars\r\na@csv.test,Ann A,\"{\"\"k\"\": 1}\"\r\nb@csv.test,Ben B,\r\n"
    r = srv.api("POST", f"/v3/lists/{address}/members.csv", files={"members": ("m.csv", data, "text/csv")})
    assert r.status_code == 200, r.text
    assert r.json()["list"]["members_count"] == 2
    assert srv.api("GET", f"/v3/lists/{address}/members/a@csv.test").json()["member"]["vars"] == {"k": 1}


def test_python_sdk_lists_and_members(srv, dom):
    from mailgun.client import Client
    client = Client(auth=("api", srv.key), api_url=srv.url)
    address = f"sdk-{uuid.uuid4().hex[:6]}@{dom}"
    assert client.lists.create(domain=dom, data={"address": address, "description": "sdk"}).status_code == 200
    r = client.lists_members.create(domain=dom, address=address,
                                    data={"address": "bob@x.test", "name": "Bob", "vars": '{"age": 26}',
                                          "subscribed": True, "upsert": "yes"})
    assert r.status_code == 200, r.text
    assert client.lists_members.get(domain=dom, address=address).json()["total_count"] == 1
    assert client.lists.delete(domain=dom, address=address).status_code == 200


# -- sending to a list ------------------------------------------------------------------------------
def load_message(srv, subject: str) -> tuple[Message, bytes, list[str]]:
    cfg = mconfig.load(data_dir=srv.data_dir, env={}, check_files=False)
    store = storedb.Store(cfg.db_url)
    try:
        with store.sync():
            msg = Message.get(Message.subject == subject)
            from mailplat.store import blobs
            raw = blobs.get_sync(msg.blob)
            rcpts = [q.recipient for q in msg.queue.order_by(msg.queue.model.recipient)]
            return msg, raw, rcpts
    finally:
        store.close()


def test_send_to_list_fans_out_with_member_variables_and_unsubscribe(srv, dom):
    address = new_list(srv, dom, name="News")
    members = [{"address": "ann@fan.test", "name": "Ann Lee", "vars": {"city": "Oslo"}},
               {"address": "ben@fan.test", "name": "Ben Ode", "vars": {"city": "Lima"}},
               {"address": "cat@fan.test", "name": "Cat", "subscribed": False}]
    srv.api("POST", f"/v3/lists/{address}/members.json", data={"members": json.dumps(members), "upsert": "yes"})
    subject = f"news-{uuid.uuid4().hex[:6]}"
    text = ("Hi %recipient_fname% %recipient_lname% from %recipient.city% (%recipient%). "
            "Leave: %mailing_list_unsubscribe_url% or mail %unsubscribe_email%")
    r = srv.api("POST", f"/v3/{dom}/messages", data={"from": f"editor@{dom}", "to": address, "subject": subject,
                                                    "text": text})
    assert r.status_code == 200, r.text
    msg, raw, rcpts = load_message(srv, subject)
    assert rcpts == ["ann@fan.test", "ben@fan.test"]  # the unsubscribed member is skipped
    assert store_query(srv, "select count(*) from message where subject = ?", subject) == [(1,)]  # body stored once
    accepted = store_query(srv, "select data from event where event = 'accepted' and recipient = 'ann@fan.test' "
                                "and data like ?", f"%{subject}%")
    assert json.loads(accepted[0][0])["user-variables"] == {"city": "Oslo"}  # member vars, not render data
    urls = {}
    for rcpt, city, first, last in (("ann@fan.test", "Oslo", "Ann", "Lee"), ("ben@fan.test", "Lima", "Ben", "Ode")):
        out = email.message_from_bytes(render.for_recipient(msg, raw, rcpt), policy=policy.default)
        body = out.get_content()
        assert f"Hi {first} {last} from {city} ({first} {last} <{rcpt}>)." in body
        url = re.search(r"Leave: (\S+)", body).group(1)
        assert url.startswith(srv.url + "/unsubscribe/list/")
        assert f"<{url}>" in out["List-Unsubscribe"] and "mailto:unsubscribe-" in out["List-Unsubscribe"]
        assert out["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert out["To"] == address
        urls[rcpt] = url
    # One click GET, and the RFC 8058 POST (no API key: a public link).
    g = requests.get(urls["ann@fan.test"], timeout=10)
    assert g.status_code == 200 and "unsubscribed" in g.text
    p = requests.post(urls["ben@fan.test"], data={"List-Unsubscribe": "One-Click"}, timeout=10)
    assert p.status_code == 200
    assert requests.get(urls["ann@fan.test"][:-4] + "0000", timeout=10).status_code == 404  # forged token
    for rcpt in ("ann@fan.test", "ben@fan.test"):
        assert srv.api("GET", f"/v3/lists/{address}/members/{rcpt}").json()["member"]["subscribed"] is False
    # Later sends skip them: nobody left.
    r = srv.api("POST", f"/v3/{dom}/messages", data={"from": f"editor@{dom}", "to": address, "subject": "x", "text": "x"})
    assert r.status_code == 400


def test_send_to_list_over_authenticated_smtp(srv, dom):
    address = new_list(srv, dom)
    srv.api("POST", f"/v3/lists/{address}/members", data={"address": "smtp-member@fan.test"})
    assert srv.api("POST", f"/v3/domains/{dom}/credentials", data={"login": f"poster@{dom}",
                                                                   "password": "poster-pass-1"}).status_code == 200
    subject = f"smtp-list-{uuid.uuid4().hex[:6]}"
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as c:
        c.ehlo("client.test")
        c.login(f"poster@{dom}", "poster-pass-1")
        c.sendmail(f"poster@{dom}", [address], f"From: poster@{dom}\r\nTo: {address}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())
    _, _, rcpts = load_message(srv, subject)
    assert rcpts == ["smtp-member@fan.test"]


@pytest.mark.parametrize("level, sender, delivered", [
    ("everyone", "stranger@far.test", True),
    ("members", "stranger@far.test", False),
    ("members", "insider@far.test", True),
    ("readonly", "insider@far.test", False),
])
def test_inbound_to_list_by_access_level(srv, dom, level, sender, delivered):
    address = new_list(srv, dom, access_level=level)
    # Fresh member addresses: earlier fan-outs bounce on the loopback DNS and get suppressed.
    tag = uuid.uuid4().hex[:6]
    insider, other = f"insider-{tag}@far.test", f"other-{tag}@fan.test"
    sender = sender.replace("insider@", f"insider-{tag}@")
    srv.api("POST", f"/v3/lists/{address}/members.json", data={"members": json.dumps([insider, other])})
    subject = f"inbound-{level}-{uuid.uuid4().hex[:6]}"
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as c:
        c.ehlo("far.test")
        c.sendmail(sender, [address], f"From: {sender}\r\nSubject: {subject}\r\n\r\nhello list\r\n".encode())
    if delivered:
        rows = wait_for(lambda: store_query(srv, "select q.recipient from message m join queue_item q on q.message_id = m.id "
                                                 "where m.subject = ? order by q.recipient", subject), what="fan-out")
        assert [r[0] for r in rows] == sorted({insider, other})
    else:
        wait_for(lambda: store_query(srv, "select count(*) from event where event = 'rejected' and recipient = ?",
                                     address)[0][0] == 1, what="rejected event")
        assert store_query(srv, "select count(*) from message where subject = ?", subject) == [(0,)]


def test_unsubscribe_by_mail_and_no_fan_out_of_bounces(srv, dom):
    address = new_list(srv, dom, access_level="everyone")
    srv.api("POST", f"/v3/lists/{address}/members", data={"address": "leaver@fan.test", "name": "Lea Ver"})
    subject = f"unsub-mail-{uuid.uuid4().hex[:6]}"
    r = srv.api("POST", f"/v3/{dom}/messages", data={"from": f"editor@{dom}", "to": address, "subject": subject,
                                                    "text": "mail %unsubscribe_email% to leave"})
    assert r.status_code == 200
    msg, raw, _ = load_message(srv, subject)
    body = email.message_from_bytes(render.for_recipient(msg, raw, "leaver@fan.test"), policy=policy.default).get_content()
    unsub = re.search(r"mail (\S+@\S+) to leave", body).group(1)
    assert unsub.startswith("unsubscribe-") and unsub.endswith("@" + dom)
    local, _, _ = unsub.partition("@")
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as c:
        c.ehlo("fan.test")
        c.mail("leaver@fan.test")
        assert c.rcpt(f"{local[:-4]}0000@{dom}")[0] == 550  # a forged token is nobody
        assert c.rcpt(unsub)[0] == 250
        assert c.data(b"Subject: unsubscribe\r\n\r\nplease\r\n")[0] == 250
    wait_for(lambda: srv.api("GET", f"/v3/lists/{address}/members/leaver@fan.test").json()["member"]["subscribed"] is False,
             what="unsubscribed by mail")
    # A bounce (null sender) to an open list is not fanned out (no mail loops).
    srv.api("POST", f"/v3/lists/{address}/members", data={"address": "stayer@fan.test"})
    bounce_subject = f"bounce-{uuid.uuid4().hex[:6]}"
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as c:
        c.ehlo("fan.test")
        c.sendmail("", [address], f"From: MAILER-DAEMON@fan.test\r\nSubject: {bounce_subject}\r\n\r\nx\r\n".encode())
    wait_for(lambda: store_query(srv, "select count(*) from event where event = 'rejected' and recipient = ? "
                                      "and data like ?", address, "%bounce%")[0][0] == 1, what="bounce refused")
    assert store_query(srv, "select count(*) from message where subject = ?", bounce_subject) == [(0,)]


def test_fan_out_through_the_relay_to_a_loopback_mx(tmp_path, dns_server):
    """Each member's copy leaves through the relay with its own variables and unsubscribe
    headers (a loopback SMTP sink is the members' MX)."""
    from tests.relaytest import point_mx
    from tests.smtpsink import SmtpSink
    with SmtpSink() as sink, own_server(tmp_path, dns_sets(dns_server) + [
            "relay.allow_private_mx=true", f"relay.remote_port={sink.port}", "spam.spamd_host="]) as s:
        d = f"rl{uuid.uuid4().hex[:8]}.example.test"
        members_domain = f"m{uuid.uuid4().hex[:8]}.test"
        point_mx(dns_server, members_domain, "127.0.0.1")
        assert s.api("POST", "/v3/domains", data={"name": d}).status_code == 200
        address = f"club@{d}"
        assert s.api("POST", "/v3/lists", data={"address": address, "access_level": "everyone"}).status_code == 200
        people = [{"address": f"p{i}@{members_domain}", "name": f"Pat{i} Doe{i}", "vars": {"seat": i}} for i in range(3)]
        s.api("POST", f"/v3/lists/{address}/members.json", data={"members": json.dumps(people)})
        r = s.api("POST", f"/v3/{d}/messages", data={
            "from": f"club@{d}", "to": address, "subject": "Seats",
            "text": "Dear %recipient_fname%, seat %recipient.seat%. %mailing_list_unsubscribe_url%"})
        assert r.status_code == 200, r.text
        got = sink.wait_count(3, timeout=30)
        for i in range(3):
            (copy,) = [m for m in got if m.rcpt_tos == [f"p{i}@{members_domain}"]]
            msg = email.message_from_bytes(copy.data, policy=policy.default)
            assert f"Dear Pat{i}, seat {i}. {s.url}/unsubscribe/list/" in msg.get_content()
            assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            # Sent through the API: a VERP return path on the domain, so bounces come back.
            assert msg["To"] == address and copy.mail_from.startswith("bounce+")
            assert copy.mail_from.endswith(f"@{d}")
        # Posted to the list through the MX: the copies carry VERP return paths too, so a
        # member's asynchronous bounce comes back to that member's queue row, not to the list.
        with smtplib.SMTP("127.0.0.1", s.ports["smtp"], timeout=30) as c:
            c.ehlo(members_domain)
            c.sendmail(f"p0@{members_domain}", [address],
                       f"From: p0@{members_domain}\r\nSubject: Posted\r\n\r\nhello all\r\n".encode())
        posted = [m for m in sink.wait_count(6, timeout=30) if b"Subject: Posted" in m.data]
        assert sorted(m.rcpt_tos[0] for m in posted) == [f"p{i}@{members_domain}" for i in range(3)]
        assert all(m.mail_from.startswith("bounce+") and m.mail_from.endswith(f"@{d}") for m in posted)
