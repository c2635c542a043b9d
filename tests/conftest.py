"""Shared fixtures: a real mailplat process on loopback, the store URL (SQLite, or PostgreSQL in
the .ci/run second pass), and condition waits."""
from __future__ import annotations

import os
import uuid

import pytest

from tests.dnsserver import DnsServer
from tests.support import MailplatServer, pg_database, start_server

PG_BASE = os.environ.get("MAILPLAT_TEST_PG", "")


def pytest_collection_modifyitems(config, items):
    # The postgres parametrisations only run when the PostgreSQL pass asks for them.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec and callspec.params.get("store_kind") == "postgres":
            item.add_marker(pytest.mark.postgres)
            if not PG_BASE:
                item.add_marker(pytest.mark.skip(reason="MAILPLAT_TEST_PG is not set"))


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request):
    return request.param


@pytest.fixture
def db_url(store_kind, tmp_path):
    """A fresh, empty store URL of the kind under test."""
    if store_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with pg_database(PG_BASE) as url:
            yield url


@pytest.fixture(scope="module")
def dns_server():
    """A DNS server on loopback (the world's DNS, for tests)."""
    with DnsServer() as dns:
        yield dns


@pytest.fixture(scope="module")
def server(tmp_path_factory, dns_server) -> MailplatServer:
    """One mailplat (all services) for a test module, resolving through `dns_server`
    (as `server.dns`); on SQLite, or PostgreSQL when MAILPLAT_TEST_PG_SERVER is set too."""
    data_dir = tmp_path_factory.mktemp("mailplat")
    # The Domains API rate limit is tested on its own server; shared servers create many domains.
    sets = dns_sets(dns_server) + ["api.domains_rate_limit_per_minute=1000000"]
    pg = os.environ.get("MAILPLAT_TEST_PG_SERVER") and PG_BASE
    if pg:
        with pg_database(PG_BASE) as url:
            srv = start_server(data_dir, db_url=url, sets=sets)
            srv.dns = dns_server
            yield srv
            srv.stop()
    else:
        srv = start_server(data_dir, sets=sets)
        srv.dns = dns_server
        yield srv
        srv.stop()


def dns_sets(dns: DnsServer) -> list[str]:
    return ["dns.nameserver=127.0.0.1", f"dns.port={dns.port}", "dns.timeout=2.0"]


@pytest.fixture
def unique_domain() -> str:
    return f"d{uuid.uuid4().hex[:10]}.example.test"
