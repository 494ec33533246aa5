"""Websocket Origin checks: whole-origin patterns, no look-alikes."""

from __future__ import annotations

import pytest
from websockets.sync.client import connect

from cellmux.server.auth import OriginPolicy
from conftest import start_server

POLICY = OriginPolicy.from_strings([r"https://trusted\.example", r"https://(\w+\.)?docs\.org"])


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # not a browser
        ("http://127.0.0.1:8800", True),  # the server's own origin (Host below)
        ("https://trusted.example", True),
        ("https://a.docs.org", True),
        ("https://trusted.example.evil.com", False),
        ("https://evil.com/https://trusted.example", False),
        ("https://eviltrusted.example", False),
        ("http://trusted.example", False),
        ("https://trusted.example:444", False),
        ("null", False),
    ],
)
def test_origin_policy(origin, allowed):
    assert POLICY.allows(origin, "127.0.0.1:8800") is allowed


def test_look_alike_origins_cannot_open_websockets():
    from conftest import config_file

    config = config_file('allow_origins = ["https://trusted\\\\.example"]')
    server = start_server("--pool-size", "0", "--config", config)
    try:
        url = server.url.replace("http://", "ws://") + f"ws?token={server.token}"
        with connect(url, origin="https://trusted.example"):
            pass
        with connect(url):
            pass
        for origin in ("https://trusted.example.evil.com", "https://evil.com"):
            with pytest.raises(Exception, match="403"), connect(url, origin=origin):
                pass
    finally:
        server.stop()
