"""Exposes cellmux's PostgreSQL permalink store to ``getPlugins``.

Kept light: psycopg is imported only when a server opens a
``postgresql://`` database, so scanning plugins never needs it.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from cellmux.interfaces import IPermalinkStoreFactory


@implementer(IPlugin, IPermalinkStoreFactory)
class PostgresStoreFactory:
    schemes = ("postgresql", "postgres")

    def open(self, reactor, url, timeout):
        from cellmux_postgres import PostgresStore

        return PostgresStore(reactor, url, timeout=timeout)


postgres_store = PostgresStoreFactory()
