"""The browser console over https and wss, in a real Chromium, on a server
with a self-signed certificate (the context is told to accept it, as a
user who added the certificate would be)."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from conftest import start_server
from test_tls import make_certificate

TIMEOUT_MS = 30_000


def test_the_console_runs_code_over_https_and_wss(browser, tmp_path):
    cert, key = make_certificate(tmp_path)
    server = start_server("--pool-size", "1", "--tls-cert", str(cert), "--tls-key", str(key))
    context = browser.new_context(ignore_https_errors=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    responses = []
    page.on("response", lambda r: responses.append(r))
    try:
        page.goto(f"{server.url}login?token={server.token}&next=/")
        expect(page.locator("#cellmux-console[data-ready=true]")).to_be_visible()
        assert page.evaluate("location.protocol") == "https:"
        cells = page.locator("section.cellmux-console-cell:not(.cellmux-foreign)")
        cells.last.locator(".cm-content").click()
        page.keyboard.insert_text("print(6 * 7)")
        page.keyboard.press("Shift+Enter")
        expect(cells.first.locator(".cellmux-stdout")).to_have_text("42\n")
        assert sockets and all(re.match(r"wss://127\.0\.0\.1:\d+/ws", url) for url in sockets)
        page_response = next(r for r in responses if r.url == server.url)
        assert page_response.headers["strict-transport-security"] == "max-age=31536000"
        cookie = next(c for c in context.cookies() if c["name"] == "cellmux-login")
        assert cookie["secure"] and cookie["httpOnly"]
    finally:
        context.close()
        server.stop()
