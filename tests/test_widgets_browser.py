"""ipywidgets in the browser console, in a real Chromium, on real kernels.

Widget views render in sandboxed frames (/static/widgets.html) with
@jupyter-widgets/html-manager; the page relays their comm messages to the
kernel (docs/browser.md, Widgets). Moving a slider in the page must change
the value the kernel sees and re-run an ``interact`` function, and kernel
widget HTML must stay out of the page's origin.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from conftest import RunningServer
from test_browser import TIMEOUT_MS, _console, _finished, _run, other_origin, start_server_for

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def other_site(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """Another origin, serving a page with embedded cells."""
    directory = tmp_path_factory.mktemp("widget-embed")
    with other_origin(directory) as origin:
        yield origin, directory


@pytest.fixture(scope="module")
def widget_server(other_site) -> Iterator[RunningServer]:
    running = start_server_for(*other_site, pool_size=1)
    yield running
    running.stop()


def _frame(cell):
    return cell.frame_locator("iframe.cellmux-widget-frame")


def test_a_slider_moved_in_the_page_changes_the_kernels_value(browser, widget_server):
    with _console(browser, widget_server) as page:
        cell = _run(page, "import ipywidgets as w\ns = w.IntSlider(value=3, max=10)\ns")
        frame = _frame(cell)
        expect(frame.locator(".widget-readout")).to_have_text("3")
        # The frame is sandboxed without allow-same-origin (an opaque origin).
        assert cell.locator("iframe.cellmux-widget-frame").get_attribute("sandbox") == (
            "allow-scripts"
        )
        frame.locator(".noUi-handle").click()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        expect(frame.locator(".widget-readout")).to_have_text("5")
        check = _run(page, "print(s.value)")
        _finished(check)
        expect(check.locator(".cellmux-stdout")).to_have_text("5\n")
        # And the other way: the kernel sets the value, the view follows.
        _finished(_run(page, "s.value = 9"))
        expect(frame.locator(".widget-readout")).to_have_text("9")
        # A second view of the same model, in a frame of its own, stays in step.
        again = _frame(_run(page, "s"))
        expect(again.locator(".widget-readout")).to_have_text("9")
        again.locator(".noUi-handle").click()
        page.keyboard.press("ArrowLeft")
        expect(again.locator(".widget-readout")).to_have_text("8")
        expect(frame.locator(".widget-readout")).to_have_text("8")


def test_interact_reruns_its_function_when_the_slider_moves(browser, widget_server, screenshots):
    with _console(browser, widget_server) as page:
        cell = _run(
            page,
            "from ipywidgets import interact\n"
            "@interact(x=(0, 10))\n"
            "def square(x=4):\n"
            "    print('square', x * x)\n",
        )
        frame = _frame(cell)
        # The function's output lands in the interact's Output widget, not the cell.
        expect(frame.locator(".widget-output")).to_contain_text("square 16")
        expect(cell.locator(".cellmux-stdout")).to_have_count(0)
        frame.locator(".noUi-handle").click()
        page.keyboard.press("ArrowRight")
        expect(frame.locator(".widget-output")).to_have_text(re.compile(r"^\s*square 25\s*$"))
        controls = _run(
            page,
            "import ipywidgets as w\n"
            "a, b = w.FloatSlider(description='a'), w.FloatSlider(description='b')\n"
            "w.jslink((a, 'value'), (b, 'value'))\n"
            "w.VBox([a, b, w.Dropdown(options=['red', 'green'], description='colour'),\n"
            "        w.Text(value='hello', description='text'), w.Checkbox(description='on'),\n"
            "        w.Button(description='Press')])",
        )
        frame = _frame(controls)
        expect(frame.locator("button", has_text="Press")).to_be_visible()
        expect(frame.locator("select")).to_have_value("red")
        # jslink runs in the frame: moving a moves b without the kernel's help.
        expect(frame.locator(".widget-readout").nth(1)).to_have_text("0.00")
        frame.locator(".noUi-handle").first.click()
        page.keyboard.press("ArrowRight")
        expect(frame.locator(".widget-readout").nth(0)).to_have_text("0.10")
        expect(frame.locator(".widget-readout").nth(1)).to_have_text("0.10")
        page.screenshot(path=str(screenshots / "console-widgets.png"))


def test_widget_frames_cannot_read_the_page_cookie_or_dom(browser, widget_server):
    with _console(browser, widget_server) as page:
        page.evaluate("document.cookie = 'probe=page-secret; path=/'")
        cell = _run(
            page,
            "import ipywidgets as w\n"
            "w.HTML('''<div id=probe>waiting</div><img src=data:, onerror=\"\n"
            "let own, top_;\n"
            "try { own = document.cookie } catch (e) { own = 'denied ' + e.name }\n"
            "try { top_ = parent.document.title } catch (e) { top_ = 'denied ' + e.name }\n"
            "document.getElementById('probe').textContent =\n"
            "  'ran; own=' + own + '; parent=' + top_;\n"
            "\">''')",
        )
        probe = _frame(cell).locator("#probe")
        expect(probe).to_contain_text("ran;")
        text = probe.inner_text()
        assert "page-secret" not in text
        assert "own=denied SecurityError" in text
        assert "parent=denied SecurityError" in text


def test_a_frame_may_only_send_comm_messages_on_widget_comms(browser, widget_server):
    """Kernel HTML in a widget frame tries to run code and to talk to a
    non-widget comm through the bridge: neither reaches the kernel."""
    with _console(browser, widget_server) as page:
        setup = _run(
            page,
            "got = []\n"
            "def target(comm, msg):\n"
            "    got.append(msg['content']['comm_id'])\n"
            "    comm.on_msg(lambda m: got.append(m['content']['data']))\n"
            "get_ipython().kernel.comm_manager.register_target('probe', target)\n"
            "from comm import create_comm\n"
            "probe = create_comm(target_name='probe', comm_id='probe-comm')\n"
            "probe.on_msg(lambda m: got.append(m['content']['data']))",
        )
        _finished(setup)
        cell = _run(
            page,
            "import ipywidgets as w\n"
            "w.HTML('''<div id=probe>waiting</div><img src=data:, onerror=\"\n"
            "const send = (m) => parent.postMessage({cellmuxWidget: m}, '*');\n"
            "send({op: 'send', comm_id: 'probe-comm', msg_id: 'x1', data: {evil: 1}});\n"
            "send({op: 'execute', code: 'got.append(666)'});\n"
            "send({op: 'send', comm_id: 'probe-comm', msg_id: 'x2', data: {evil: 2}, "
            "msg_type: 'execute_request'});\n"
            "document.getElementById('probe').textContent = 'sent';\n"
            "\">''')",
        )
        expect(_frame(cell).locator("#probe")).to_have_text("sent")
        page.wait_for_timeout(1000)
        check = _run(page, "print(got)")
        _finished(check)
        expect(check.locator(".cellmux-stdout")).to_have_text("[]\n")


def test_widgets_work_in_embedded_cells_on_another_origin(browser, widget_server, other_site):
    origin, directory = other_site
    server = widget_server.url.rstrip("/")
    (directory / "widgets.html").write_text(
        f"""<!doctype html><meta charset="utf-8"><title>embedded widgets</title>
