"""The browser console through HAProxy in front of two fronts (docs/
scaling.md, Several fronts): the console names its kernel in the /ws and
/poll URLs, so both transports reach the kernel's front, wherever the
page's own requests go."""

from __future__ import annotations

import types

import pytest
from playwright.sync_api import expect

from test_browser import _console, _finished, _run
from test_fronts import TAGS, Fleet, front_of


@pytest.fixture(scope="module")
def fleet():
    running = Fleet()
    yield running
    running.stop()


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_consoles_reach_their_kernels_front_whichever_front_serves_the_page(
    browser, fleet, transport
):
    proxy = types.SimpleNamespace(url=fleet.url() + "/", token=fleet.token)
    with fleet.client() as client:
        by_front: dict[str, str] = {}
        while len(by_front) < 2:
            kernel_id = client.create_kernel().id
            by_front.setdefault(front_of(kernel_id), kernel_id)
        try:
            for name, kernel_id in sorted(by_front.items()):
                # Two browsers (their own cookies) per kernel: their logins
                # go round robin, so one of them keeps to the other front
                # for its pages; its websocket or polls must still reach
                # the kernel's front.
                for _ in range(2):
                    query = f"?kernel={kernel_id}&transport={transport}"
                    with _console(browser, proxy, query) as page:
                        expect(page.locator("#transport")).to_have_text(f"via {transport}")
                        cell = _run(page, f"print('on', {name!r})")
                        expect(cell.locator(".cellmux-stdout")).to_have_text(f"on {name}\n")
                        _finished(cell)
                        assert f"kernel={kernel_id}" in page.url
        finally:
            for kernel_id in by_front.values():
                client.delete_kernel(kernel_id)
    assert set(by_front) == set(TAGS)
