"""Domains API over real HTTP (requests) against a running mailplat: shapes on /v3 and /v4,
every error path, races on create, key scopes, real DKIM keys, credentials and settings."""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import email.utils
import sqlite3
import uuid

import dkim
import pytest
import requests
from argon2 import PasswordHasher
from cryptography.hazmat.primitives import serialization

from mailplat import config as configmod
from tests.conftest import PG_BASE, dns_sets
from tests.support import MailplatServer, pg_database, start_server

DOMAIN_KEYS = {"created_at", "id", "is_disabled", "name", "require_tls", "skip_verification",
               "smtp_login", "spam_action", "state", "type", "web_prefix", "web_scheme", "wildcard"}
PASSWORD_MESSAGE = "Password length must be between 5 and 32 characters"


# -- helpers (also used by the other test_domains_* modules) --------------------------------
@contextlib.contextmanager
def domains_server(tmp_path_factory, dns_server):
    """Like conftest's `server`, with the domains rate limit lifted: these modules make far more
    than 300 domain calls a minute (the limit itself is tested on a server of its own)."""
    data_dir = tmp_path_factory.mktemp("mailplat")
    sets = [*dns_sets(dns_server), "api.domains_rate_limit_per_minute=1000000"]
    with contextlib.ExitStack() as stack:
        url = None
        if os.environ.get("MAILPLAT_TEST_PG_SERVER") and PG_BASE:
            url = stack.enter_context(pg_database(PG_BASE))
        srv = start_server(data_dir, db_url=url, sets=sets)
        srv.dns = dns_server
        try:
            yield srv
        finally:
            srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, dns_server):
    with domains_server(tmp_path_factory, dns_server) as srv:
        yield srv


