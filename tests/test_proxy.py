"""Proxy mode: X-Forwarded-For/-Proto/-Host count only from trusted_proxies.

The units test the sans-IO resolution (with hypothesis); the server tests
send real requests from two loopback source addresses to one server that
trusts only one of them: 127.0.0.2 plays the proxy, 127.0.0.1 anybody else.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.config import ConfigError, ServerConfig
from cellmux.server.auth import OriginPolicy
from cellmux.server.proxy import (
    Forwarded,
    TrustedProxies,
    client_address,
    forwarding_request_factory,
    upgrade_client_address,
)
from conftest import config_file, start_server, wait_for

PROXY = "127.0.0.2"
STRANGER = "127.0.0.1"

TRUSTED = TrustedProxies.from_strings(["10.0.0.0/8", "127.0.0.2", "2001:db8::/32"])


def headers(**values: str):
    table = {k.replace("_", "-").lower().encode(): v.encode() for k, v in values.items()}
    return table.get


# -- the sans-IO core ----------------------------------------------------------


def test_nothing_is_believed_from_a_peer_not_in_the_list():
    view = TRUSTED.resolve(
        "192.0.2.1",
        False,
        headers(x_forwarded_for="203.0.113.9", x_forwarded_proto="https", x_forwarded_host="a.b"),
    )
    assert view == Forwarded("192.0.2.1", False)


def test_a_trusted_proxy_names_the_client_scheme_and_host():
    view = TRUSTED.resolve(
        "10.1.2.3",
        False,
        headers(
            x_forwarded_for="203.0.113.9", x_forwarded_proto="https", x_forwarded_host="kernels.ex"
        ),
    )
    assert view == Forwarded("203.0.113.9", True, b"kernels.ex")


def test_the_client_is_the_first_untrusted_hop_from_the_right():
    # The client forged the first entry; our two proxies appended theirs.
    chain = "6.6.6.6, 203.0.113.9, 10.0.0.5"
    view = TRUSTED.resolve("10.0.0.1", False, headers(x_forwarded_for=chain))
    assert view.client == "203.0.113.9"


def test_garbage_in_the_chain_stops_the_walk_at_the_proxy_that_passed_it():
    view = TRUSTED.resolve("10.0.0.1", False, headers(x_forwarded_for="evil, 10.0.0.5"))
    assert view.client == "10.0.0.5"


@pytest.mark.parametrize(
    ("entry", "client"),
    [
        ("203.0.113.9:4711", "203.0.113.9"),
        ("[2001:db9::1]:4711", "2001:db9::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
    ],
)
def test_entries_with_ports_and_mapped_addresses(entry, client):
    assert TRUSTED.resolve("10.0.0.1", False, headers(x_forwarded_for=entry)).client == client


def test_only_the_last_proto_and_host_count_and_bad_hosts_are_ignored():
    view = TRUSTED.resolve(
        "::ffff:10.0.0.1",
        True,
        headers(x_forwarded_proto="https, http", x_forwarded_host="x.example, a b/c"),
    )
    assert view == Forwarded("::ffff:10.0.0.1", False, None)


def test_trusted_proxies_must_be_addresses_or_networks():
    with pytest.raises(ConfigError, match="not an IP address or network"):
        ServerConfig(trusted_proxies=["proxy.example"])
    with pytest.raises(ConfigError):
        ServerConfig(trusted_proxies=[10])
    assert ServerConfig(trusted_proxies=["10.0.0.0/8", "::1"]).trusted_proxies == (
        "10.0.0.0/8",
        "::1",
    )


addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.text(max_size=20)
)
values = st.one_of(st.none(), st.binary(max_size=80), st.text(max_size=80).map(str.encode))


@given(
    peer=addresses,
    secure=st.booleans(),
    forwarded_for=values,
    proto=values,
    host=values,
)
def test_resolving_never_fails_and_never_trusts_strangers(peer, secure, forwarded_for, proto, host):
    table = {b"x-forwarded-for": forwarded_for, b"x-forwarded-proto": proto}
    table[b"x-forwarded-host"] = host
    view = TRUSTED.resolve(peer, secure, table.get)
    if not TRUSTED.trusts(peer):
        assert view == Forwarded(peer, secure)
        return
    # From a proxy: the client is an address, the host a plain host[:port].
    ipaddress.ip_address(view.client)
    assert view.host is None or (b" " not in view.host and b"/" not in view.host)


@given(chain=st.lists(st.ip_addresses(v=4), min_size=1, max_size=8))
def test_the_client_is_never_a_proxy_unless_every_hop_is(chain):
    view = TRUSTED.resolve("10.0.0.1", False, headers(x_forwarded_for=", ".join(map(str, chain))))
    strangers = [str(a) for a in chain if not TRUSTED.trusts(str(a))]
    if strangers:
        assert view.client == strangers[-1]
    else:
        assert view.client == str(chain[0])


# -- a real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied():
    path = config_file(f'trusted_proxies = ["{PROXY}/32"]')
    running = start_server("--pool-size", "0", "--config", path)
    yield running
    running.stop()


def request(server, source: str, path: str, extra: dict[str, str], method: str = "GET"):
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        conn.request(method, path, headers={"Host": f"{host}:{port}", **extra})
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


FORWARDED = {
    "X-Forwarded-For": "203.0.113.77",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "kernels.example.org",
}
FORWARDED_LOWER = {name.lower().replace("-", "_"): value for name, value in FORWARDED.items()}


def test_a_trusted_proxy_sets_the_logged_client_address(proxied):
    request(proxied, PROXY, "/api/from-the-proxy", FORWARDED)
    request(proxied, STRANGER, "/api/from-a-stranger", FORWARDED)
    log = wait_for(lambda: "from-a-stranger" in proxied.log() and proxied.log())
    [proxy_line] = [line for line in log.splitlines() if "from-the-proxy" in line]
    [stranger_line] = [line for line in log.splitlines() if "from-a-stranger" in line]
    assert '"203.0.113.77"' in proxy_line and PROXY not in proxy_line
    assert f'"{STRANGER}"' in stranger_line and "203.0.113.77" not in stranger_line


def test_https_from_a_trusted_proxy_means_hsts_and_secure_cookies(proxied):
    login = {"Authorization": f"token {proxied.token}"}
    trusted = request(proxied, PROXY, "/login", {**FORWARDED, **login}, method="POST")
    assert trusted.status == 200
    assert trusted.getheader("Strict-Transport-Security") == "max-age=31536000"
    assert "Secure" in trusted.getheader("Set-Cookie")
    stranger = request(proxied, STRANGER, "/login", {**FORWARDED, **login}, method="POST")
    assert stranger.status == 200
    assert stranger.getheader("Strict-Transport-Security") is None
    assert "Secure" not in stranger.getheader("Set-Cookie")


def upgrade(server, source: str, extra: dict[str, str]) -> bytes:
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET /ws?token={server.token} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in extra.items()),
    ]
    with socket.create_connection((host, int(port)), 30, source_address=(source, 0)) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
    return head.split(b"\r\n", 1)[0]


def test_the_forwarded_host_is_the_servers_own_origin_only_from_a_proxy(proxied):
    browser = {"Origin": "https://kernels.example.org"}
    assert b" 101 " in upgrade(proxied, PROXY, {**FORWARDED, **browser})
    assert b" 403 " in upgrade(proxied, STRANGER, {**FORWARDED, **browser})
    # Without the forwarded host the page's origin is another site, proxy or not.
    assert b" 403 " in upgrade(proxied, PROXY, browser)


# -- what the request leaves for the code after it -------------------------------


def processed(peer: str, **values: str):
    """A request from C{peer} through the forwarding request class, and the
    headers its resource saw."""
    from twisted.internet.address import IPv4Address
    from twisted.web import resource, server
    from twisted.web.test.requesthelper import DummyChannel

    seen = {}

    class Recorder(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            seen.update(dict(request.requestHeaders.getAllRawHeaders()))
            seen["secure"] = request.isSecure()
            seen["client"] = client_address(request)
            return b""

    factory = forwarding_request_factory(server.Request, TRUSTED, b"max-age=5")
    channel = DummyChannel()
    channel.transport = DummyChannel.TCP(IPv4Address("TCP", peer, 4711))
    channel.site = server.Site(Recorder())
    request = factory(channel)
    request.gotLength(0)
    for name, value in values.items():
        request.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value.encode())
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:8800"])
    request.requestReceived(b"GET", b"/", b"HTTP/1.1")
    return seen, request


def test_a_strangers_forwarding_headers_never_reach_the_code_after():
    seen, request = processed("192.0.2.1", **FORWARDED_LOWER)
    headers = [name for name in seen if isinstance(name, bytes)]
    assert b"Host" in headers
    assert not any(name.lower().startswith(b"x-forwarded") for name in headers)
    assert seen["client"] == "192.0.2.1" and seen["secure"] is False
    assert seen[b"Host"] == [b"127.0.0.1:8800"]
    assert request.responseHeaders.getRawHeaders(b"strict-transport-security") is None


def test_a_proxys_forwarding_headers_are_left_resolved():
    seen, request = processed(
        "10.0.0.1", **{**FORWARDED_LOWER, "x_forwarded_for": "6.6.6.6, 203.0.113.77"}
    )
    assert seen[b"X-Forwarded-For"] == [b"203.0.113.77"]
    assert seen[b"X-Forwarded-Proto"] == [b"https"]
    assert b"X-Forwarded-Host" not in seen and seen[b"Host"] == [b"kernels.example.org"]
    assert seen["client"] == "203.0.113.77" and seen["secure"] is True
    assert request.responseHeaders.getRawHeaders(b"strict-transport-security") == [b"max-age=5"]


def test_websocket_code_reads_the_resolved_address():
    assert upgrade_client_address({"x-forwarded-for": "203.0.113.77"}, "tcp4:10.0.0.1:1") == (
        "203.0.113.77"
    )
    assert upgrade_client_address({}, "tcp4:192.0.2.1:4711") == "192.0.2.1"
    assert upgrade_client_address({}, "tcp6:::1:4711") == "::1"


def test_over_https_a_plain_http_page_of_the_same_host_is_not_the_servers_own(proxied):
    page = {"Origin": "http://kernels.example.org"}
    assert b" 403 " in upgrade(proxied, PROXY, {**FORWARDED, **page})
    plain = {**FORWARDED, "X-Forwarded-Proto": "http"}
    assert b" 101 " in upgrade(proxied, PROXY, {**plain, **page})


def test_the_origin_policy_compares_schemes_only_for_secure_requests():
    policy = OriginPolicy()
    assert policy.allows("http://h:1", "h:1") and policy.allows("https://h:1", "h:1")
    assert policy.allows("https://h:1", "h:1", secure=True)
    assert not policy.allows("http://h:1", "h:1", secure=True)
    assert not OriginPolicy.from_strings([r"https://h:1"]).allows("http://h:1", "h:1", True)
