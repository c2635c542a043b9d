"""Domain verification against the loopback DNS server: the right records make a domain active,
a wrong or missing one leaves it unverified and says which, a broken DNS answer is "unknown"."""
from __future__ import annotations

import uuid

import pytest

from tests.test_domains_api import created, dkim_record, domains_server, store_query


@pytest.fixture(scope="module")
def server(tmp_path_factory, dns_server):
    with domains_server(tmp_path_factory, dns_server) as srv:
        yield srv


@pytest.fixture
def domain(server) -> dict:
    return created(server, f"v{uuid.uuid4().hex[:10]}.verify.test")


def txt(value: str) -> str:
    """A TXT value in zone-file text, split into 255-byte strings as DNS requires."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def publish(dns, body: dict, skip: str = "", spf: str | None = None) -> None:
    """Put the records the API asks for into the DNS server (except `skip`)."""
    name = body["domain"]["name"]
    if skip != "MX":
        dns.set(name, "MX", *(f"{r['priority']} {r['value']}." for r in body["receiving_dns_records"]))
    for rec in body["sending_dns_records"]:
        if rec["record_type"] == "TXT" and rec["value"].startswith("v=spf1"):
            if skip != "SPF":
                dns.set(rec["name"], "TXT", txt(spf or rec["value"]), txt("google-site-verification=abc"))
        elif rec["record_type"] == "TXT":
            if skip != "DKIM":
                dns.set(rec["name"], "TXT", txt(rec["value"]))
        elif skip != "CNAME":
            dns.set(rec["name"], "CNAME", rec["value"] + ".")


def verify(server, name: str, version: str = "v3") -> dict:
    r = server.api("PUT", f"/{version}/domains/{name}/verify")
    assert r.status_code == 200, r.text
    return r.json()


def all_records(body: dict) -> list[dict]:
    return body["receiving_dns_records"] + body["sending_dns_records"]


def test_right_records_make_the_domain_active(server, domain):
    name = domain["domain"]["name"]
    publish(server.dns, domain)
    body = verify(server, name)
    assert body["domain"]["state"] == "active"
    assert [r["valid"] for r in all_records(body)] == ["valid"] * 5
    mx = sorted(r["value"] for r in body["receiving_dns_records"])
    for rec in body["receiving_dns_records"]:
        assert sorted(rec["cached"]) == mx
    spf, dkim_rec, cname = body["sending_dns_records"]
    assert sorted(spf["cached"]) == sorted([spf["value"], "google-site-verification=abc"])
    assert dkim_rec["cached"] == [dkim_rec["value"]] and len(dkim_rec["value"]) > 200
    assert cname["cached"] == [cname["value"]]
    # The result is stored: GET shows it, on both API versions, and the list shows the state.
    assert server.api("GET", f"/v3/domains/{name}").json() == {k: v for k, v in body.items() if k != "message"}
    assert server.api("GET", f"/v4/domains/{name}").json()["domain"]["state"] == "active"
    active = server.api("GET", "/v4/domains", params={"state": "active", "limit": 1000}).json()
    assert name in {d["name"] for d in active["items"]}
    [(state,)] = store_query(server, "SELECT state FROM domain WHERE name = ?", name)
    assert state == "active"
    # The server really asked the DNS server each question.
    for q in ((name + ".", "MX"), (name + ".", "TXT"), (dkim_rec["name"] + ".", "TXT"), (cname["name"] + ".", "CNAME")):
        assert q in server.dns.queries


def test_2048_bit_key_split_across_strings_verifies(server):
    body = created(server, f"w{uuid.uuid4().hex[:10]}.verify.test", dkim_key_size="2048")
    assert len(dkim_record(body)["value"]) > 255
    publish(server.dns, body)
    result = verify(server, body["domain"]["name"], "v4")
    assert result["domain"]["state"] == "active"
    assert dkim_record(result)["valid"] == "valid"


def test_wrong_spf_is_invalid_and_unverified(server, domain):
    name = domain["domain"]["name"]
    publish(server.dns, domain, spf="v=spf1 include:someone-else.example ~all")
    body = verify(server, name)
    assert body["domain"]["state"] == "unverified"
    spf = body["sending_dns_records"][0]
    assert spf["valid"] == "invalid"
    assert "v=spf1 include:someone-else.example ~all" in spf["cached"]
    assert [r["valid"] for r in all_records(body) if r is not spf] == ["valid"] * 4
    # Fixing the record and verifying again makes it active.
    publish(server.dns, domain)
    assert verify(server, name)["domain"]["state"] == "active"
    # Breaking it again takes the domain back to unverified.
    publish(server.dns, domain, spf="v=spf1 -all")
    again = verify(server, name)
    assert again["domain"]["state"] == "unverified" and again["sending_dns_records"][0]["valid"] == "invalid"


@pytest.mark.parametrize("missing", ["MX", "DKIM", "CNAME"])
def test_missing_record_is_invalid(server, domain, missing):
    publish(server.dns, domain, skip=missing)
    body = verify(server, domain["domain"]["name"])
    assert body["domain"]["state"] == "unverified"
    kinds = {"MX": body["receiving_dns_records"], "DKIM": [dkim_record(body)],
             "CNAME": [body["sending_dns_records"][-1]]}
    for rec in kinds[missing]:
        assert rec["valid"] == "invalid" and rec["cached"] == []
    invalid = [r for r in all_records(body) if r["valid"] != "valid"]
    assert len(invalid) == len(kinds[missing])


def test_wrong_dkim_key_is_invalid(server, domain):
    other = created(server, f"o{uuid.uuid4().hex[:10]}.verify.test")
    publish(server.dns, domain)
    server.dns.set(dkim_record(domain)["name"], "TXT", txt(dkim_record(other)["value"]))
    body = verify(server, domain["domain"]["name"])
    assert dkim_record(body)["valid"] == "invalid"
    assert dkim_record(body)["cached"] == [dkim_record(other)["value"]]
    assert body["domain"]["state"] == "unverified"


def test_servfail_is_unknown_and_unverified(server, domain):
    publish(server.dns, domain)
    server.dns.set_rcode(domain["sending_dns_records"][-1]["name"], "SERVFAIL")
    body = verify(server, domain["domain"]["name"])
    assert body["sending_dns_records"][-1]["valid"] == "unknown"
    assert body["domain"]["state"] == "unverified"


def test_record_change_after_verify_resets_its_result(server, domain):
    name = domain["domain"]["name"]
    publish(server.dns, domain)
    assert verify(server, name)["domain"]["state"] == "active"
    r = server.api("PUT", f"/v3/domains/{name}/web_prefix", data={"web_prefix": "trk"})
    assert r.status_code == 200
    body = server.api("GET", f"/v3/domains/{name}").json()
    cname = body["sending_dns_records"][-1]
    assert cname["name"] == f"trk.{name}" and cname["valid"] == "unknown" and cname["cached"] == []
    publish(server.dns, body)
    assert verify(server, name)["domain"]["state"] == "active"


def test_verify_unknown_domain_is_404(server):
    r = server.api("PUT", "/v3/domains/never-created.verify.test/verify")
    assert r.status_code == 404 and r.json() == {"message": "Domain not found"}
