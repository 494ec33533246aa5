"""Permalinks through a real server (SQLite, the default store)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.server.api import HTTPError
from cellmux.server.permalinks import MAX_CODE, MAX_INLINE, decode_inline, encode_inline


def call(server, method, path, body=None, *, token=True, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, method=method)
    if token:
        req.add_header("Authorization", "token " + server.token)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read()), e.headers


def test_create_then_fetch_without_the_token(server):
    status, made, headers = call(
        server,
        "POST",
        "/permalink",
        {"code": "print('hi ✓')", "language": "python", "options": {"layout": "wide"}},
    )
    assert status == 201
    assert headers["location"] == f"/permalink/{made['id']}"
    assert len(made["id"]) == 12
    status, got, _ = call(server, "GET", f"/permalink/{made['id']}", token=False)
    assert status == 200
    assert got == made
    assert got["code"] == "print('hi ✓')"
    assert got["options"] == {"layout": "wide"}
    # the default SQLite store created its schema on first use
    assert "permalink database migrated to version 1" in server.log()


def test_creating_needs_the_token(server):
    status, body, _ = call(server, "POST", "/permalink", {"code": "1"}, token=False)
    assert status == 403
    assert body["message"] == "a valid token is required"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"code": 3}, 400),
        ({"code": "1", "language": ""}, 400),
        ({"code": "1", "options": [1]}, 400),
        ({"code": "x" * (MAX_CODE + 1)}, 413),
    ],
)
def test_bad_creations_get_clear_errors(server, body, status):
    got, answer, _ = call(server, "POST", "/permalink", body)
    assert got == status
    assert answer["message"]
    assert answer["reason"]


def test_not_json_and_unknown_ids(server):
    assert call(server, "POST", "/permalink", raw=b"{nope")[0] == 400
    status, body, _ = call(server, "GET", "/permalink/AAAAAAAAAAAA", token=False)
    assert status == 404
    assert "no permalink" in body["message"]
    assert call(server, "GET", "/permalink/a.b", token=False)[0] == 404
    assert call(server, "DELETE", "/permalink/AAAAAAAAAAAA")[0] == 405


def test_concurrent_creations_over_http_are_unique(server):
    def create(i):
        status, body, _ = call(server, "POST", "/permalink", {"code": f"n = {i}"})
        assert status == 201, body
        return body["id"], i

    with ThreadPoolExecutor(32) as pool:
        made = list(pool.map(create, range(200)))
    assert len({pid for pid, _ in made}) == 200
    for pid, i in made[::40]:
        assert call(server, "GET", f"/permalink/{pid}", token=False)[1]["code"] == f"n = {i}"


def test_inline_links_need_no_database(server):
    code = "for i in range(3):\n    print(i)\n" * 20
    status, made, _ = call(server, "POST", "/permalink/inline", {"code": code, "options": {"a": 1}})
    assert status == 200
    assert made["url"] == f"/permalink/z/{made['inline']}"
    assert len(made["inline"]) < len(code)  # it is compressed
    status, got, _ = call(server, "GET", made["url"], token=False)
    assert status == 200
    assert (got["code"], got["language"], got["options"]) == (code, "python", {"a": 1})


def test_bad_inline_links(server):
    assert call(server, "GET", "/permalink/z/notbase64zlib", token=False)[0] == 400
    assert call(server, "GET", "/permalink/z/", token=False)[0] == 400
    # a small blob that inflates to megabytes is refused, not inflated
    bomb = base64.urlsafe_b64encode(zlib.compress(b" " * 8_000_000, 9)).rstrip(b"=").decode()
    assert len(bomb) < MAX_INLINE
    status, body, _ = call(server, "GET", f"/permalink/z/{bomb}", token=False)
    assert status == 413, body
    # not an object / wrong fields
    not_object = base64.urlsafe_b64encode(zlib.compress(b"[1]")).decode()
    assert call(server, "GET", f"/permalink/z/{not_object}", token=False)[0] == 400
    too_long = call(server, "POST", "/permalink/inline", {"code": str(list(range(20000)))})
    assert too_long[0] == 413
    assert "POST /permalink" in too_long[1]["message"]


@given(
    st.text(max_size=300),
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)
def test_inline_encoding_round_trips(code, language, options):
    options_json = json.dumps(options, separators=(",", ":"), sort_keys=True)
    blob = encode_inline(code, language, options_json)
    assert set(blob) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_inline(blob) == (code, language, options_json)


def test_inline_refuses_lone_surrogates():
    blob = encode_inline("\ud800", "python", "{}")
    with pytest.raises(HTTPError, match="not valid Unicode"):
        decode_inline(blob)
