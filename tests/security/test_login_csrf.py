"""Login CSRF: another site cannot log a browser in, and a login is never silently weakened."""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse

import pytest

from cellmux.server.auth import COOKIE_NAME


def request(server, method: str, target: str, headers: dict[str, str] | None = None):
    parts = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    try:
        conn.request(method, target, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def login_cookie(headers) -> str | None:
    value = headers.get("set-cookie")
    if value is None:
        return None
    match = re.match(rf"{COOKIE_NAME}=([^;]+)", value)
    return match.group(1) if match else None


def cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={value}"}


@pytest.fixture
def shares(client):
    a = client.create_kernel()
    b = client.create_kernel()
    yield (
        client.share_kernel(a.id, "collaborator")["token"],
        client.share_kernel(b.id, "observer")["token"],
        a.id,
    )
    client.delete_kernel(a.id)
    client.delete_kernel(b.id)


CROSS_SITE = [
    {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "https://evil.example"},  # a browser without Sec-Fetch-*
    {"Origin": "null"},
    {"Referer": "https://evil.example/page"},  # no Sec-Fetch-* (plain HTTP) and no Origin
]


@pytest.mark.parametrize("foreign", CROSS_SITE)
def test_another_site_cannot_log_a_browser_in(server, shares, foreign):
    attackers = shares[0]
    if "Referer" not in foreign:  # cross-site POSTs always carry an Origin
        status, headers, body = request(
            server, "POST", "/login", {"Authorization": f"token {attackers}", **foreign}
        )
        assert status == 403 and login_cookie(headers) is None
        assert b"another site" in body
    # A share link clicked on another site: a page that asks, no cookie.
    status, headers, body = request(
        server, "GET", f"/login?token={attackers}&next=/%3Fkernel%3Dx", foreign
    )
    assert status == 200 and login_cookie(headers) is None
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert b"collaborator of kernel" in body and b'method="post"' in body
    action = re.search(rb'action="([^"]+)"', body).group(1).decode().replace("&amp;", "&")
    assert "confirm=1" in action
    # Its button posts from this server's own page: that logs in.
    own = {"Sec-Fetch-Site": "same-origin", "Origin": server.url.rstrip("/")}
    status, headers, _ = request(server, "POST", action, own)
    assert status == 303 and headers["location"] == "/?kernel=x"
    assert login_cookie(headers) is not None


def test_a_share_link_never_replaces_an_owner_login(server, shares):
    _, headers, _ = request(server, "POST", "/login", {"Authorization": f"token {server.token}"})
    owner = login_cookie(headers)
    for same_site in ({}, {"Sec-Fetch-Site": "none"}, {"Sec-Fetch-Site": "same-origin"}):
        status, headers, _ = request(
            server,
            "GET",
            f"/login?token={shares[1]}&next=/x",
            {**cookie_header(owner), **same_site},
        )
        assert (status, headers["location"]) == (302, "/x")
        assert login_cookie(headers) is None  # kept
    status, _, _ = request(server, "GET", "/api/kernels", cookie_header(owner))
    assert status == 200  # still the owner of everything


def test_one_share_login_is_replaced_by_another_only_when_confirmed(server, shares):
    first, second, first_kernel = shares
    _, headers, _ = request(server, "POST", "/login", {"Authorization": f"token {first}"})
    old = login_cookie(headers)
    assert request(server, "GET", f"/api/kernels/{first_kernel}", cookie_header(old))[0] == 200
    status, headers, body = request(
        server, "GET", f"/login?token={second}", {**cookie_header(old), "Sec-Fetch-Site": "none"}
    )
    assert status == 200 and login_cookie(headers) is None
    assert b"that login will end" in body
    status, _, body = request(
        server, "POST", "/login", {**cookie_header(old), "Authorization": f"token {second}"}
    )
    assert status == 409 and b"confirm=1" in body
    status, headers, _ = request(
        server,
        "POST",
        "/login?confirm=1",
        {**cookie_header(old), "Authorization": f"token {second}"},
    )
    assert status == 200 and login_cookie(headers) is not None
    # the replaced login is gone for good
    assert request(server, "GET", f"/api/kernels/{first_kernel}", cookie_header(old))[0] == 403


def test_a_browser_navigation_that_says_nothing_of_its_source_is_asked(server, shares):
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    status, headers, body = request(server, "GET", f"/login?token={shares[0]}", html)
    assert status == 200 and login_cookie(headers) is None and b"Log in" in body
    # from this server's own page (its Referer says so), or not a browser: at once
    own = {**html, "Referer": server.url + "?kernel=x"}
    status, headers, _ = request(server, "GET", f"/login?token={shares[0]}", own)
    assert status == 302 and login_cookie(headers) is not None
    status, headers, _ = request(server, "GET", f"/login?token={shares[0]}")
    assert status == 302 and login_cookie(headers) is not None


def test_chromium_following_a_link_from_another_site_is_asked_first(server, shares, browser):
    """A page on another site (localhost is not 127.0.0.1) sends Chromium to /login."""
    port = urllib.parse.urlsplit(server.url).port
    target = f"http://127.0.0.1:{port}/login?token={shares[0]}&next=/api/kernels"
    attacker = f"<script>location = {json.dumps(target)}</script>"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.route(
            "http://localhost:1/attack",
            lambda route: route.fulfill(body=attacker, content_type="text/html"),
        )
        page.goto("http://localhost:1/attack")
        page.wait_for_url(target)
        assert "Log in to this cellmux server?" in page.content()
        assert "collaborator of kernel" in page.content()
        assert not [c for c in context.cookies() if c["name"] == COOKIE_NAME]
        # The user decides: the button logs in, from the server's own page.
        page.click("button")
        page.wait_for_url(f"http://127.0.0.1:{port}/api/kernels")
        assert [c for c in context.cookies() if c["name"] == COOKIE_NAME]
    finally:
        context.close()


@pytest.mark.parametrize("foreign", CROSS_SITE[:2])
def test_another_site_sending_a_browser_to_the_console_with_a_token_goes_by_login(
    server, shares, foreign
):
    """The console trades a token in its URL for a login; sent there by
    another site, the browser is taken to /login, which asks first."""
    attackers = shares[0]
    html = {"Accept": "text/html"}
    status, headers, _ = request(
        server, "GET", f"/?token={attackers}&kernel=k1", {**html, **foreign}
    )
    assert status == 303 and login_cookie(headers) is None
    location = urllib.parse.urlsplit(headers["location"])
    assert location.path == "/login"
    query = dict(urllib.parse.parse_qsl(location.query))
    assert query == {"token": attackers, "next": "/?kernel=k1"}
    # Following it (the redirect keeps the request cross-site) asks.
    status, headers, body = request(server, "GET", headers["location"], {**html, **foreign})
    assert status == 200 and login_cookie(headers) is None
    assert b"<form" in body
    # Typed or opened from this server's own pages: the console itself.
    for own in ({"Sec-Fetch-Site": "none"}, {"Sec-Fetch-Site": "same-origin"}):
        status, _, body = request(server, "GET", f"/?token={attackers}", {**html, **own})
        assert status == 200 and b"<html" in body.lower()
