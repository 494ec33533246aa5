# -*- test-case-name: tests.test_store_sqlite -*-
"""The permalink store: values, errors, the SQLite backend, and the choice
of backend by URL.

Database drivers block, so every call runs on a private thread pool (one
connection per thread) and the reactor only sees Deferreds. The schema is
versioned in a ``cellmux_schema`` table and migrated on first use, not at
start-up: a database that is down when the server starts costs 503s, not the
server. Other databases plug in through L{IPermalinkStoreFactory} plugins
(docs/storage.md); they may build on L{ThreadedSQLStore}.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from cellmux.interfaces import ICredentialStore, IPermalinkStore, IPermalinkStoreFactory

__all__ = [
    "DEFAULT_DATABASE",
    "MIGRATIONS",
    "Credential",
    "DuplicateId",
    "Permalink",
    "PermalinkNotFound",
    "SQLiteStore",
    "SchemaTooNew",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "ThreadedSQLStore",
    "adopt_old_default_database",
    "create_permalink",
    "new_permalink_id",
    "open_store",
]

_log = Logger()

#: Random bytes in a permalink id: 72 bits, 12 URL-safe characters. Short
#: enough to paste, far too many to guess or to collide by chance.
ID_BYTES = 9
#: Tries with fresh ids before a creation gives up (a collision is ~2^-60).
ID_TRIES = 5


class StoreError(Exception):
    """Something the permalink store could not do."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, is locked, or did not answer in time."""


class StoreFull(StoreUnavailable):
    """The database has no room left."""


class SchemaTooNew(StoreUnavailable):
    """The database was migrated by a newer cellmux than this one."""


class DuplicateId(StoreError):
    """The id is already taken."""


class PermalinkNotFound(StoreError):
    """No permalink has this id."""


@attrs.frozen
class Permalink:
    """Stored code: what a shared link brings back."""

    id: str
    code: str
    language: str
    #: Client options (e.g. which console layout); any JSON object, kept as text.
    options_json: str
    #: Seconds since the epoch.
    created: float


def new_permalink_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


async def create_permalink(
    store: IPermalinkStore, *, code: str, language: str, options_json: str, now: float
) -> Permalink:
    """Store code under a fresh id, trying another id on a collision."""
    for _ in range(ID_TRIES):
        permalink = Permalink(new_permalink_id(), code, language, options_json, now)
        try:
            await store.insert(permalink)
        except DuplicateId:
            continue
        return permalink
    raise StoreUnavailable(f"no free id after {ID_TRIES} tries")


#: The schema, one list of statements per version (index 0 makes version 1).
#: Append new versions; never edit a released one. The SQL is portable
#: between SQLite and PostgreSQL.
MIGRATIONS: Sequence[Sequence[str]] = (
    (
        """CREATE TABLE permalinks (
            id VARCHAR(64) PRIMARY KEY,
            code TEXT NOT NULL,
            language VARCHAR(64) NOT NULL,
            options TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL
        )""",
    ),
    # Version 2: share tokens, login cookies and anonymous capabilities, so
    # that a restart keeps them (docs/security.md). Only SHA-256 digests of
    # the secrets are stored.
    (
        """CREATE TABLE credentials (
            digest VARCHAR(64) PRIMARY KEY,
            kind VARCHAR(16) NOT NULL,
            id VARCHAR(64) NOT NULL,
            role VARCHAR(16) NOT NULL,
            kernel_id VARCHAR(64),
            share_id VARCHAR(64),
            user_name VARCHAR(128),
            principal VARCHAR(64),
            created DOUBLE PRECISION NOT NULL,
            expires DOUBLE PRECISION
        )""",
        "CREATE INDEX credentials_kernel ON credentials (kernel_id)",
        "CREATE INDEX credentials_share ON credentials (share_id)",
    ),
)


