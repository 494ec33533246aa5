# -*- test-case-name: tests.test_store_postgres -*-
"""Permalinks in PostgreSQL, for deployments with several servers.

psycopg 3 in its blocking form, on the store's private thread pool (the
reactor never waits on it). Several servers may share one database: the
schema migration takes a transaction-scoped advisory lock, so only one
server migrates and the others then see the new version.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors

from cellmux.server.store import (
    DuplicateId,
    StoreError,
    StoreFull,
    StoreUnavailable,
    ThreadedSQLStore,
)

__all__ = ["MIGRATION_LOCK", "PostgresStore"]

#: The advisory lock key that serialises migrations between servers
#: (an arbitrary constant: "cellmux" in ASCII).
MIGRATION_LOCK = 0x63656C6C6D7578

#: Connections per server. Each request holds one only for a statement or
#: two, so a few serve many clients; the database's max_connections is
#: shared by every server.
THREADS = 4


class PostgresStore(ThreadedSQLStore):
    """The L{IPermalinkStore} for ``postgresql://`` URLs (libpq's syntax)."""

    placeholder = "%s"

    def __init__(self, reactor, url: str, *, timeout: float = 5.0) -> None:
        super().__init__(reactor, threads=THREADS, timeout=timeout, name="cellmux-postgres")
        self.url = url

    def _connect(self) -> psycopg.Connection:
        # Both limits sit under the call's own timeout, so a database that
        # hangs ends as a driver error (and a dropped connection) first.
        return psycopg.connect(
            self.url,
            connect_timeout=max(1, int(self.timeout * 0.8)),
            options=f"-c statement_timeout={int(self.timeout * 800)}",
        )

    def _begin_migration(self, cursor: Any) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))

    def _translate(self, error: Exception) -> StoreError | None:
        if isinstance(error, errors.UniqueViolation):
            return DuplicateId(str(error))
        if isinstance(error, errors.DiskFull):
            return StoreFull("the permalink database is full")
        if isinstance(error, errors.InsufficientResources):
            return StoreUnavailable(f"the permalink database is out of resources: {error}")
        if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "?"
            return StoreUnavailable(f"cannot reach the permalink database ({first_line})")
        return None
