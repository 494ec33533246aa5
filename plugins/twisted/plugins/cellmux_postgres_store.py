"""Exposes cellmux's PostgreSQL permalink store to ``getPlugins``.

Kept light: psycopg is imported only when a server opens a
``postgresql://`` database, so scanning plugins never needs it.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from cellmux.config import ConfigError
from cellmux.interfaces import IPermalinkStoreFactory


@implementer(IPlugin, IPermalinkStoreFactory)
class PostgresStoreFactory:
    schemes = ("postgresql", "postgres")

    def open(self, reactor, url, timeout):
        try:
            from cellmux_postgres import PostgresStore
        except ImportError as e:
            # A setting this installation cannot serve: `cellmux serve` exits 2.
            raise ConfigError(
                f"database {url.split(':', 1)[0]}://… needs {e.name or 'psycopg'}, "
                "which is not installed: pip install 'cellmux[postgres]'"
            ) from e

        return PostgresStore(reactor, url, timeout=timeout)


postgres_store = PostgresStoreFactory()