def store_query(server: MailplatServer, sql: str, *params) -> list[tuple]:
    """Rows from the server's own store, read directly (SQLite file or PostgreSQL)."""
    cfg = configmod.load(data_dir=server.data_dir, env={}, check_files=False)
    url = cfg.db_url
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(f"file:{url[len('sqlite:///'):]}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    import psycopg2
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            return cur.fetchall()
    finally:
        conn.close()


def create(server: MailplatServer, name: str, **fields) -> requests.Response:
    return server.api("POST", "/v3/domains", data={"name": name, **fields})


def created(server: MailplatServer, name: str, **fields) -> dict:
    r = create(server, name, **fields)
    assert r.status_code == 200, r.text
    return r.json()


def dkim_record(body: dict) -> dict:
    [rec] = [r for r in body["sending_dns_records"] if "._domainkey." in r.get("name", "")]
    return rec


def count_rows(server, table: str, domain: str) -> int:
    if table == "domain":
        return store_query(server, "SELECT count(*) FROM domain WHERE name = ?", domain)[0][0]
    return store_query(server, f"SELECT count(*) FROM {table} t JOIN domain d ON t.domain_id = d.id "
                               "WHERE d.name = ?", domain)[0][0]


# -- shapes ---------------------------------------------------------------------------------
def test_create_get_list_shapes_v3_equals_v4(server, unique_domain):
    body = created(server, unique_domain, smtp_password="s3cretpass", wildcard="False")
    assert body["message"] == "Domain has been created"
    d = body["domain"]
    assert set(d) >= DOMAIN_KEYS
    assert d["name"] == unique_domain
    assert d["state"] == "unverified"
    assert d["smtp_login"] == f"postmaster@{unique_domain}"
    assert d["spam_action"] == "disabled" and d["wildcard"] is False
    assert d["web_scheme"] == "http" and d["web_prefix"] == "email"
    assert d["require_tls"] is False and d["skip_verification"] is False and d["is_disabled"] is False
    assert email.utils.parsedate_to_datetime(d["created_at"]).tzinfo is not None
    assert d["created_at"].endswith("GMT")

    cfg = configmod.load(data_dir=server.data_dir, env={}, check_files=False).dns
    assert body["receiving_dns_records"] == [
        {"cached": [], "priority": "10", "record_type": "MX", "valid": "unknown", "value": host}
        for host in cfg.mx_hosts]
    spf, dkim_rec, cname = body["sending_dns_records"]
    assert spf == {"cached": [], "name": unique_domain, "record_type": "TXT", "valid": "unknown",
                   "value": f"v=spf1 include:{cfg.spf_include} ~all"}
    assert dkim_rec["name"] == f"mailo._domainkey.{unique_domain}"
    assert dkim_rec["record_type"] == "TXT" and dkim_rec["value"].startswith("k=rsa; p=MIG")
    assert cname == {"cached": [], "name": f"email.{unique_domain}", "record_type": "CNAME",
                     "valid": "unknown", "value": cfg.tracking_cname}

    v3 = server.api("GET", f"/v3/domains/{unique_domain}")
    v4 = server.api("GET", f"/v4/domains/{unique_domain}")
    assert v3.status_code == v4.status_code == 200
    assert v3.headers["Content-Type"].startswith("application/json")
    assert v3.json() == v4.json()
    assert v3.json()["domain"] == d
    assert {k: v for k, v in body.items() if k != "message"} == v3.json()

    l3 = server.api("GET", "/v3/domains", params={"limit": 1000}).json()
    l4 = server.api("GET", "/v4/domains", params={"limit": 1000}).json()
    assert l3 == l4
    assert l3["total_count"] >= 1 and d in l3["items"]


def test_list_paging_and_filters(server):
    names = [f"p{i}-{uuid.uuid4().hex[:8]}.page.test" for i in range(3)]
    for n in names:
        created(server, n)
    everything = server.api("GET", "/v4/domains", params={"limit": 1000}).json()
    order = [i["name"] for i in everything["items"]]
    assert everything["total_count"] == len(order)
    start = order.index(names[0])
    page = server.api("GET", "/v3/domains", params={"skip": start, "limit": 2}).json()
    assert [i["name"] for i in page["items"]] == names[:2]
    assert page["total_count"] == everything["total_count"]
    default = server.api("GET", "/v3/domains").json()
    assert len(default["items"]) == min(100, everything["total_count"])

    unverified = server.api("GET", "/v3/domains", params={"state": "unverified", "limit": 1000}).json()
    assert all(i["state"] == "unverified" for i in unverified["items"])
    assert set(names) <= {i["name"] for i in unverified["items"]}
    active = server.api("GET", "/v3/domains", params={"state": "active", "limit": 1000}).json()
    assert not set(names) & {i["name"] for i in active["items"]}

    for params in ({"limit": "abc"}, {"skip": "1.5"}, {"state": "sleeping"}):
        r = server.api("GET", "/v3/domains", params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["message"]


# -- DKIM keys ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1024, 2048])
def test_dkim_public_key_matches_stored_private_key(server, size):
    name = f"k{size}-{uuid.uuid4().hex[:8]}.example.test"
    body = created(server, name, dkim_key_size=str(size), dkim_selector="s1")
    rec = dkim_record(body)
    assert rec["name"] == f"s1._domainkey.{name}"
    p = rec["value"].split("p=", 1)[1]

    [(pem, stored_public, stored_size, selector)] = store_query(
        server, "SELECT k.private_key_pem, k.public_key_b64, k.key_size, k.selector "
                "FROM dkim_key k JOIN domain d ON k.domain_id = d.id WHERE d.name = ?", name)
    assert (stored_size, selector, stored_public) == (size, "s1", p)
    private = serialization.load_pem_private_key(pem.encode(), password=None)
    assert private.key_size == size
    derived = base64.b64encode(private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    assert derived == p

    # The published record verifies a signature made with the stored key (dkimpy both ways).
    msg = (f"From: a@{name}\r\nTo: b@x.test\r\nSubject: hi\r\n"
           f"Message-ID: <1@{name}>\r\n\r\nbody\r\n").encode()
    sig = dkim.sign(msg, b"s1", name.encode(), pem.encode(), include_headers=[b"from", b"to", b"subject"])
    txt = rec["value"].encode()
    assert dkim.verify(sig + msg, dnsfunc=lambda qname, timeout=5: txt)
    other = dkim.sign(msg, b"s1", name.encode(),
                      store_query(server, "SELECT private_key_pem FROM dkim_key k JOIN domain d "
                                          "ON k.domain_id = d.id WHERE d.name <> ? LIMIT 1", name)[0][0].encode(),
                      include_headers=[b"from", b"to", b"subject"])
    assert not dkim.verify(other + msg, dnsfunc=lambda qname, timeout=5: txt)


def test_default_key_size_is_1024_and_keys_differ(server):
    a = dkim_record(created(server, f"a-{uuid.uuid4().hex[:8]}.example.test"))["value"]
    b = dkim_record(created(server, f"b-{uuid.uuid4().hex[:8]}.example.test"))["value"]
    assert a != b
    key = serialization.load_der_public_key(base64.b64decode(a.split("p=", 1)[1]))
    assert key.key_size == 1024


# -- duplicates and races -------------------------------------------------------------------
def test_duplicate_domain_in_any_spelling(server, unique_domain):
    created(server, unique_domain)
    for spelling in (unique_domain, unique_domain.upper(), unique_domain + "."):
        r = create(server, spelling)
        assert r.status_code == 400, r.text
        assert r.json() == {"message": "Domain already exists"}
    assert count_rows(server, "domain", unique_domain) == 1


def test_twenty_concurrent_creates_exactly_one_wins(server, unique_domain):
    def attempt(_):
        return requests.post(server.url + "/v3/domains", auth=("api", server.key), timeout=60,
                             data={"name": unique_domain, "smtp_password": "racepass1"})

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(attempt, range(20)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [400] * 19, [r.text for r in results]
    assert all(r.json() == {"message": "Domain already exists"} for r in results if r.status_code == 400)
    assert count_rows(server, "domain", unique_domain) == 1
    assert count_rows(server, "dkim_key", unique_domain) == 1
    assert count_rows(server, "smtp_credential", unique_domain) == 1
    # No stray key or credential rows from the losers.
    assert store_query(server, "SELECT count(*) FROM dkim_key WHERE domain_id NOT IN (SELECT id FROM domain)")[0][0] == 0
    assert store_query(server, "SELECT count(*) FROM smtp_credential WHERE login = ?",
                       f"postmaster@{unique_domain}")[0][0] == 1


# -- bad names and options ------------------------------------------------------------------
BAD_NAMES = ["", "   ", "not a domain", "under_score.example.test", "x" * 64 + ".example.test",
             "-lead.example.test", "trail-.example.test", "a..b.example.test", "localhost",
             "192.168.1.1", "xn--zz.example.test", "bad\nname.example.test", "semi;colon.test",
             ".".join(["abcdefghi"] * 26) + ".test", "*.example.test", "a@b.example.test"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_400_and_create_nothing(server, name):
    before = server.api("GET", "/v3/domains", params={"limit": 1000}).json()["total_count"]
    r = create(server, name)
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert "name" in message.lower() or "domain" in message.lower()
    assert server.api("GET", "/v3/domains", params={"limit": 1000}).json()["total_count"] == before


def test_missing_name_is_400(server):
    r = server.api("POST", "/v3/domains", data={"smtp_password": "whatever1"})
    assert r.status_code == 400 and r.json() == {"message": "'name' parameter is missing"}


def test_idn_is_stored_as_a_label(server):
    tag = uuid.uuid4().hex[:6]
    body = created(server, f"Bücher-{tag}.Example.TEST")
    a_label = body["domain"]["name"]
    assert a_label.startswith("xn--") and a_label.endswith(".example.test") and a_label.isascii()
    assert body["domain"]["smtp_login"] == f"postmaster@{a_label}"
    for path_name in (a_label, f"bücher-{tag}.example.test", requests.utils.quote(f"bücher-{tag}.example.test")):
        r = server.api("GET", f"/v3/domains/{path_name}")
        assert r.status_code == 200 and r.json()["domain"]["name"] == a_label
    assert create(server, a_label).json() == {"message": "Domain already exists"}


@pytest.mark.parametrize("field,value,needle", [
    ("dkim_key_size", "512", "dkim_key_size"),
    ("dkim_key_size", "4096", "dkim_key_size"),
    ("dkim_key_size", "big", "dkim_key_size"),
    ("spam_action", "maybe", "spam_action"),
    ("web_scheme", "ftp", "web_scheme"),
    ("wildcard", "perhaps", "wildcard"),
    ("force_dkim_authority", "2", "force_dkim_authority"),
    ("dkim_selector", "bad_selector", "dkim_selector"),
    ("web_prefix", "two words", "web_prefix"),
    ("ips", "999.1.1.1", "ips"),
    ("smtp_password", "abcd", PASSWORD_MESSAGE),
    ("smtp_password", "x" * 33, PASSWORD_MESSAGE),
    ("smtp_password", "abc\x00defg", "smtp_password"),
    ("smtp_password", "abc\r\ndefg", "smtp_password"),
])
def test_bad_create_options_are_400_and_create_nothing(server, unique_domain, field, value, needle):
    r = create(server, unique_domain, **{field: value})
    assert r.status_code == 400, r.text
    assert needle in r.json()["message"]
    assert server.api("GET", f"/v3/domains/{unique_domain}").status_code == 404
    assert count_rows(server, "dkim_key", unique_domain) == 0


@pytest.mark.parametrize("password", ["12345", "y" * 32])
def test_password_length_bounds_accepted(server, unique_domain, password):
    created(server, unique_domain, smtp_password=password)
    [(stored,)] = store_query(server, "SELECT password_hash FROM smtp_credential WHERE login = ?",
                              f"postmaster@{unique_domain}")
    assert stored.startswith("$argon2id$") and password not in stored
    assert PasswordHasher().verify(stored, password)


def test_all_options_stored(server, unique_domain):
    body = created(server, unique_domain, spam_action="tag", wildcard="True", web_scheme="https",
                   force_dkim_authority="yes", dkim_selector="pic", web_prefix="track",
                   ips="127.0.0.2, 10.0.0.1", pool_id="pool-7")
    d = body["domain"]
    assert (d["spam_action"], d["wildcard"], d["web_scheme"], d["web_prefix"]) == ("tag", True, "https", "track")
    assert dkim_record(body)["name"] == f"pic._domainkey.{unique_domain}"
    assert body["sending_dns_records"][-1]["name"] == f"track.{unique_domain}"
    [(ips, pool, force)] = store_query(server, "SELECT ips, pool_id, force_dkim_authority FROM domain "
                                               "WHERE name = ?", unique_domain)
    assert ips == '["127.0.0.2","10.0.0.1"]' and pool == "pool-7" and force in (1, True)


# -- body encodings -------------------------------------------------------------------------
def test_json_and_multipart_bodies(server):
    name = f"j-{uuid.uuid4().hex[:8]}.example.test"
    r = server.api("POST", "/v4/domains", json={"name": name, "wildcard": True, "dkim_key_size": 1024,
                                                "ips": ["10.1.1.1"]})
    assert r.status_code == 200, r.text
    assert r.json()["domain"]["wildcard"] is True
    name2 = f"m-{uuid.uuid4().hex[:8]}.example.test"
    r = server.api("POST", "/v4/domains", files={"name": (None, name2), "wildcard": (None, "true"),
                                                 "spam_action": (None, "block")})
    assert r.status_code == 200, r.text
    assert r.json()["domain"]["spam_action"] == "block"
    # mailgun.js sends a form Content-Type with an empty body on GET and DELETE.
    r = server.api("GET", f"/v4/domains/{name2}", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


@pytest.mark.parametrize("headers,body", [
    ({"Content-Type": "application/json"}, b'{"name": "broken.example.test",'),
    ({"Content-Type": "application/json"}, b"\xff\xfe{}"),
    ({"Content-Type": "multipart/form-data; boundary=zzz"}, b"--zzz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zzz--\r\n"),
    ({"Content-Type": "multipart/form-data; boundary=zzz"}, b"garbage without any boundary"),
    ({"Content-Type": "multipart/form-data"}, b"--x\r\n\r\n"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, b"name=\xff\xfe.example.test"),
])
def test_malformed_bodies_are_400(server, headers, body):
    for method, path in (("POST", "/v3/domains"), ("PUT", "/v3/domains/whatever.example.test"),
                         ("POST", "/v3/domains/whatever.example.test/credentials")):
        r = server.api(method, path, data=body, headers=headers)
        assert r.status_code in (400, 404), (method, path, r.status_code, r.text)
        assert r.json()["message"]
    r = server.api("POST", "/v3/domains", data=body, headers=headers)
    assert r.status_code == 400


# -- unknown domains and paths --------------------------------------------------------------
@pytest.mark.parametrize("method,suffix,data", [
    ("GET", "", None), ("PUT", "", {"spam_action": "tag"}), ("DELETE", "", None),
    ("PUT", "/verify", None), ("GET", "/credentials", None),
    ("POST", "/credentials", {"login": "bob", "password": "secret1"}),
    ("PUT", "/credentials/bob", {"password": "secret1"}), ("DELETE", "/credentials/bob", None),
    ("DELETE", "/credentials", None), ("GET", "/connection", None),
    ("PUT", "/connection", {"require_tls": "true"}), ("GET", "/tracking", None),
    ("PUT", "/tracking/open", {"active": "yes"}), ("PUT", "/dkim_authority", {"self": "true"}),
    ("PUT", "/dkim_selector", {"dkim_selector": "s2"}), ("PUT", "/web_prefix", {"web_prefix": "t"}),
])
@pytest.mark.parametrize("version", ["v3", "v4"])
def test_unknown_domain_is_404(server, version, method, suffix, data):
    for name in ("missing-domain.example.test", "not_even_valid"):
        r = server.api(method, f"/{version}/domains/{name}{suffix}", data=data)
        assert r.status_code == 404, (name, r.text)
        assert r.json() == {"message": "Domain not found"}


def test_unknown_subpath_is_404_json(server, unique_domain):
    created(server, unique_domain)
    for method, path in (("GET", f"/v3/domains/{unique_domain}/nothing"),
                         ("PUT", f"/v3/domains/{unique_domain}/tracking/everything"),
                         ("POST", f"/v3/domains/{unique_domain}")):
        r = server.api(method, path, data={"active": "yes"})
        assert r.status_code in (404, 405), r.text
        assert r.json()["message"]


# -- keys and scopes ------------------------------------------------------------------------
def test_sending_keys_and_bad_keys_cannot_use_domains_api(server, unique_domain):
    created(server, unique_domain)
    r = server.api("POST", "/v1/keys", data={"role": "sending", "domain_name": unique_domain})
    assert r.status_code == 200, r.text
    sending_key = r.json()["key"]["secret"]
    calls = [("GET", "/v3/domains", None), ("GET", "/v4/domains", None),
             ("POST", "/v3/domains", {"name": "x" + unique_domain}),
             ("GET", f"/v3/domains/{unique_domain}", None),
             ("PUT", f"/v3/domains/{unique_domain}", {"spam_action": "tag"}),
             ("DELETE", f"/v3/domains/{unique_domain}", None),
             ("GET", f"/v3/domains/{unique_domain}/credentials", None),
             ("POST", f"/v3/domains/{unique_domain}/credentials", {"login": "x", "password": "secret1"}),
             ("PUT", f"/v3/domains/{unique_domain}/connection", {"require_tls": "true"}),
             ("PUT", f"/v3/domains/{unique_domain}/tracking/open", {"active": "yes"})]
    for method, path, data in calls:
        for key, allowed in ((sending_key, (401, 403)), ("key-nope-nope", (401,)), ("", (401,))):
            r = server.api(method, path, key=key, data=data)
            assert r.status_code in allowed, (method, path, key[:8], r.status_code, r.text)
            assert r.json()["message"]
        r = requests.request(method, server.url + path, data=data, timeout=30)
        assert r.status_code == 401
    # Nothing changed through the refused calls.
    d = server.api("GET", f"/v3/domains/{unique_domain}").json()["domain"]
    assert d["spam_action"] == "disabled"
    assert server.api("GET", f"/v3/domains/{unique_domain}/credentials").json()["total_count"] == 0


# -- update and delete ----------------------------------------------------------------------
def test_update_domain(server, unique_domain):
    created(server, unique_domain)
    r = server.api("PUT", f"/v3/domains/{unique_domain}",
                   data={"spam_action": "tag", "web_scheme": "https", "wildcard": "True"})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Domain has been updated"
    d = server.api("GET", f"/v4/domains/{unique_domain}").json()["domain"]
    assert (d["spam_action"], d["web_scheme"], d["wildcard"]) == ("tag", "https", True)
    for field, value in (("spam_action", "everything"), ("web_scheme", "gopher"), ("wildcard", "sometimes")):
        fields = {"web_scheme": (None, "http"), "spam_action": (None, "block")}
        fields[field] = (None, value)
        r = server.api("PUT", f"/v4/domains/{unique_domain}", files=fields)
        assert r.status_code == 400 and field in r.json()["message"]
    d2 = server.api("GET", f"/v4/domains/{unique_domain}").json()["domain"]
    assert d2 == d  # a rejected update changes nothing, not even its valid fields


def test_delete_domain_removes_everything(server, unique_domain):
    created(server, unique_domain, smtp_password="deleteme1")
    server.api("POST", f"/v3/domains/{unique_domain}/credentials", data={"login": "bob", "password": "bobpass1"})
    key = server.api("POST", "/v1/keys", data={"role": "sending", "domain_name": unique_domain}).json()["key"]
    r = server.api("DELETE", f"/v3/domains/{unique_domain}")
    assert r.status_code == 200 and r.json() == {"message": "Domain has been deleted"}
    assert server.api("GET", f"/v3/domains/{unique_domain}").json() == {"message": "Domain not found"}
    assert server.api("DELETE", f"/v3/domains/{unique_domain}").status_code == 404
    for table in ("domain", "dkim_key", "smtp_credential"):
        assert count_rows(server, table, unique_domain) == 0
    assert store_query(server, "SELECT count(*) FROM smtp_credential WHERE login LIKE ?", f"%@{unique_domain}")[0][0] == 0
    [(revoked,)] = store_query(server, "SELECT revoked_at FROM api_key WHERE key_id = ?", key["id"])
    assert revoked is not None
    created(server, unique_domain)  # the name is free again


# -- credentials ----------------------------------------------------------------------------
def _cred_hash(server, login):
    rows = store_query(server, "SELECT password_hash FROM smtp_credential WHERE login = ?", login)
    return rows[0][0] if rows else None


def test_credentials_lifecycle(server, unique_domain):
    d = unique_domain
    created(server, d)
    base = f"/v3/domains/{d}/credentials"
    assert server.api("GET", base).json() == {"total_count": 0, "items": []}
    r = server.api("POST", base, data={"login": "alice", "password": "alicepass"})
    assert r.status_code == 200 and r.json() == {"message": "Created 1 credentials pair(s)"}
    r = server.api("POST", base, files={"login": (None, f"Bob@{d.upper()}"), "password": (None, "bobpass")})
    assert r.status_code == 200, r.text
    r = server.api("POST", base, json={"login": f"carol@{d}", "password": "carolpass"})
    assert r.status_code == 200, r.text
    listing = server.api("GET", base).json()
    assert listing["total_count"] == 3
    assert [i["login"] for i in listing["items"]] == [f"alice@{d}", f"bob@{d}", f"carol@{d}"]
    for item in listing["items"]:
        assert set(item) == {"login", "mailbox", "created_at", "size_bytes"}
        assert item["mailbox"] == item["login"]
        email.utils.parsedate_to_datetime(item["created_at"])
    page = server.api("GET", base, params={"skip": 1, "limit": 1}).json()
    assert page["total_count"] == 3 and [i["login"] for i in page["items"]] == [f"bob@{d}"]

    first = _cred_hash(server, f"alice@{d}")
    assert first.startswith("$argon2id$") and PasswordHasher().verify(first, "alicepass")
    for i, login in enumerate(("alice", f"alice@{d}", f"alice%40{d}")):
        r = server.api("PUT", f"{base}/{login}", data={"password": f"newpass{i}"})
        assert r.status_code == 200 and r.json() == {"message": "Password changed"}, (login, r.text)
        assert PasswordHasher().verify(_cred_hash(server, f"alice@{d}"), f"newpass{i}")

    r = server.api("DELETE", f"{base}/bob")
    assert r.status_code == 200 and r.json() == {"message": "Credentials have been deleted", "spec": f"bob@{d}"}
    r = server.api("DELETE", f"{base}/carol%40{d}")
    assert r.json() == {"message": "Credentials have been deleted", "spec": f"carol@{d}"}
    assert server.api("DELETE", f"{base}/bob").status_code == 404
    assert server.api("PUT", f"{base}/nobody", data={"password": "whatever"}).status_code == 404
    for n in ("x1", "x2"):
        server.api("POST", base, data={"login": n, "password": "xxxxxx"})
    r = server.api("DELETE", base)
    assert r.status_code == 200
    assert r.json() == {"message": "All domain credentials have been deleted", "count": 3}
    assert server.api("GET", base).json()["total_count"] == 0


def test_credential_errors(server, unique_domain):
    d = unique_domain
    created(server, d)
    base = f"/v3/domains/{d}/credentials"
    cases = [({"password": "goodpass"}, "login"),
             ({"login": "alice"}, "password"),
             ({"login": "alice", "password": "abcd"}, PASSWORD_MESSAGE),
             ({"login": "alice", "password": "z" * 33}, PASSWORD_MESSAGE),
             ({"login": "alice@other.example.test", "password": "goodpass"}, "login"),
             ({"login": "bad login", "password": "goodpass"}, "login"),
             ({"login": "a..b", "password": "goodpass"}, "login"),
             ({"login": "x" * 65, "password": "goodpass"}, "login")]
    for data, needle in cases:
        r = server.api("POST", base, data=data)
        assert r.status_code == 400, (data, r.text)
        assert needle in r.json()["message"], (data, r.text)
    assert server.api("GET", base).json()["total_count"] == 0
    assert server.api("POST", base, data={"login": "dup", "password": "goodpass"}).status_code == 200
    r = server.api("POST", base, data={"login": f"DUP@{d}", "password": "goodpass"})
    assert r.status_code == 400 and "exist" in r.json()["message"]
    r = server.api("PUT", f"{base}/dup", data={"password": "1234"})
    assert r.status_code == 400 and r.json()["message"] == PASSWORD_MESSAGE
    r = server.api("PUT", f"{base}/dup@other.example.test", data={"password": "123456"})
    assert r.status_code == 400


def test_passwords_never_logged(server, unique_domain):
    secret = "Pl41nT3xt" + uuid.uuid4().hex[:8]
    created(server, unique_domain, smtp_password=secret)
    server.api("POST", f"/v3/domains/{unique_domain}/credentials", data={"login": "z", "password": secret})
    server.api("PUT", f"/v3/domains/{unique_domain}/credentials/z", data={"password": secret[::-1]})
    server.api("POST", f"/v3/domains/{unique_domain}/credentials", data={"login": "y", "password": secret + "x" * 40})
    logs = server.logs()
    assert secret not in logs and secret[::-1] not in logs
    assert store_query(server, "SELECT count(*) FROM smtp_credential WHERE password_hash LIKE ?", f"%{secret}%")[0][0] == 0


# -- connection, tracking, DKIM authority/selector, web prefix ------------------------------
def test_connection_settings(server, unique_domain):
    created(server, unique_domain)
    path = f"/v3/domains/{unique_domain}/connection"
    assert server.api("GET", path).json() == {"connection": {"require_tls": False, "skip_verification": False}}
    r = server.api("PUT", path, data={"require_tls": "True", "skip_verification": "false"})
    assert r.status_code == 200
    body = r.json()
    assert body["message"] == "Domain connection settings have been updated, may take 10 minutes to fully propagate"
    assert body["require-tls"] is True and body["skip-verification"] is False
    assert body["require_tls"] is True and body["skip_verification"] is False
    r = server.api("PUT", path, data={"skip_verification": "YES"})
    assert r.json()["require_tls"] is True and r.json()["skip_verification"] is True
    assert server.api("GET", path).json() == {"connection": {"require_tls": True, "skip_verification": True}}
    d = server.api("GET", f"/v4/domains/{unique_domain}").json()["domain"]
    assert d["require_tls"] is True and d["skip_verification"] is True
    r = server.api("PUT", path, data={"require_tls": "sure"})
    assert r.status_code == 400 and "require_tls" in r.json()["message"]


def test_tracking_settings(server, unique_domain):
    created(server, unique_domain)
    path = f"/v3/domains/{unique_domain}/tracking"
    assert server.api("GET", path).json() == {"tracking": {
        "click": {"active": False}, "open": {"active": False},
        "unsubscribe": {"active": False,
                        "html_footer": "\n<br>\n<p><a href=\"%unsubscribe_url%\">unsubscribe</a></p>\n",
                        "text_footer": "\n\nTo unsubscribe click: <%unsubscribe_url%>\n\n"}}}
    r = server.api("PUT", path + "/open", data={"active": "yes"})
    assert r.status_code == 200
    assert r.json() == {"message": "Domain tracking settings have been updated", "open": {"active": True}}
    r = server.api("PUT", path + "/click", files={"active": (None, "True")})
    assert r.json()["click"] == {"active": True}
    r = server.api("PUT", path + "/unsubscribe", data={"active": "true", "html_footer": "<p>bye %unsubscribe_url%</p>",
                                                       "text_footer": "u: %unsubscribe_url%"})
    assert r.json()["unsubscribe"] == {"active": True, "html_footer": "<p>bye %unsubscribe_url%</p>",
                                       "text_footer": "u: %unsubscribe_url%"}
    r = server.api("PUT", path + "/open", data={"active": "no"})
    assert r.json()["open"] == {"active": False}
    got = server.api("GET", path).json()["tracking"]
    assert got["open"] == {"active": False} and got["click"] == {"active": True}
    assert got["unsubscribe"]["text_footer"] == "u: %unsubscribe_url%"
    for kind, data in (("open", {"active": "maybe"}), ("click", {}), ("open", {"active": ""})):
        r = server.api("PUT", f"{path}/{kind}", data=data)
        assert r.status_code == 400 and "active" in r.json()["message"]
    assert server.api("PUT", path + "/bogus", data={"active": "yes"}).status_code == 404


def test_dkim_authority_selector_and_web_prefix(server):
    parent = f"par-{uuid.uuid4().hex[:8]}.example.test"
    child = f"news.{parent}"
    parent_body = created(server, parent)
    child_body = created(server, child)
    # A subdomain signs with its registered parent's key unless forced to be its own authority.
    assert dkim_record(child_body) == dkim_record(parent_body)
    listed = server.api("GET", "/v3/domains", params={"authority": parent, "limit": 1000}).json()
    assert {i["name"] for i in listed["items"]} == {parent, child}

    r = server.api("PUT", f"/v3/domains/{child}/dkim_authority", data={"self": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["changed"] is True and body["message"] == "Domain DKIM authority has been changed"
    own = dkim_record(body)
    assert own["name"] == f"mailo._domainkey.{child}" and own["value"] != dkim_record(parent_body)["value"]
    assert dkim_record(server.api("GET", f"/v3/domains/{child}").json()) == own
    again = server.api("PUT", f"/v3/domains/{child}/dkim_authority", data={"self": "true"}).json()
    assert again["changed"] is False
    back = server.api("PUT", f"/v3/domains/{child}/dkim_authority", data={"self": "false"}).json()
    assert back["changed"] is True and dkim_record(back)["name"] == f"mailo._domainkey.{parent}"
    assert server.api("PUT", f"/v3/domains/{child}/dkim_authority", data={}).status_code == 400
    forced = created(server, f"forced.{parent}", force_dkim_authority="true")
    assert dkim_record(forced)["name"] == f"mailo._domainkey.forced.{parent}"

    r = server.api("PUT", f"/v3/domains/{parent}/dkim_selector", data={"dkim_selector": "Sel2026"})
    assert r.status_code == 200 and r.json()["message"] == "Domain DKIM selector updated"
    rec = dkim_record(server.api("GET", f"/v3/domains/{parent}").json())
    assert rec["name"] == f"sel2026._domainkey.{parent}" and rec["value"] == dkim_record(parent_body)["value"]
    for bad in ("", "bad_sel", "a" * 64, "-x"):
        r = server.api("PUT", f"/v3/domains/{parent}/dkim_selector", data={"dkim_selector": bad})
        assert r.status_code == 400, bad

    r = server.api("PUT", f"/v3/domains/{parent}/web_prefix", data={"web_prefix": "Clicks"})
    assert r.status_code == 200 and r.json()["message"] == "Domain web prefix updated"
    got = server.api("GET", f"/v3/domains/{parent}").json()
    assert got["domain"]["web_prefix"] == "clicks"
    assert got["sending_dns_records"][-1]["name"] == f"clicks.{parent}"
    for bad in ("", "a.b", "under_score"):
        assert server.api("PUT", f"/v3/domains/{parent}/web_prefix", data={"web_prefix": bad}).status_code == 400

    # Deleting the parent hands the children back their own keys.
    server.api("DELETE", f"/v3/domains/{parent}")
    assert dkim_record(server.api("GET", f"/v3/domains/{child}").json())["name"] == f"mailo._domainkey.{child}"


# -- rate limit -----------------------------------------------------------------------------
def test_domains_rate_limit(tmp_path, unique_domain):
    srv = start_server(tmp_path / "rl", sets=["api.domains_rate_limit_per_minute=5"])
    try:
        codes = [srv.api("GET", "/v3/domains").status_code for _ in range(5)]
        assert codes == [200] * 5
        for method, path in (("GET", "/v4/domains"), ("POST", "/v3/domains"),
                             ("GET", f"/v3/domains/{unique_domain}/credentials")):
            r = srv.api(method, path, data={"name": unique_domain})
            assert r.status_code == 429, r.text
            retry = r.json()["retry-seconds"]
            assert isinstance(retry, int) and 1 <= retry <= 61
            assert int(r.headers["Retry-After"]) == retry
        # Only the domains API is limited.
        assert srv.api("GET", "/v1/keys").status_code == 200
        assert srv.api("GET", f"/v3/domains/{unique_domain}").status_code == 429
    finally:
        srv.stop()


# -- the signing-key interface other parts use ----------------------------------------------
def test_dkim_signing_key_lookup_for_the_signer(server):
    from mailplat.core.domains import dkim_signing_key_sync
    from mailplat.store.db import Store

    parent = f"sig-{uuid.uuid4().hex[:8]}.example.test"
    child = f"mail.{parent}"
    created(server, parent, dkim_selector="pk")
    created(server, child)
    own = f"own-{uuid.uuid4().hex[:8]}.example.test"
    created(server, own, dkim_key_size="2048")
    cfg = configmod.load(data_dir=server.data_dir, env={}, check_files=False)
    store = Store(cfg.db_url, read_threads=1)
    try:
        with store.sync():
            got_parent = dkim_signing_key_sync(parent)
            got_child = dkim_signing_key_sync(child.upper())
            got_own = dkim_signing_key_sync(own)
            assert dkim_signing_key_sync("nobody.example.test") is None
    finally:
        store.close()
    assert got_parent[:2] == ("sig-" + parent[4:], "pk") and got_child == got_parent
    assert got_own[:2] == (own, "mailo")
    for name, (_, _, pem) in ((parent, got_parent), (own, got_own)):
        body = server.api("GET", f"/v3/domains/{name}").json()
        derived = base64.b64encode(serialization.load_pem_private_key(pem.encode(), None).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
        assert dkim_record(body)["value"] == f"k=rsa; p={derived}"
