"""The PostgreSQL permalink store plugin, against a real PostgreSQL server
that these tests install (if needed), start, stop and start again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from twisted.internet import defer

from cellmux.server.store import (
    MIGRATIONS,
    PermalinkNotFound,
    StoreUnavailable,
    create_permalink,
    open_store,
)
from conftest import start_server
from db_fixtures import PostgresCluster, create_concurrently, postgres_processes, reactor_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def postgres():
    cluster = PostgresCluster.create()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def rt():
    return reactor_thread()


@pytest.fixture
def store(rt, postgres):
    s = open_store(rt.reactor, postgres.url, "/nonexistent", 3.0)
    yield s
    rt.call(s.close)


def _create(rt, store, code="print(1)"):
    return rt.call(
        create_permalink, store, code=code, language="python", options_json="{}", now=5.25
    )


def test_the_plugin_is_found_by_scheme_and_the_core_does_not_import_it(rt, postgres):
    s = open_store(rt.reactor, postgres.url.replace("postgresql:", "postgres:"), "/x", 1.0)
    assert type(s).__module__ == "cellmux_postgres.store"
    rt.call(s.close)
    code = (
        "import sys, cellmux.server.service, cellmux.tap\n"
        "assert 'cellmux_postgres' not in sys.modules, 'the core imported the plugin'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_round_trip_and_schema(rt, store):
    made = _create(rt, store, code="print('ü')")
    assert rt.call(store.get, made.id) == made
    assert rt.call(store.schema_version) == len(MIGRATIONS)
    with pytest.raises(PermalinkNotFound):
        rt.call(store.get, "nosuchid0000")


def test_several_servers_migrate_one_database_at_once(rt, postgres):
    # A fresh database; four stores (as four servers) race to migrate it.
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS racing")
        conn.execute("CREATE DATABASE racing")
    url = postgres.url.rsplit("/", 1)[0] + "/racing"
    stores = [open_store(rt.reactor, url, "/x", 10.0) for _ in range(4)]
    try:
        versions = rt.call(
            lambda: defer.gatherResults([s.schema_version() for s in stores], consumeErrors=True)
        )
        assert versions == [len(MIGRATIONS)] * 4
    finally:
        for s in stores:
            rt.call(s.close)


def test_a_thousand_concurrent_creations_get_unique_ids(rt, store, postgres):
    made = rt.call(create_concurrently, store, 1000)
    ids = {p.id for p in made}
    assert len(ids) == 1000
    import psycopg

    with psycopg.connect(postgres.url) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM permalinks WHERE id = ANY(%s)", (list(ids),)
        ).fetchone()
    assert count == 1000


def _call(server, method, path, body=None, token=True):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, method=method)
    if token:
        req.add_header("Authorization", "token " + server.token)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_database_down_gives_503_and_kernels_keep_executing(rt, store, postgres):
    server = start_server("--pool-size", "1", "--database", postgres.url)
    try:
        status, made = _call(server, "POST", "/permalink", {"code": "print('kept')"})
        assert status == 201, made
        assert _call(server, "GET", f"/permalink/{made['id']}", token=False)[1]["code"] == (
            "print('kept')"
        )
        # the store on the reactor thread sees it go down too
        assert rt.call(store.get, made["id"]).code == "print('kept')"
        with server.client() as client:
            model = client.create_kernel()
            with client.connect(model.id) as kernel:
                postgres.stop()
                try:
                    started = time.monotonic()
                    status, body = _call(server, "POST", "/permalink", {"code": "x"})
                    assert status == 503, body
                    assert "permalink database is unavailable" in body["message"]
                    status, body = _call(server, "GET", f"/permalink/{made['id']}", token=False)
                    assert status == 503, body
                    assert time.monotonic() - started < 10
                    with pytest.raises(StoreUnavailable):
                        rt.call(store.get, made["id"])
                    # running kernels are not affected
                    assert kernel.execute("6 * 7").result_text == "42"
                finally:
                    postgres.start()
                # back up: the same server recovers without a restart
                status, body = _call(server, "GET", f"/permalink/{made['id']}", token=False)
                assert status == 200, body
                assert body["code"] == "print('kept')"
                assert _call(server, "POST", "/permalink", {"code": "y"})[0] == 201
                assert kernel.execute("1 + 1").result_text == "2"
            client.delete_kernel(model.id)
    finally:
        server.stop()
    assert rt.call(store.get, made["id"]).code == "print('kept')"


def test_a_database_that_hangs_gives_unavailable_in_time(rt, postgres):
    s = open_store(rt.reactor, postgres.url, "/x", 1.5)
    made = _create(rt, s)
    frozen = postgres_processes(postgres)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"did not answer within 1\.5 s"):
            rt.call(s.get, made.id)
        assert time.monotonic() - started < 3
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert rt.call(s.get, made.id) == made
    rt.call(s.close)


def test_shares_and_their_revocation_outlive_a_restart_on_postgres(postgres):
    from cellmux.client import Client, HTTPError

    first = start_server("--database", postgres.url)
    try:
        client = first.client()
        kernel = client.create_kernel()
        kept = client.share_kernel(kernel.id, "observer")
        revoked = client.share_kernel(kernel.id, "collaborator")
        client.revoke_share(kernel.id, revoked["id"])
    finally:
        first.stop()
    second = start_server("--database", postgres.url)
    try:
        deadline = time.monotonic() + 15
        while "stored credential(s)" not in second.log():
            assert time.monotonic() < deadline, second.log()
            time.sleep(0.1)
        # The kept share authenticates (its kernel went with the old server).
        with pytest.raises(HTTPError) as caught:
            Client(second.url, token=kept["token"]).get_kernel(kernel.id)
        assert caught.value.status == 404
        with pytest.raises(HTTPError) as caught:
            Client(second.url, token=revoked["token"]).get_kernel(kernel.id)
        assert caught.value.status == 403
        second.client().revoke_share(kernel.id, kept["id"])
    finally:
        second.stop()
