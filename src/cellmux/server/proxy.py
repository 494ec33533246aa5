# -*- test-case-name: tests.test_proxy -*-
"""Behind a reverse proxy: whose ``X-Forwarded-*`` headers to believe.

A TLS-terminating proxy (nginx, HAProxy) connects from its own address over
plain HTTP. It says who the client is (``X-Forwarded-For``), whether the
client used https (``X-Forwarded-Proto``) and which host it asked for
(``X-Forwarded-Host``). Anybody can send those headers, so they are
believed only from the peers listed in ``trusted_proxies``; everyone
else's are ignored as if absent.

L{TrustedProxies.resolve} is the sans-IO core. L{forwarding_request_factory}
applies it once per HTTP request, before any resource runs, so everything
downstream reads the client's view through Twisted's own API:
C{request.getClientAddress()} (access log, L{client_address}),
C{request.isSecure()} (Secure cookies, HSTS) and the ``Host`` header
(origin checks; websockets re-read it from the rewritten request). After
it, ``X-Forwarded-*`` headers are gone unless a trusted proxy sent them,
and then hold the one resolved value each (L{upgrade_client_address}
reads the address in Autobahn's C{onConnect}).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping

import attrs
from twisted.internet import address
from twisted.internet.interfaces import ISSLTransport
from twisted.web import server

__all__ = [
    "Forwarded",
    "TrustedProxies",
    "client_address",
    "forwarding_request_factory",
    "upgrade_client_address",
    "upgrade_secure",
]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The headers a trusted proxy may set; every other peer's are dropped.
FORWARDING_HEADERS = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
#: Longest X-Forwarded-For list looked at (entries beyond it, from the left,
#: are ignored: a chain of proxies is never that long).
MAX_HOPS = 32
#: What a forwarded host may look like: a name or address and a port.
_HOST = re.compile(rb"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def _address(text: str | bytes | None) -> _Address | None:
    """An IP address from a peer or an X-Forwarded-For entry, or None.

    Entries may carry a port (``1.2.3.4:5678``, ``[::1]:5678``), as some
    proxies write them; IPv4 addresses mapped into IPv6 are unmapped.
    """
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _last(value: bytes | None) -> bytes | None:
    """The last entry of a comma-separated header: the one the nearest
    proxy wrote (a client may have sent earlier ones itself)."""
    if value is None:
        return None
    last = value.rpartition(b",")[2].strip()
    return last or None


@attrs.frozen
class Forwarded:
    """The client's side of a request, as the server should see it.

    @ivar client: the client's address (the peer's when nothing is believed).
    @ivar secure: whether the client reached the server over TLS.
    @ivar host: the ``Host`` the client asked for, if a trusted proxy
        rewrote it (None: the request's own ``Host`` stands).
    """

    client: str | None
    secure: bool
    host: bytes | None = None


@attrs.frozen
class TrustedProxies:
    """The peers whose forwarding headers are believed."""

    networks: tuple[_Network, ...] = ()

    @classmethod
    def from_strings(cls, networks: Iterable[str]) -> TrustedProxies:
        """From addresses or networks such as ``"127.0.0.1"``, ``"10.0.0.0/8"``.

        @raise ValueError: for anything else.
        """
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    def trusts(self, peer: str | bytes | None) -> bool:
        ip = _address(peer)
        return ip is not None and any(ip in network for network in self.networks)

    def resolve(
        self, peer: str | None, secure: bool, header: Callable[[bytes], bytes | None]
    ) -> Forwarded:
        """What a request from C{peer} says about its client.

        @param secure: whether the connection from C{peer} itself is TLS.
        @param header: a request header's value by lower-case name (None if absent).
        """
        if not self.networks or not self.trusts(peer):
            return Forwarded(peer, secure)
        client = self._client(peer, header(b"x-forwarded-for"))
        proto = _last(header(b"x-forwarded-proto"))
        if proto is not None and proto.lower() in (b"https", b"wss"):
            secure = True
        elif proto is not None and proto.lower() in (b"http", b"ws"):
            secure = False
        host = _last(header(b"x-forwarded-host"))
        if host is not None and not _HOST.fullmatch(host):
            host = None  # not a host[:port]: a broken or hostile value
        return Forwarded(client, secure, host)

    def _client(self, peer: str | None, chain: bytes | None) -> str | None:
        # Walk from the nearest hop outwards; the first address that is not
        # one of our proxies is the client (as nginx's real_ip_recursive).
        client = peer
        if not chain:
            return client
        for entry in reversed(chain.split(b",")[-MAX_HOPS:]):
            ip = _address(entry)
            if ip is None:
                break  # garbage: believe no further than the proxy that passed it
            client = str(ip)
            if not any(ip in network for network in self.networks):
                break
        return client


def client_address(request: server.Request) -> str | None:
    """The client's IP address for logs and per-client limits.

    Behind a trusted proxy this is the address the proxy forwarded, not the
    proxy's own; use this, not the transport's peer, wherever a client is
    counted or named.
    """
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


def upgrade_client_address(headers: Mapping[str, str], peer: str | None) -> str | None:
    """L{client_address} for a websocket upgrade, from Autobahn's request.

    @param headers: Autobahn's (lower-cased) request headers, which it read
        from the request the forwarding request class had already resolved:
        an C{x-forwarded-for} there is one address a trusted proxy gave.
    @param peer: Autobahn's C{request.peer} (``tcp:ADDRESS:PORT``).
    """
    forwarded = headers.get("x-forwarded-for")
    if forwarded:
        return forwarded
    if peer and peer.startswith(("tcp:", "tcp4:", "tcp6:")):
        return peer.split(":", 1)[1].rpartition(":")[0] or None
    return peer


def upgrade_secure(headers: Mapping[str, str], transport: object) -> bool:
    """C{request.isSecure()} for a websocket upgrade, from Autobahn's request.

    A trusted proxy's scheme is in the resolved C{x-forwarded-proto} (the
    only one left after L{forwarding_request_factory}); else the connection
    itself says, by being TLS.
    """
    proto = headers.get("x-forwarded-proto")
    if proto:
        return proto.lower() == "https"
    return ISSLTransport.providedBy(transport)


def _address_object(host: str, port: int) -> address.IPv4Address | address.IPv6Address:
    kind = address.IPv6Address if ":" in host else address.IPv4Address
    return kind("TCP", host, port)


def forwarding_request_factory(
    base: type[server.Request], trusted: TrustedProxies, hsts: bytes | None
) -> type[server.Request]:
    """A request class that applies C{trusted} before any resource runs,
    and sends C{Strict-Transport-Security: hsts} on every secure response."""

    class ForwardedRequest(base):  # type: ignore[valid-type, misc]
        _forwarded_secure: bool | None = None

        def process(self) -> None:
            peer = getattr(self.getClientAddress(), "host", None)
            view = trusted.resolve(peer, super().isSecure(), self._all_values)
            if view.client is not None and view.client != peer:
                self.client = _address_object(view.client, 0)
            if view.host is not None:
                self.requestHeaders.setRawHeaders(b"host", [view.host])
            # From here on the forwarding headers say what was decided: gone
            # unless a trusted proxy sent them, else one resolved value each.
            # Websocket code (Autobahn re-reads these headers) can rely on them.
            for name in FORWARDING_HEADERS:
                self.requestHeaders.removeHeader(name)
            if trusted.trusts(peer):
                if view.client is not None:
                    self.requestHeaders.setRawHeaders(b"x-forwarded-for", [view.client.encode()])
                scheme = b"https" if view.secure else b"http"
                self.requestHeaders.setRawHeaders(b"x-forwarded-proto", [scheme])
            self._forwarded_secure = view.secure
            if view.secure and hsts is not None:
                self.setHeader(b"strict-transport-security", hsts)
            super().process()

        def _all_values(self, name: bytes) -> bytes | None:
            # A proxy may add its own header line after the client's
            # (HAProxy's forwardfor) instead of joining them (nginx).
            values = self.requestHeaders.getRawHeaders(name)
            return b", ".join(values) if values else None

        def isSecure(self) -> bool:
            if self._forwarded_secure is not None:
                return self._forwarded_secure
            return super().isSecure()

    ForwardedRequest.__name__ = ForwardedRequest.__qualname__ = "ForwardedRequest"
    return ForwardedRequest