<script src="{server}/static/cellmux.js"></script>
<div id="slider">import ipywidgets as w
s = w.IntSlider(value=2, max=10)
s</div>
<div id="check">print('kernel sees', s.value)</div>
<script>
  const opts = {{server: {server!r}, token: {widget_server.token!r}, linkKey: 'w'}};
  window.slider = cellmux.makeCell({{element: '#slider', autorun: true, ...opts}});
  window.check = cellmux.makeCell({{element: '#check', ...opts}});
</script>
"""
    )
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(f"{origin}/widgets.html")
        frame = _frame(page.locator("#slider"))
        expect(frame.locator(".widget-readout")).to_have_text("2")
        frame.locator(".noUi-handle").click()
        page.keyboard.press("ArrowRight")
        expect(frame.locator(".widget-readout")).to_have_text("3")
        # Not awaited: the expect below bounds the wait (an awaited run that
        # never ends would hang the test until pytest's timeout).
        page.evaluate("() => { check.run(); }")
        expect(page.locator("#check .cellmux-stdout")).to_have_text("kernel sees 3\n")
    finally:
        context.close()


def test_a_widget_made_before_the_page_came_is_shown(browser, widget_server):
    """Its comm_open went by before this page attached: the page asks the
    kernel for every widget's state (ipywidgets' control comm) instead."""
    client = widget_server.client()
    model = client.create_kernel()
    try:
        with client.connect(model.id) as kernel:
            kernel.execute("import ipywidgets as w\nearly = w.IntSlider(value=6, max=10)")
        with _console(browser, widget_server, query=f"?kernel={model.id}") as page:
            cell = _run(page, "early")
            frame = _frame(cell)
            expect(frame.locator(".widget-readout")).to_have_text("6")
            frame.locator(".noUi-handle").click()
            page.keyboard.press("ArrowLeft")
            expect(frame.locator(".widget-readout")).to_have_text("5")
            check = _run(page, "print(early.value)")
            expect(check.locator(".cellmux-stdout")).to_have_text("5\n")
    finally:
        client.delete_kernel(model.id)
        client.close()
