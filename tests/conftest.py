"""Shared fixtures: a real mailplat process on loopback, the store URL (SQLite, or PostgreSQL in
the .ci/run second pass), and condition waits."""
from __future__ import annotations

import os
import uuid

import pytest

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
def server(tmp_path_factory) -> MailplatServer:
    """One mailplat (all services) for a test module, on SQLite unless MAILPLAT_TEST_PG_SERVER."""
    data_dir = tmp_path_factory.mktemp("mailplat")
    pg = os.environ.get("MAILPLAT_TEST_PG_SERVER") and PG_BASE
    if pg:
        with pg_database(PG_BASE) as url:
            srv = start_server(data_dir, db_url=url)
            yield srv
            srv.stop()
    else:
        srv = start_server(data_dir)
        yield srv
        srv.stop()


@pytest.fixture
def unique_domain() -> str:
    return f"d{uuid.uuid4().hex[:10]}.example.test"
