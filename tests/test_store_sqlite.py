"""The SQLite permalink store, on real SQLite files, through a real reactor."""

from __future__ import annotations

import sqlite3

import pytest
from twisted.internet import task

from cellmux.server import store as store_module
from cellmux.server.store import (
    MIGRATIONS,
    DuplicateId,
    Permalink,
    PermalinkNotFound,
    SchemaTooNew,
    SQLiteStore,
    StoreFull,
    StoreUnavailable,
    create_permalink,
    open_store,
)
from db_fixtures import create_concurrently, reactor_thread


@pytest.fixture(scope="module")
def rt():
    return reactor_thread()


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "permalinks.sqlite3")


@pytest.fixture
def store(rt, db_path):
    s = SQLiteStore(rt.reactor, db_path, timeout=2.0)
    yield s
    rt.call(s.close)


def _create(rt, store, code="print(1)", options_json="{}"):
    return rt.call(
        create_permalink,
        store,
        code=code,
        language="python",
        options_json=options_json,
        now=1700000000.5,
    )


def test_round_trip(rt, store):
    made = _create(rt, store, code="x = 'é'\nprint(x)", options_json='{"a":1}')
    assert len(made.id) == 12
    assert rt.call(store.get, made.id) == made


def test_unknown_id(rt, store):
    with pytest.raises(PermalinkNotFound):
        rt.call(store.get, "nosuchid0000")


def test_schema_is_versioned_and_migrated_once(rt, store, db_path):
    made = _create(rt, store)
    assert rt.call(store.schema_version) == len(MIGRATIONS)
    rt.call(store.close)
    again = SQLiteStore(rt.reactor, db_path, timeout=2.0)
    try:
        assert rt.call(again.get, made.id) == made
        assert rt.call(again.schema_version) == len(MIGRATIONS)
    finally:
        rt.call(again.close)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM cellmux_schema").fetchone() == (1,)


def test_newer_schema_is_refused(rt, db_path):
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE cellmux_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO cellmux_schema VALUES (99)")
    s = SQLiteStore(rt.reactor, db_path, timeout=2.0)
    try:
        with pytest.raises(SchemaTooNew, match="version 99"):
            rt.call(s.get, "abc")
    finally:
        rt.call(s.close)


def test_duplicate_id_is_reported(rt, store):
    made = _create(rt, store)
    with pytest.raises(DuplicateId):
        rt.call(store.insert, Permalink(made.id, "other", "python", "{}", 1.0))


def test_create_tries_another_id_on_collision(rt, store, monkeypatch):
    first = _create(rt, store)
    ids = iter([first.id, first.id, "fresh-id-000"])
    monkeypatch.setattr(store_module, "new_permalink_id", lambda: next(ids))
    assert _create(rt, store).id == "fresh-id-000"


def test_a_thousand_concurrent_creations_get_unique_ids(rt, store, db_path):
    made = rt.call(create_concurrently, store, 1000)
    assert len({p.id for p in made}) == 1000
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(DISTINCT id) FROM permalinks").fetchone() == (1000,)
    assert rt.call(store.get, made[500].id).code == "n = 500"


def test_full_database_is_store_full(rt, db_path):
    # max_page_count makes SQLite itself report SQLITE_FULL.
    s = SQLiteStore(rt.reactor, db_path, timeout=2.0, pragmas={"max_page_count": 20})
    try:
        with pytest.raises(StoreFull):
            for i in range(200):
                _create(rt, s, code=f"{i}" + "x" * 4000)
        # still answers reads
        with pytest.raises(PermalinkNotFound):
            rt.call(s.get, "nosuchid0000")
    finally:
        rt.call(s.close)


def test_locked_database_is_unavailable_and_the_reactor_keeps_running(rt, store, db_path):
    _create(rt, store)
    ticks = []
    loop = rt.call(lambda: task.LoopingCall(ticks.append, None))
    rt.call(lambda: loop.start(0.05) and None)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable):
            _create(rt, store)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        rt.call(loop.stop)
    # the call waited ~1.6 s for the lock; the reactor ticked all along
    assert len(ticks) >= 15
    assert _create(rt, store).code == "print(1)"  # recovered


def test_open_store_chooses_sqlite(rt, tmp_path):
    for setting, path in [
        ("", f"{tmp_path}/permalinks.sqlite3"),
        (f"{tmp_path}/a.db", f"{tmp_path}/a.db"),
        (f"sqlite:///{tmp_path}/b.db", f"{tmp_path}/b.db"),
    ]:
        s = open_store(rt.reactor, setting, str(tmp_path), 1.0)
        assert isinstance(s, SQLiteStore)
        assert s.path == path
    with pytest.raises(ValueError, match="sqlite:///path"):
        open_store(rt.reactor, "sqlite://host/x.db", str(tmp_path), 1.0)
    with pytest.raises(ValueError, match="no permalink store plugin handles mysql"):
        open_store(rt.reactor, "mysql://x/y", str(tmp_path), 1.0)


def test_unreachable_file_is_unavailable(rt, tmp_path):
    s = SQLiteStore(rt.reactor, str(tmp_path / "no" / "such" / "dir.db"), timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable):
            rt.call(s.get, "abc")
    finally:
        rt.call(s.close)


def test_the_database_file_is_private(rt, store, db_path):
    import os

    _create(rt, store)
    for suffix in ("", "-wal", "-shm"):
        assert os.stat(db_path + suffix).st_mode & 0o777 == 0o600, suffix
