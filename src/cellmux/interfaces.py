"""The interfaces plugins implement.

The core finds plugins with C{twisted.plugin.getPlugins(Interface)} and never
imports a plugin module itself. A plugin is a module in a ``twisted/plugins/``
directory holding an object that provides both C{twisted.plugin.IPlugin} and
one of these interfaces (docs/plugins.md, docs/storage.md).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["ICredentialStore", "IPermalinkStore", "IPermalinkStoreFactory"]


class IPermalinkStore(Interface):
    """Where permalinks are kept. Every method returns a Deferred and never
    blocks the reactor.

    Failures are L{cellmux.server.store.StoreError}s:
    C{StoreUnavailable} (the database cannot be reached, is locked or too
    slow), C{StoreFull} (it has no room), C{DuplicateId} (L{insert} only) and
    C{PermalinkNotFound} (L{get} only). Anything else is a bug.
    """

    def insert(permalink):
        """Store a L{cellmux.server.store.Permalink}; fails with
        C{DuplicateId} if its id is taken (the caller picks another)."""

    def get(permalink_id):
        """The L{cellmux.server.store.Permalink} with this id."""

    def close():
        """Release connections and threads; a Deferred that fires when done."""


class ICredentialStore(Interface):
    """Where share tokens, login cookies and capabilities outlive a restart
    (a store may also provide this; one that does not keeps them in memory).

    Records are L{cellmux.server.store.Credential}s, which hold only digests
    of the secrets. Every method returns a Deferred; failures as above.
    """

    def insert_credential(credential):
        """Store a credential."""

    def load_credentials(now):
        """Every credential not expired at C{now} (expired ones may be deleted)."""

    def delete_credentials(digest=None, kernel_id=None, share_id=None):
        """Delete those matching every given field; fires with how many."""


class IPermalinkStoreFactory(Interface):
    """Opens a permalink store for the database URLs of some schemes."""

    schemes = Attribute("The URL schemes this factory handles, e.g. ('postgresql',).")

    def open(reactor, url, timeout):
        """An L{IPermalinkStore} for C{url}.

        Must not do database I/O (the server calls it while starting, and a
        database that is down must not stop the server from starting).

        @param timeout: seconds one database call may take.
        """
