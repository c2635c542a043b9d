"""A damaged SQLite store: `serve` refuses to start with a clear message (no traceback),
`mailplat db check` names the damage, `mailplat db repair` (refused while mailplat runs) rebuilds
the store from every readable row, keeping the damaged file, and mailplat then serves the mail
it had accepted."""
from __future__ import annotations

import sqlite3
import subprocess

import pytest

from tests.support import MAILPLAT, ROOT, init_data_dir, run_cli, serve

pytestmark = pytest.mark.timeout(180)


def accept_mail(srv, n: int) -> str:
    dom = "repair.example.test"
    assert srv.api("POST", "/v3/domains", data={"name": dom}).status_code == 200
    for i in range(n):
        r = srv.api("POST", f"/v3/{dom}/messages", data={"from": f"a@{dom}", "to": f"r{i}@x.test",
                                                         "subject": f"kept {i}", "text": "x" * 300,
                                                         "o:testmode": "yes"})
        assert r.status_code == 200, r.text
    return dom


def damage_page(db_path, page: int, fill: bytes = b"\xff" * 200) -> None:
    size = sqlite3.connect(db_path).execute("PRAGMA page_size").fetchone()[0]
    with open(db_path, "r+b") as f:
        f.seek((page - 1) * size + 8)
        f.write(fill)


def rootpage(db_path, name: str) -> int:
    con = sqlite3.connect(db_path)
    try:
        return con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
    finally:
        con.close()


def test_damaged_index_is_repaired_without_losing_a_row(tmp_path):
    data = tmp_path / "data"
    key = init_data_dir(data)
    srv = serve(data, key, ["api"])
    dom = accept_mail(srv, 40)
    r = run_cli(data, "db", "repair", check=False)
    assert r.returncode == 1 and "is running" in r.stderr  # never under a live mailplat
    assert srv.stop() == 0

    db = data / "mailplat.db"
    assert run_cli(data, "db", "check").stdout.strip() == "ok"
    damage_page(db, rootpage(db, "event_domain_timestamp"))
    checked = run_cli(data, "db", "check", check=False)
    assert checked.returncode == 1 and checked.stdout.strip() not in ("", "ok")

    repaired = run_cli(data, "db", "repair")
    assert "message: 40 rows kept" in repaired.stdout and "lost" not in repaired.stdout
    assert "queue_item: 40 rows kept" in repaired.stdout and "event: 40 rows kept" in repaired.stdout
    assert list(data.glob("mailplat.db.damaged-*"))
    assert run_cli(data, "db", "check").stdout.strip() == "ok"

    srv = serve(data, key, ["api"])
    try:
        items = srv.api("GET", f"/v3/{dom}/events", params={"event": "accepted", "limit": 300}).json()["items"]
        assert sorted(int(e["message"]["headers"]["subject"].split()[1]) for e in items) == list(range(40))
        assert srv.api("GET", f"/v3/{dom}/events", params={"subject": "kept 7"}).json()["items"]
    finally:
        srv.stop()


def test_damaged_table_page_keeps_every_readable_row(tmp_path):
    data = tmp_path / "data"
    key = init_data_dir(data)
    srv = serve(data, key, ["api"])
    accept_mail(srv, 60)
    assert srv.stop() == 0
    db = data / "mailplat.db"
    con = sqlite3.connect(db)
    pages = [p for (p,) in con.execute("SELECT pageno FROM dbstat WHERE name = 'event' AND pagetype = 'leaf'")] \
        if con.execute("SELECT 1 FROM pragma_module_list WHERE name = 'dbstat'").fetchone() else []
    con.close()
    if len(pages) < 3:
        pytest.skip("SQLite here has no dbstat table to find a leaf page of the event table")
    damage_page(db, pages[1], b"\x00\x00\x00\xff\xff" * 40)
    out = run_cli(data, "db", "repair").stdout
    kept = int(out.split("event: ")[1].split(" rows kept")[0])
    lost = int(out.split("event: ")[1].split(", ")[1].split(" unreadable")[0]) if "unreadable" in out else 0
    assert 0 < kept < 60 and kept + lost <= 60
    assert "message: 60 rows kept" in out  # the other tables lose nothing
    assert run_cli(data, "db", "check").stdout.strip() == "ok"


def test_unreadable_store_refuses_to_start_with_a_clear_message(tmp_path):
    data = tmp_path / "data"
    init_data_dir(data)
    with open(data / "mailplat.db", "r+b") as f:
        f.write(b"not a database at all")
    proc = subprocess.run(MAILPLAT + ["serve", "--data-dir", str(data)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert "cannot be read" in proc.stderr and "mailplat db repair" in proc.stderr
    assert "Traceback" not in proc.stderr