@attrs.frozen
class Credential:
    """One stored credential: a share token, a login cookie or a capability.

    @ivar digest: hex SHA-256 of the secret (the secret is never stored).
    @ivar kind: C{"share"}, C{"login"} or C{"capability"}.
    @ivar id: its public id (a share's id; a login's or capability's own).
    @ivar share_id: what revoking cuts it off with (a share's logins carry
        their share's id; a capability its own).
    @ivar user_name: the named token a login stands for.
    @ivar principal: for logins of the server token or of a named token, a
        digest of that token, so that a changed token ends its logins.
    @ivar expires: seconds since the epoch, or None for never.
    """

    digest: str
    kind: str
    id: str
    role: str
    kernel_id: str | None
    share_id: str | None
    user_name: str | None
    principal: str | None
    created: float
    expires: float | None


_CREDENTIAL_COLUMNS = (
    "digest, kind, id, role, kernel_id, share_id, user_name, principal, created, expires"
)


@implementer(IPermalinkStore, ICredentialStore)
class ThreadedSQLStore:
    """A DB-API database behind a private thread pool.

    Subclasses say how to connect (L{_connect}), how driver errors map onto
    L{StoreError}s (L{_translate}) and their parameter style. A connection
    that failed is closed and replaced on the next call, so the store
    recovers by itself when the database comes back.

    @ivar timeout: seconds a call may take before it fails with
        L{StoreUnavailable} (the thread may still finish; its result is dropped).
    """

    log = Logger()
    #: The driver's placeholder for a query parameter.
    placeholder = "?"

    def __init__(self, reactor, *, threads: int, timeout: float, name: str) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Any] = []
        self._schema_ready = False
        self._shutdown_trigger = None
        self._closed = False

    # -- hooks ------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _translate(self, error: Exception) -> StoreError | None:
        """The StoreError for a driver error, or None if it is a bug."""
        return None

    def _begin_migration(self, cursor: Any) -> None:
        """Start the migration's transaction (and lock out other servers)."""

    # -- running work -------------------------------------------------------------

    def run(self, work: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Call C{work(connection, *args)} in a pool thread, then commit."""
        if self._closed:
            return defer.fail(StoreUnavailable("the store is closed"))
        if not self._pool.started:
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._stop_pool
            )
        d = threads.deferToThreadPool(self._reactor, self._pool, self._in_thread, work, *args)
        d.addTimeout(self.timeout, self._reactor)
        d.addErrback(self._timed_out)
        return d

    def _timed_out(self, failure):
        failure.trap(defer.TimeoutError)
        raise StoreUnavailable(f"the database did not answer within {self.timeout:g} s")

    def _in_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        conn = None
        try:
            conn = self._connection()
            if not self._schema_ready:
                with self._lock:
                    if not self._schema_ready:
                        self._migrate(conn)
                        self._schema_ready = True
            result = work(conn, *args)
            conn.commit()
            return result
        except StoreError as e:
            if conn is not None:
                self._rollback(conn, drop=isinstance(e, StoreUnavailable))
            raise
        except Exception as e:
            error = self._translate(e)
            if conn is not None:
                self._rollback(conn, drop=not isinstance(error, DuplicateId))
            if error is None:
                raise
            raise error from e

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._connect()
            except Exception as e:
                error = self._translate(e)
                if error is None:
                    raise
                raise error from e
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _rollback(self, conn: Any, *, drop: bool) -> None:
        with contextlib.suppress(Exception):
            conn.rollback()
        if drop:
            self._local.conn = None
            with self._lock, contextlib.suppress(ValueError):
                self._connections.remove(conn)
            with contextlib.suppress(Exception):
                conn.close()

    def _sql(self, query: str) -> str:
        return query.replace("?", self.placeholder)

    # -- the schema ---------------------------------------------------------------

    def _migrate(self, conn: Any) -> None:
        cur = conn.cursor()
        self._begin_migration(cur)
        cur.execute("CREATE TABLE IF NOT EXISTS cellmux_schema (version INTEGER NOT NULL)")
        cur.execute("SELECT version FROM cellmux_schema")
        row = cur.fetchone()
        if row is None:
            cur.execute("INSERT INTO cellmux_schema (version) VALUES (0)")
            version = 0
        else:
            version = int(row[0])
        if version > len(MIGRATIONS):
            raise SchemaTooNew(
                f"the database schema is version {version}; this cellmux knows up to "
                f"{len(MIGRATIONS)}: upgrade cellmux"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[number - 1]:
                cur.execute(statement)
            cur.execute(self._sql("UPDATE cellmux_schema SET version = ?"), (number,))
            # Logged from the reactor: this runs in a pool thread.
            self._reactor.callFromThread(
                self.log.info, "permalink database migrated to version {version}", version=number
            )
        conn.commit()

    def schema_version(self) -> defer.Deferred:
        def work(conn):
            cur = conn.cursor()
            cur.execute("SELECT version FROM cellmux_schema")
            return int(cur.fetchone()[0])

        return self.run(work)

    # -- IPermalinkStore --------------------------------------------------------------

    def insert(self, permalink: Permalink) -> defer.Deferred:
        def work(conn):
            conn.cursor().execute(
                self._sql(
                    "INSERT INTO permalinks (id, code, language, options, created) "
                    "VALUES (?, ?, ?, ?, ?)"
                ),
                (
                    permalink.id,
                    permalink.code,
                    permalink.language,
                    permalink.options_json,
                    permalink.created,
                ),
            )

        return self.run(work)

    def get(self, permalink_id: str) -> defer.Deferred:
        def work(conn):
            cur = conn.cursor()
            cur.execute(
                self._sql(
                    "SELECT id, code, language, options, created FROM permalinks WHERE id = ?"
                ),
                (permalink_id,),
            )
            row = cur.fetchone()
            if row is None:
                raise PermalinkNotFound(f"no permalink {permalink_id}")
            return Permalink(row[0], row[1], row[2], row[3], float(row[4]))

        return self.run(work)

    # -- credentials (ICredentialStore) --------------------------------------------

    def insert_credential(self, credential: Credential) -> defer.Deferred:
        def work(conn):
            conn.cursor().execute(
                self._sql(
                    f"INSERT INTO credentials ({_CREDENTIAL_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                attrs.astuple(credential),
            )

        return self.run(work)

    def load_credentials(self, now: float) -> defer.Deferred:
        """Every credential that has not expired (expired ones are deleted)."""

        def work(conn):
            cur = conn.cursor()
            cur.execute(
                self._sql("DELETE FROM credentials WHERE expires IS NOT NULL AND expires <= ?"),
                (now,),
            )
            cur.execute(f"SELECT {_CREDENTIAL_COLUMNS} FROM credentials ORDER BY created")
            return [
                Credential(*row[:8], float(row[8]), None if row[9] is None else float(row[9]))
                for row in cur.fetchall()
            ]

        return self.run(work)

    def delete_credentials(
        self,
        digest: str | None = None,
        kernel_id: str | None = None,
        share_id: str | None = None,
    ) -> defer.Deferred:
        """Delete the credentials matching every given field; fires with how many."""
        where = [
            (n, v)
            for n, v in (("digest", digest), ("kernel_id", kernel_id), ("share_id", share_id))
            if v is not None
        ]
        if not where:
            raise ValueError("delete_credentials needs a condition")

        def work(conn):
            cur = conn.cursor()
            clause = " AND ".join(f"{name} = ?" for name, _ in where)
            cur.execute(self._sql(f"DELETE FROM credentials WHERE {clause}"), [v for _, v in where])
            return cur.rowcount

        return self.run(work)

    def close(self) -> defer.Deferred:
        self._closed = True
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if not self._pool.started:
            return defer.succeed(None)
        # Joining the threads blocks until their calls end: not in the reactor.
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._stop_pool
        )

    def _stop_pool(self) -> None:
        self._pool.stop()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.close()


class SQLiteStore(ThreadedSQLStore):
    """Permalinks in one SQLite file: the embedded default.

    One thread: SQLite takes one writer at a time anyway. WAL mode lets other
    processes read while it writes.

    @param pragmas: extra integer C{PRAGMA}s for each connection (tests use
        C{max_page_count} to fill the database for real).
    """

    def __init__(
        self,
        reactor,
        path: str,
        *,
        timeout: float = 5.0,
        pragmas: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(reactor, threads=1, timeout=timeout, name="cellmux-sqlite")
        self.path = path
        self._pragmas = dict(pragmas or {})

    def _connect(self) -> sqlite3.Connection:
        # Private from the start: kernels may know the runtime directory's
        # path, and must not read every id (SQLite gives its -wal and -shm
        # files the database file's mode).
        with contextlib.suppress(OSError):  # exists; or sqlite3 says why not
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # isolation_level=None: each statement commits by itself; the
        # migration opens its own transaction. The busy timeout is shorter
        # than the call's, so a lock ends as "locked", not as a time-out.
        conn = sqlite3.connect(
            self.path,
            timeout=self.timeout * 0.8,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # Durable against crashes of the server; WAL makes this safe.
        conn.execute("PRAGMA synchronous=NORMAL")
        for name, value in self._pragmas.items():
            if not name.isidentifier():
                raise ValueError(f"bad pragma {name!r}")
            conn.execute(f"PRAGMA {name}={int(value)}")
        return conn

    def _begin_migration(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")

    def _translate(self, error: Exception) -> StoreError | None:
        if isinstance(error, sqlite3.IntegrityError):
            return DuplicateId(str(error))
        code = getattr(error, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            return StoreFull("the permalink database is full")
        if isinstance(error, sqlite3.DatabaseError):
            return StoreUnavailable(f"the permalink database failed: {error}")
        return None


#: The default SQLite file's name, in the state directory.
DEFAULT_DATABASE = "permalinks.sqlite3"


def sqlite_path(database: str, default_dir: str) -> str | None:
    """The SQLite file a C{database} setting names, or None for another URL.

    @param default_dir: where the file lives when the setting is empty (the
        state directory: no server ever removes it).
    @raise ValueError: for a malformed sqlite: URL.
    """
    if not database:
        return os.path.join(default_dir, DEFAULT_DATABASE)
    scheme = urllib.parse.urlsplit(database).scheme
    if scheme == "sqlite":
        # sqlite:///relative/path and sqlite:////absolute/path, as SQLAlchemy has it.
        if not database.startswith("sqlite:///"):
            raise ValueError(f"a SQLite URL is sqlite:///path, not {database!r}")
        return database[len("sqlite:///") :]
    if len(scheme) <= 1:  # a plain path (or a Windows drive letter)
        return database
    return None


def adopt_old_default_database(old: str, new: str) -> str:
    """Move permalinks from where older cellmux versions kept the default file.

    That was the runtime directory, which a crash and a restart could
    remove. If C{old} exists and C{new} does not, its content is copied
    (SQLite's online backup, so a -wal file's commits come along) into
    C{new}, and C{old} is renamed to C{old}.migrated, never deleted. Blocks:
    run it in a thread, once, at start.

    @return: the path to use: C{new}, or C{old} if the copy failed (logged).
    """
    if os.path.exists(new) or not os.path.isfile(old):
        return new
    partial = new + ".migrating"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        source = sqlite3.connect(old)
        try:
            target = sqlite3.connect(partial)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()
        os.replace(partial, new)
        os.replace(old, old + ".migrated")
    except (OSError, sqlite3.Error) as e:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        _log.error(
            "could not move the permalink database {old} to {new} ({error}); using it "
            "where it is for now",
            old=old,
            new=new,
            error=e,
        )
        return old
    _log.info(
        "moved the permalink database from {old} to {new}; the old file is kept as {old}.migrated",
        old=old,
        new=new,
    )
    return new


def _plugin_factories() -> list[IPermalinkStoreFactory]:
    import twisted.plugins
    from twisted.plugin import getPlugins

    return list(getPlugins(IPermalinkStoreFactory, twisted.plugins))


def open_store(reactor, database: str, default_dir: str, timeout: float) -> IPermalinkStore:
    """The store for a C{database} setting: SQLite, or the plugin for its scheme.

    Does no database I/O.

    @param default_dir: the directory of the default SQLite file.
    @raise ValueError: if the setting names a scheme no plugin handles.
    """
    path = sqlite_path(database, default_dir)
    if path is not None:
        return SQLiteStore(reactor, path, timeout=timeout)
    scheme = urllib.parse.urlsplit(database).scheme.lower()
    for factory in _plugin_factories():
        if scheme in tuple(factory.schemes):
            return factory.open(reactor, database, timeout)
    raise ValueError(
        f"no permalink store plugin handles {scheme}:// URLs (is its plugin installed?)"
    )
