"""Public mode in a real Chromium: an anonymous visitor on another origin runs
embedded cells (linked cells share a kernel) and opens a permalink that
runs at once, cannot reach another visitor's kernel, and meets the
per-address limit as a clear message in the cell. The server token
appears in no page and no answer the visitor gets."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from test_browser import other_origin as serve_other_origin
from test_browser import start_server_for

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def other_origin(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A second origin: a plain web server for the page that embeds cells."""
    directory = tmp_path_factory.mktemp("public")
    with serve_other_origin(directory) as origin:
        yield origin, directory


@pytest.fixture(scope="module")
def public_server(other_origin):
    config = "public = true\npublic_kernels_per_address = 3\n"
    running = start_server_for(*other_origin, pool_size=2, config=config)
    yield running
    running.stop()


def _page_with_cells(server, name: str) -> str:
    base = server.url.rstrip("/")
    return f"""<!doctype html><meta charset="utf-8"><title>{name}</title>
<script src="{base}/static/cellmux.js"></script>
<div id="one">shared = 6 * 7</div>
<div id="two">print('shared is', shared)</div>
<script>
  window.one = cellmux.makeCell({{element: '#one', linkKey: 'demo', server: {base!r}}});
  window.two = cellmux.makeCell({{element: '#two', linkKey: 'demo', server: {base!r}}});
</script>
"""


def _visitor(browser, seen: list[str]):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()

    def keep(response) -> None:
        with contextlib.suppress(Exception):
            seen.append(response.text())

    page.on("response", keep)
    return context, page


def test_an_anonymous_visitor_runs_cells_and_a_permalink_within_the_limits(
    browser, public_server, other_origin
):
    origin, directory = other_origin
    (directory / "cells.html").write_text(_page_with_cells(public_server, "cells"))
    seen: list[str] = []
    contexts = []
    try:
        # Visitor A: two linked cells, run with their Run buttons.
        context, a = _visitor(browser, seen)
        contexts.append(context)
        a.goto(f"{origin}/cells.html")
        a.locator("#one .cellmux-run").click()
        expect(a.locator("#one .cellmux-count")).to_have_text("[1]")
        a.locator("#two .cellmux-run").click()
        expect(a.locator("#two .cellmux-stdout")).to_have_text("shared is 42\n")
        # An error in a cell is shown in it.
        a.locator("#two .cm-content").click()
        a.keyboard.press("Control+a")
        a.keyboard.insert_text("1 / 0")
        a.keyboard.press("Shift+Enter")
        expect(a.locator("#two .cellmux-error")).to_contain_text("ZeroDivisionError")
        a_kernel, a_token = a.evaluate(
            "async () => { const k = await one._kernel(); return [k.kernelId, k.token]; }"
        )
        assert a_token and a_token != public_server.token
        # A reload keeps the visitor's kernel (and its variables).
        a.reload()
        a.locator("#two .cellmux-run").click()
        expect(a.locator("#two .cellmux-stdout")).to_have_text("shared is 42\n")
        assert a.evaluate("async () => (await two._kernel()).kernelId") == a_kernel

        # Visitor B, in another browser context: a kernel of their own, and
        # A's kernel is out of reach with B's capability.
        context, b = _visitor(browser, seen)
        contexts.append(context)
        b.goto(f"{origin}/cells.html")
        b.locator("#two .cellmux-run").click()
        expect(b.locator("#two .cellmux-error")).to_contain_text("NameError")
        refused = b.evaluate(
            """async ([server, kernelId]) => {
                 const mine = await two._kernel();
                 const other = new cellmux.KernelClient({server, kernelId, token: mine.token});
                 try { await other.connect(); return 'attached'; } catch (e) { return e.message; }
               }""",
            [public_server.url.rstrip("/"), a_kernel],
        )
        assert refused == "this token is for another kernel"

        # A permalink, opened anonymously on the server's own page, runs at once.
        req = urllib.request.Request(
            public_server.url + "permalink",
            data=json.dumps({"code": "print('the permalink ran')"}).encode(),
            headers={"Authorization": f"token {public_server.token}"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            permalink = json.loads(response.read())["id"]
        context, c = _visitor(browser, seen)
        contexts.append(context)
        c.goto(f"{public_server.url}?permalink={permalink}&run=1")
        expect(c.locator("#cellmux-console[data-ready=true]")).to_be_visible()
        console_cell = c.locator("section.cellmux-console-cell").first
        expect(console_cell.locator(".cellmux-stdout")).to_have_text("the permalink ran\n")
        expect(c.locator("#upload")).to_be_disabled()

        # This address now has 3 kernels, its limit: a fourth visitor is told so.
        context, d = _visitor(browser, seen)
        contexts.append(context)
        d.goto(f"{origin}/cells.html")
        d.locator("#one .cellmux-run").click()
        failure = d.locator("#one .cellmux-failure")
        expect(failure).to_contain_text("already has 3 kernel(s), the most a visitor may have")
        expect(failure).to_contain_text("HTTP 429")
    finally:
        for context in contexts:
            context.close()
    assert seen and not any(public_server.token in body for body in seen)


@pytest.fixture(scope="module")
def private_server(other_origin):
    """Not in public mode, but admitting the other origin."""
    running = start_server_for(*other_origin, pool_size=1, name="private.toml")
    yield running
    running.stop()


def test_without_public_mode_a_cell_without_a_token_says_why_it_cannot_run(
    browser, private_server, other_origin
):
    origin, directory = other_origin
    (directory / "private.html").write_text(_page_with_cells(private_server, "private"))
    context, page = _visitor(browser, [])
    try:
        page.goto(f"{origin}/private.html")
        page.locator("#one .cm-content").click()
        page.keyboard.press("Shift+Enter")
        failure = page.locator("#one .cellmux-failure")
        expect(failure).to_have_text("cannot run: no kernel: a valid token is required (HTTP 403)")
        expect(page.locator("#one .cellmux-count")).to_have_text("[!]")
    finally:
        context.close()
