"""cellmux's PostgreSQL permalink store, a plugin (docs/storage.md).

The core never imports this package: ``twisted/plugins/cellmux_postgres_store.py``
exposes it to ``twisted.plugin.getPlugins(IPermalinkStoreFactory)``, and the
server opens it for ``database = "postgresql://…"``.
"""

from .store import PostgresStore

__all__ = ["PostgresStore"]
