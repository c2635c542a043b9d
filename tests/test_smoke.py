"""The server starts, answers with JSON errors, and the printed key works."""


def test_unknown_path_is_404_json(server):
    r = server.api("GET", "/v3/nothing/here")
    assert r.status_code == 404
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"message": "Not found"}


def test_bad_key_is_401(server):
    r = server.api("GET", "/v1/keys", key="key-abc-def")
    assert r.status_code == 401
    assert r.json()["message"] == "Invalid private key"
    r = server.api("GET", "/v1/keys", key="")
    assert r.status_code == 401


def test_primary_key_lists_keys(server):
    r = server.api("GET", "/v1/keys")
    assert r.status_code == 200
    assert any(k["is_primary"] for k in r.json()["items"])
