"""Reloading the console keeps its session: every line and a waiting prompt.

The page keeps its session id and the cursor where its history starts in
sessionStorage; a reload resumes them (docs/browser.md, Reloads).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from conftest import RunningServer, start_server
from test_browser import TIMEOUT_MS, _console, _finished, _run

expect.set_options(timeout=TIMEOUT_MS)

TICKS = "import time\nfor i in range(10):\n    print('tick', i, flush=True)\n    time.sleep(0.4)"


@pytest.fixture(scope="module")
def reload_server() -> Iterator[RunningServer]:
    running = start_server("--pool-size", "1")
    yield running
    running.stop()


def _ready(page) -> None:
    expect(page.locator("#cellmux-console[data-ready=true]")).to_be_visible()


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_a_reload_mid_print_shows_every_line(browser, reload_server, screenshots, transport):
    with _console(browser, reload_server, query=f"?transport={transport}") as page:
        first = _run(page, "x = 41")
        _finished(first)
        cell = _run(page, TICKS)
        expect(cell.locator(".cellmux-stdout")).to_contain_text("tick 2")
        page.reload()
        _ready(page)
        expect(page.locator("#cellmux-console")).to_have_attribute("data-transport", transport)
        restored = page.locator("section.cellmux-restored")
        # Both cells of this session come back, with their code, in order.
        expect(restored).to_have_count(2)
        expect(restored.nth(0).locator(".cm-content")).to_have_text("x = 41")
        ticks = restored.nth(1)
        expect(ticks.locator(".cm-content")).to_contain_text("print('tick', i, flush=True)")
        _finished(ticks)
        expect(ticks.locator(".cellmux-stdout")).to_have_text(
            "".join(f"tick {i}\n" for i in range(10))
        )
        # The session goes on: the kernel and the new cell work as before.
        after = _run(page, "print(x + 1)")
        expect(after.locator(".cellmux-stdout")).to_have_text("42\n")
        if transport == "websocket":
            page.screenshot(path=str(screenshots / "console-reloaded.png"))


def test_a_reload_gets_the_waiting_prompt_back(browser, reload_server):
    with _console(browser, reload_server) as page:
        cell = _run(page, "name = input('name? ')\nprint('hello', name)")
        expect(cell.locator(".cellmux-stdin-prompt")).to_have_text("name? ")
        page.reload()
        _ready(page)
        restored = page.locator("section.cellmux-restored").last
        answer = restored.locator(".cellmux-stdin-input")
        expect(answer).to_be_visible()
        expect(restored.locator(".cellmux-stdin-prompt")).to_have_text("name? ")
        answer.fill("Ada")
        answer.press("Enter")
        _finished(restored)
        expect(restored.locator(".cellmux-stdout")).to_have_text("hello Ada\n")
        # Answered prompts stay answered across the next reload.
        page.reload()
        _ready(page)
        again = page.locator("section.cellmux-restored").last
        expect(again.locator(".cellmux-stdout")).to_have_text("hello Ada\n")
        expect(again.locator(".cellmux-stdin-input")).to_have_count(0)


def test_a_page_whose_network_was_away_catches_up(browser, reload_server):
    with _console(browser, reload_server) as page:
        cell = _run(page, TICKS)
        expect(cell.locator(".cellmux-stdout")).to_contain_text("tick 1")
        page.context.set_offline(True)
        page.evaluate("cellmuxConsole.kernel.transport.ws.close(3000)")
        expect(page.locator("#notices")).to_contain_text("reconnecting")
        page.wait_for_timeout(3000)  # several failed attempts while offline
        page.context.set_offline(False)
        _finished(cell)
        expect(cell.locator(".cellmux-stdout")).to_have_text(
            "".join(f"tick {i}\n" for i in range(10))
        )


def test_the_header_does_not_cover_the_output_and_the_icon_is_served(browser, reload_server):
    with _console(browser, reload_server) as page:
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.reload()
        _ready(page)
        page.wait_for_timeout(500)
        assert not [u for u in requests if u.endswith("/favicon.ico")]
        assert [u for u in requests if u.endswith("/static/favicon.svg")]
        # Clients that ask the conventional path get the same icon.
        icon = page.request.get(f"{reload_server.url}favicon.ico")
        assert icon.status == 200
        assert icon.headers["content-type"] == "image/svg+xml"
        assert icon.body().startswith(b"<svg")
        cell = _run(page, "for i in range(80): print(i)")
        _finished(cell)
        page.click("#permalink")
        expect(page.locator("#permalink-link")).to_be_visible()
        # Scroll the cell's output to the top of the view: it stops below the
        # bar and link box, not under them.
        cell.locator(".cellmux-stdout").evaluate("(e) => e.scrollIntoView()")
        top = page.locator(".cellmux-top").bounding_box()
        out = cell.locator(".cellmux-stdout").bounding_box()
        assert out["y"] >= top["y"] + top["height"] - 1, (top, out)
