"""The official Mailgun Python SDK drives the Domains API of a running mailplat: domains,
credentials, connection, tracking, DKIM authority/selector and web prefix."""
from __future__ import annotations

import uuid

import pytest
from argon2 import PasswordHasher
from mailgun.client import Client

from tests.dnsserver import DnsServer
from tests.test_domains_api import dkim_record, domains_server, store_query


@pytest.fixture(scope="module")
def server(tmp_path_factory, dns_server: DnsServer):
    with domains_server(tmp_path_factory, dns_server) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(auth=("api", server.key), api_url=server.url) as c:
        yield c


@pytest.fixture
def domain(client) -> str:
    name = f"sdk{uuid.uuid4().hex[:10]}.example.test"
    r = client.domains.create(data={"name": name, "smtp_password": "s3cretpass",
                                    "spam_action": "disabled", "wildcard": False})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Domain has been created"
    return name


def test_domain_lifecycle(server, client, domain):
    got = client.domains.get(domain=domain)
    assert got.status_code == 200
    body = got.json()
    assert body["domain"]["name"] == domain and body["domain"]["wildcard"] is False
    assert body["domain"]["smtp_login"] == f"postmaster@{domain}"
    assert len(body["receiving_dns_records"]) == 2 and len(body["sending_dns_records"]) == 3
    [(pw_hash,)] = store_query(server, "SELECT password_hash FROM smtp_credential WHERE login = ?",
                               f"postmaster@{domain}")
    assert PasswordHasher().verify(pw_hash, "s3cretpass")

    listing = client.domainlist.get(filters={"limit": 1000, "skip": 0})
    assert listing.status_code == 200 and listing.url.split("?")[0].endswith("/v4/domains")
    assert domain in {d["name"] for d in listing.json()["items"]}
    v3_list = client.domains.get(filters={"limit": 1000})
    assert v3_list.url.split("?")[0].endswith("/v3/domains")
    assert v3_list.json() == listing.json()

    upd = client.domains.put(data={"spam_action": "tag", "web_scheme": "https", "wildcard": True}, domain=domain)
    assert upd.status_code == 200, upd.text
    d = client.domains.get(domain=domain).json()["domain"]
    assert (d["spam_action"], d["web_scheme"], d["wildcard"]) == ("tag", "https", True)

    # Verify with the records published in the loopback DNS: the SDK's verify call activates it.
    dns = server.dns
    dns.set(domain, "MX", *(f"10 {r['value']}." for r in body["receiving_dns_records"]))
    spf, dkim_rec, cname = body["sending_dns_records"]
    dns.set(domain, "TXT", f'"{spf["value"]}"')
    dns.set(dkim_rec["name"], "TXT", " ".join(f'"{dkim_rec["value"][i:i + 255]}"'
                                              for i in range(0, len(dkim_rec["value"]), 255)))
    dns.set(cname["name"], "CNAME", cname["value"] + ".")
    ver = client.domains.put(domain=domain, verify=True)
    assert ver.status_code == 200, ver.text
    assert ver.url.endswith(f"/v3/domains/{domain}/verify")
    assert ver.json()["domain"]["state"] == "active"

    missing = client.domains.get(domain="never-there.example.test")
    assert missing.status_code == 404 and missing.json() == {"message": "Domain not found"}

    gone = client.domains.delete(domain=domain)
    assert gone.status_code == 200 and gone.json() == {"message": "Domain has been deleted"}
    assert client.domains.get(domain=domain).status_code == 404


def test_create_errors_through_the_sdk(client, domain):
    dup = client.domains.create(data={"name": domain})
    assert dup.status_code == 400 and dup.json() == {"message": "Domain already exists"}
    bad = client.domains.create(data={"name": f"x{domain}", "dkim_key_size": 4096})
    assert bad.status_code == 400 and "dkim_key_size" in bad.json()["message"]


