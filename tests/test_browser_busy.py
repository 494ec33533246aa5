"""The browser console completes and inspects while a cell runs (issue 15).

Against a real server, kernel and Chromium (the shared ``browser`` fixture).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from conftest import RunningServer, start_server
from test_browser import _cells, _console, _finished, _run


@pytest.fixture(scope="module")
def busy_web_server() -> Iterator[RunningServer]:
    running = start_server("--pool-size", "1")
    yield running
    running.stop()


def test_tab_completes_while_a_cell_runs(browser, busy_web_server):
    with _console(browser, busy_web_server) as page:
        state = page.locator("#kernel-state")
        _finished(_run(page, "needle_value = 41\ndef needle_function():\n    '''Finds needles.'''"))
        spin = _run(page, "import time\n_end = time.time() + 15\nwhile time.time() < _end: pass")
        expect(state).to_have_text("busy")
        cells = _cells(page)
        last = cells.nth(cells.count() - 1)
        last.locator(".cm-content").click()
        page.keyboard.insert_text("needle_v")
        started = time.monotonic()
        page.keyboard.press("Tab")
        options = page.locator(".cm-tooltip-autocomplete li")
        expect(options.first).to_have_text("needle_value", timeout=5000)
        assert time.monotonic() - started < 5
        page.keyboard.press("Escape")
        page.keyboard.press("Control+a")
        page.keyboard.press("Delete")
        page.keyboard.insert_text("needle_function")
        page.keyboard.press("Shift+Tab")
        expect(last.locator(".cellmux-inspect")).to_contain_text("Finds needles.", timeout=5000)
        # All of it while the cell still ran.
        expect(state).to_have_text("busy")
        assert spin.locator(".cellmux-count").inner_text() != "[2]"
        page.click("#interrupt")
        expect(state).to_have_text("idle")
