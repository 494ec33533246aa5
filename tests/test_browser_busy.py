"""The browser console completes and inspects while a cell runs (issue 15).

Against a real server, kernel and Chromium (the shared ``browser`` fixture).
"""

from __future__ import annotations

import re
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


def test_tab_on_a_kernel_whose_gil_is_held_says_it_is_unresponsive(browser, busy_web_server):
    with _console(browser, busy_web_server) as page:
        _finished(_run(page, "import ctypes"))
        _run(page, "ctypes.PyDLL(None).sleep(8)")  # C code holding the GIL
        page.wait_for_timeout(500)
        cells = _cells(page)
        last = cells.nth(cells.count() - 1)
        last.locator(".cm-content").click()
        page.keyboard.insert_text("ctyp")
        started = time.monotonic()
        page.keyboard.press("Tab")
        # Answered by the server: at once if it knows, else after 2 s.
        expect(last.locator(".cellmux-inspect")).to_contain_text(
            re.compile(r"kernel is unresponsive|did not answer within 2 s"), timeout=5000
        )
        assert time.monotonic() - started < 5
        page.keyboard.press("Escape")
        expect(last.locator(".cellmux-inspect")).to_be_hidden()