def test_credentials(server, client, domain):
    r = client.domains_credentials.create(domain=domain, data={"login": f"alice@{domain}", "password": "supersecret1"})
    assert r.status_code == 200 and r.json() == {"message": "Created 1 credentials pair(s)"}
    r = client.domains_credentials.create(domain=domain, data={"login": "bob", "password": "supersecret1"})
    assert r.status_code == 200, r.text

    listing = client.domains_credentials.get(domain=domain, filters={"limit": 10}).json()
    assert listing["total_count"] == 3
    assert {i["login"] for i in listing["items"]} == {f"postmaster@{domain}", f"alice@{domain}", f"bob@{domain}"}

    # The SDK sends the local part in the path when the login is in the domain.
    r = client.domains_credentials.put(domain=domain, data={"password": "supersecret2"}, login=f"alice@{domain}")
    assert r.status_code == 200 and r.json() == {"message": "Password changed"}, r.text
    assert r.url.endswith("/credentials/alice")
    [(pw_hash,)] = store_query(server, "SELECT password_hash FROM smtp_credential WHERE login = ?", f"alice@{domain}")
    assert PasswordHasher().verify(pw_hash, "supersecret2")
    r = client.domains_credentials.put(domain=domain, data={"password": "shrt"}, login="alice")
    assert r.status_code == 400 and "between 5 and 32" in r.json()["message"]

    r = client.domains_credentials.delete(domain=domain, login=f"alice@{domain}")
    assert r.status_code == 200
    assert r.json() == {"message": "Credentials have been deleted", "spec": f"alice@{domain}"}
    r = client.domains_credentials.delete(domain=domain)
    assert r.status_code == 200
    assert r.json() == {"message": "All domain credentials have been deleted", "count": 2}
    assert client.domains_credentials.get(domain=domain).json() == {"total_count": 0, "items": []}


def test_connection_and_tracking(client, domain):
    conn = client.domains_connection.get(domain=domain)
    assert conn.json() == {"connection": {"require_tls": False, "skip_verification": False}}
    r = client.domains_connection.put(domain=domain, data={"require_tls": "true", "skip_verification": "false"})
    assert r.status_code == 200
    assert r.json()["message"].startswith("Domain connection settings have been updated")
    assert r.json()["require_tls"] is True and r.json()["skip_verification"] is False
    assert client.domains_connection.get(domain=domain).json()["connection"]["require_tls"] is True

    tracking = client.domains_tracking.get(domain=domain).json()["tracking"]
    assert tracking["open"] == {"active": False} and tracking["click"] == {"active": False}
    assert "%unsubscribe_url%" in tracking["unsubscribe"]["html_footer"]
    assert client.domains_tracking_open.put(domain=domain, data={"active": "yes"}).json()["open"] == {"active": True}
    assert client.domains_tracking_click.put(domain=domain, data={"active": True}).json()["click"] == {"active": True}
    footer = '\n<br>\n<p><a href="%unsubscribe_url%">UnSuBsCrIbE</a></p>\n'
    r = client.domains_tracking_unsubscribe.put(domain=domain, data={
        "active": "yes", "html_footer": footer, "text_footer": "u: %unsubscribe_url%"})
    assert r.status_code == 200
    assert r.json()["unsubscribe"] == {"active": True, "html_footer": footer, "text_footer": "u: %unsubscribe_url%"}
    tracking = client.domains_tracking.get(domain=domain).json()["tracking"]
    assert tracking == {"open": {"active": True}, "click": {"active": True},
                        "unsubscribe": {"active": True, "html_footer": footer, "text_footer": "u: %unsubscribe_url%"}}


def test_dkim_authority_selector_web_prefix(client, domain):
    r = client.domains_dkimauthority.put(domain=domain, data={"self": "true"})
    assert r.status_code == 200 and r.json()["message"] == "Domain DKIM authority has been changed"
    r = client.domains_dkimselector.put(domain=domain, data={"dkim_selector": "s"})
    assert r.status_code == 200, r.text
    r = client.domains_webprefix.put(domain=domain, data={"web_prefix": "links"})
    assert r.status_code == 200, r.text
    body = client.domains.get(domain=domain).json()
    assert dkim_record(body)["name"] == f"s._domainkey.{domain}"
    assert body["sending_dns_records"][-1]["name"] == f"links.{domain}"
    assert body["domain"]["web_prefix"] == "links"
