"""Share tokens, login cookies and capabilities are kept in the database:
a restart keeps them, a revocation is immediate and lasts, a database
that is down costs a clear error for that request and nothing else."""

from __future__ import annotations

import os
import re
import secrets
import sqlite3

from cellmux.server.auth import COOKIE_NAME
from conftest import start_server, wait_for
from http_helpers import request, token


def cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={value}"}


def login(server, credential: str) -> tuple[str, dict]:
    """POST /login with a token; the cookie it set and the answer."""
    status, headers, body = request(server.url, "POST", "/login", token(credential))
    assert status == 200, body
    set_cookie = headers.get("set-cookie")
    match = re.match(rf"{COOKIE_NAME}=([^;]+)", set_cookie)
    return match.group(1), body | {"set-cookie": set_cookie}


def test_shares_and_logins_outlive_a_restart_and_revocations_are_immediate(tmp_path):
    database = str(tmp_path / "credentials.sqlite3")
    owner = secrets.token_hex(16)
    first = start_server("--database", database, "--token", owner)
    try:
        client = first.client()
        kernel = client.create_kernel()
        kept = client.share_kernel(kernel.id, "collaborator")
        revoked = client.share_kernel(kernel.id, "observer")
        owner_cookie, answer = login(first, owner)
        assert answer["lasting"] is True
        # a lasting cookie outlives the browser session
        assert "Max-Age=2592000" in answer["set-cookie"]
        share_cookie, _ = login(first, kept["token"])
        revoked_cookie, _ = login(first, revoked["token"])
        for credential in (token(kept["token"]), cookie(share_cookie), token(revoked["token"])):
            assert request(first.url, "GET", f"/api/kernels/{kernel.id}", credential)[0] == 200

        # Revoking ends the share and the logins made with it at once.
        client.revoke_share(kernel.id, revoked["id"])
        for credential in (token(revoked["token"]), cookie(revoked_cookie)):
            status, _, body = request(first.url, "GET", f"/api/kernels/{kernel.id}", credential)
            assert status == 403, body
        assert [s["id"] for s in client.list_shares(kernel.id)] == [kept["id"]]
    finally:
        first.stop()
    # Only digests are stored.
    with sqlite3.connect(database) as conn:
        stored = " ".join(str(v) for row in conn.execute("SELECT * FROM credentials") for v in row)
    for secret in (owner, kept["token"], owner_cookie, share_cookie):
        assert secret not in stored

    second = start_server("--database", database, "--token", owner)
    try:
        wait_for(lambda: "loaded 3 stored credential(s)" in second.log(), timeout=15)
        status, _, body = request(second.url, "GET", "/api/kernels", cookie(owner_cookie))
        assert status == 200 and body == []
        # The share still authenticates: its kernel is gone with the old server.
        for credential in (token(kept["token"]), cookie(share_cookie)):
            status, _, body = request(second.url, "GET", f"/api/kernels/{kernel.id}", credential)
            assert status == 404, body
        # The revoked share stays revoked.
        for credential in (token(revoked["token"]), cookie(revoked_cookie)):
            status, _, body = request(second.url, "GET", f"/api/kernels/{kernel.id}", credential)
            assert status == 403, body
        # The owner may still list and revoke the shares of a kernel that is gone.
        client = second.client()
        assert [s["id"] for s in client.list_shares(kernel.id)] == [kept["id"]]
        client.revoke_share(kernel.id, kept["id"])
        assert request(second.url, "GET", "/api/", cookie(share_cookie))[0] == 403
    finally:
        second.stop()

    # A server with another token does not honour the old owner's logins.
    third = start_server("--database", database)
    try:
        wait_for(lambda: "stored credential(s)" in third.log(), timeout=15)
        assert request(third.url, "GET", "/api/kernels", cookie(owner_cookie))[0] == 403
        assert request(third.url, "GET", "/api/", cookie(share_cookie))[0] == 403
    finally:
        third.stop()
    with sqlite3.connect(database) as conn:
        # the stale owner login was deleted, the revoked share's logins too
        assert conn.execute("SELECT COUNT(*) FROM credentials").fetchone() == (0,)


def test_a_database_that_is_down_costs_a_clear_error_and_the_server_recovers(tmp_path):
    missing = tmp_path / "not-yet"
    database = str(missing / "credentials.sqlite3")
    server = start_server("--database", database)
    try:
        wait_for(lambda: "cannot load stored credentials" in server.log(), timeout=15)
        client = server.client()
        kernel = client.create_kernel()  # kernels do not need the database
        status, _, body = request(
            server.url,
            "POST",
            f"/api/kernels/{kernel.id}/shares",
            token(server.token) | {"Content-Type": "application/json"},
            {"role": "observer"},
        )
        assert status == 503, body
        assert "credential database is unavailable" in body["message"]
        # A cookie the server cannot check yet: 503, not a misleading 403.
        status, _, body = request(server.url, "GET", "/api/kernels", cookie("some-stored-login"))
        assert status == 503 and "try again" in body["message"]
        # Logging in still works, for as long as this server runs.
        owner_cookie, answer = login(server, server.token)
        assert answer["lasting"] is False and "Max-Age" not in answer["set-cookie"]
        assert request(server.url, "GET", "/api/kernels", cookie(owner_cookie))[0] == 200

        os.mkdir(missing)  # the database comes back
        wait_for(lambda: "loaded 0 stored credential(s)" in server.log(), timeout=20)
        share = client.share_kernel(kernel.id, "observer")
        assert (
            request(server.url, "GET", f"/api/kernels/{kernel.id}", token(share["token"]))[0] == 200
        )
        assert request(server.url, "GET", "/api/kernels", cookie("some-stored-login"))[0] == 403
        client.delete_kernel(kernel.id)
        assert server.alive()
    finally:
        server.stop()


def test_a_kernel_shut_down_by_its_client_takes_its_shares_along(tmp_path):
    database = str(tmp_path / "credentials.sqlite3")
    server = start_server("--database", database)
    try:
        client = server.client()
        kernel = client.create_kernel()
        share = client.share_kernel(kernel.id, "collaborator")
        login(server, share["token"])
        with client.connect(kernel.id) as connection:
            connection.shutdown()  # over the websocket, not DELETE /api/kernels

        def forgotten() -> bool:
            with sqlite3.connect(database) as conn:
                return conn.execute("SELECT COUNT(*) FROM credentials").fetchone() == (0,)

        wait_for(forgotten, timeout=15)
        assert request(server.url, "GET", "/api/", token(share["token"]))[0] == 403
    finally:
        server.stop()
