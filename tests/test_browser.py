"""The browser console and embedded cells, in a real Chromium, on a real server.

Chromium is Debian's (installed here if missing, never downloaded by
Playwright); Playwright for Python drives it. Every test uses the same
server, whose config admits the origin of a second local web server that
serves the page with embedded cells.

The console tests take screenshots into a temporary directory; with
``CELLMUX_SCREENSHOTS=1`` (``tox -e screenshots``) they replace the ones in
docs/screenshots instead, the only way a test run writes into the tree.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from conftest import RunningServer, start_server

ROOT = Path(__file__).resolve().parent.parent
#: Kernels share two cores with other work: allow for a slow start.
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)

# Replaces WebSocket with one that never connects, as a proxy that blocks
# websockets does: the client must fall back to long polling by itself.
BLOCK_WEBSOCKETS = """
window.WebSocket = class {
  constructor(url) {
    this.readyState = 0;
    setTimeout(() => { this.readyState = 3;
      this.onerror && this.onerror(new Event('error'));
      this.onclose && this.onclose({code: 1006, reason: '', wasClean: false}); }, 50);
  }
  send() { throw new Error('not open'); }
  close() {}
};
window.WebSocket.OPEN = 1;
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def other_origin(directory: Path) -> Iterator[str]:
    """A second origin, its URL: a plain web server for the pages in
    C{directory} (pages that embed cells)."""
    handler = functools.partial(_Quiet, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def start_server_for(
    origin: str, directory: Path, pool_size: int, config: str = "", name: str = "cellmux.toml"
) -> RunningServer:
    """A server whose cells C{origin}'s pages may embed; its config file,
    C{name} in C{directory}, has C{config} besides."""
    path = directory / name
    # A TOML literal string: the regex's backslashes stay as they are.
    path.write_text(f"allow_origins = ['{re.escape(origin)}']\n{config}")
    return start_server("--pool-size", str(pool_size), "--config", str(path))


@pytest.fixture(scope="module")
def embed_site(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("embed")
    with other_origin(directory) as origin:
        yield origin, directory


@pytest.fixture(scope="module")
def web_server(embed_site) -> Iterator[RunningServer]:
    running = start_server_for(*embed_site, pool_size=2)
    yield running
    running.stop()


def _login_url(server: RunningServer, token: str, query: str = "") -> str:
    return f"{server.url}login?token={token}&next=/{query}"


@contextlib.contextmanager
def _console(
    browser: Browser, server: RunningServer, query: str = "", token: str | None = None, **ctx
) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 1000}, **ctx)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(_login_url(server, token or server.token, query.replace("&", "%26")))
        expect(page.locator("#cellmux-console[data-ready=true]")).to_be_visible()
        yield page
    finally:
        context.close()


def _cells(page: Page):
    return page.locator("section.cellmux-console-cell:not(.cellmux-foreign)")


def _run(page: Page, code: str):
    """Type code into the last (empty) cell and run it; return that cell."""
    cells = _cells(page)
    n = cells.count()
    cell = cells.nth(n - 1)
    cell.locator(".cm-content").click()
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")
    expect(cells).to_have_count(n + 1)
    return cell


def _finished(cell) -> None:
    expect(cell.locator(".cellmux-count")).to_have_text(re.compile(r"\[\d+\]"))


def _scenario(page: Page, screenshots: Path) -> None:
    """Everything a person does in the console, one step after another."""
    state = page.locator("#kernel-state")
    expect(state).to_have_text("idle")

    cell = _run(page, "import sys\nprint('hello from the kernel')\nprint('oops', file=sys.stderr)")
    expect(cell.locator(".cellmux-stdout")).to_have_text("hello from the kernel\n")
    expect(cell.locator(".cellmux-stderr")).to_have_text("oops\n")
    _finished(cell)

    cell = _run(page, "def broken():\n    return 1 / 0\nbroken()")
    error = cell.locator(".cellmux-error")
    expect(error).to_contain_text("ZeroDivisionError")
    expect(error).to_contain_text("broken()")
    # The traceback's ANSI colours became styled spans, not escape codes.
    assert "\x1b[" not in error.inner_text()
    assert error.locator("span[class*=ansi-]").count() > 0

    cell = _run(
        page,
        "%matplotlib inline\nimport matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(3, 2))\nplt.plot([1, 3, 2])\nplt.show()",
    )
    image = cell.locator("img[data-mime='image/png']")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") > 100

    cell = _run(
        page,
        "from IPython.display import HTML\n"
        "HTML('<table id=t><tr><th>name</th><th>n</th></tr>'\n"
        "     '<tr><td>alpha</td><td>1</td></tr></table>')",
    )
    frame = cell.locator("iframe.cellmux-frame")
    expect(frame).to_have_attribute("sandbox", "allow-scripts")
    expect(cell.frame_locator("iframe").locator("#t td").first).to_have_text("alpha")
    # The console with stdout, stderr, a traceback, a plot and a table.
    page.evaluate("window.scrollTo(0, 0)")
    kind = page.evaluate("cellmuxConsole.kernel.transport.kind")
    shot = screenshots / f"console-{kind}.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG")

    cell = _run(page, "name = input('Your name? ')\nprint('hello', name)")
    prompt = cell.locator(".cellmux-stdin-input")
    expect(prompt).to_have_attribute("type", "text")
    expect(cell.locator(".cellmux-stdin-prompt")).to_have_text("Your name? ")
    prompt.fill("Ada")
    prompt.press("Enter")
    expect(cell.locator(".cellmux-stdout")).to_contain_text("hello Ada")
    _finished(cell)

    cell = _run(page, "import getpass\nsecret = getpass.getpass('Password: ')\nprint(len(secret))")
    prompt = cell.locator(".cellmux-stdin-input")
    expect(prompt).to_have_attribute("type", "password")
    prompt.fill("hunter2")
    prompt.press("Enter")
    expect(cell.locator(".cellmux-stdout")).to_contain_text("7")
    assert "hunter2" not in cell.inner_text()

    cell = _run(page, "import pdb\nx = 41\npdb.set_trace()\nprint('after', x)")
    prompt = cell.locator(".cellmux-stdin-input")
    # ipykernel turns pdb.set_trace into IPython's debugger (ipdb>), a Pdb.
    expect(cell.locator(".cellmux-stdin-prompt").last).to_have_text(re.compile(r"\(Pdb\)|ipdb>"))
    prompt.fill("!x = x + 1")
    prompt.press("Enter")
    prompt = cell.locator(".cellmux-stdin-input")
    expect(prompt).to_have_count(1)
    prompt.fill("c")
    prompt.press("Enter")
    expect(cell.locator(".cellmux-stdout").last).to_contain_text("after 42")
    _finished(cell)

    cell = _run(page, "import time\nwhile True:\n    time.sleep(0.05)")
    expect(state).to_have_text("busy")
    page.click("#interrupt")
    expect(cell.locator(".cellmux-error")).to_contain_text("KeyboardInterrupt")
    expect(state).to_have_text("idle")

    # Completion: Tab after "os.path.jo" offers os.path members.
    _finished(_run(page, "import os"))
    cells = _cells(page)
    last = cells.nth(cells.count() - 1)
    last.locator(".cm-content").click()
    # (An astral character first: Jupyter counts code points, the editor UTF-16 units.)
    page.keyboard.insert_text("s = '\U0001f600'; os.path.jo")
    page.keyboard.press("Tab")
    options = page.locator(".cm-tooltip-autocomplete li")
    expect(options.first).to_have_text("join")
    # CodeMirror ignores Enter for 75 ms after the list appears (interactionDelay).
    page.wait_for_timeout(150)
    page.keyboard.press("Enter")
    expect(last.locator(".cm-content")).to_have_text("s = '\U0001f600'; os.path.join")
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    # Shift+Tab inspects.
    page.keyboard.insert_text("os.path.join")
    page.keyboard.press("Shift+Tab")
    expect(last.locator(".cellmux-inspect")).to_contain_text("Join two or more pathname")
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")

    # Latex and Markdown render too.
    cell = _run(page, "from IPython.display import Math\nMath(r'\\frac{a}{b}')")
    expect(cell.locator(".katex")).to_be_visible()
    cell = _run(page, "from IPython.display import Markdown\nMarkdown('# Title\\n\\n*some* text')")
    expect(cell.frame_locator("iframe").locator("h1")).to_have_text("Title")

    _finished(_run(page, "survivor = 1"))
    page.click("#restart")
    expect(page.locator("#notices")).to_contain_text("kernel restarted")
    expect(state).to_have_text("idle")
    cell = _run(page, "print('survivor' in globals())")
    expect(cell.locator(".cellmux-stdout")).to_have_text("False\n")


def test_console_over_websocket(browser, web_server, screenshots):
    with _console(browser, web_server) as page:
        expect(page.locator("#transport")).to_have_text("via websocket")
        _scenario(page, screenshots)


def test_console_over_long_polling_when_forced(browser, web_server, screenshots):
    with _console(browser, web_server, "?transport=longpoll") as page:
        expect(page.locator("#transport")).to_have_text("via longpoll")
        _scenario(page, screenshots)


def test_console_falls_back_to_long_polling_when_websockets_fail(browser, web_server):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(BLOCK_WEBSOCKETS)
    page = context.new_page()
    try:
        page.goto(_login_url(web_server, web_server.token))
        expect(page.locator("#cellmux-console[data-ready=true]")).to_be_visible()
        expect(page.locator("#transport")).to_have_text("via longpoll")
        cell = _run(page, "print(6 * 7)")
        expect(cell.locator(".cellmux-stdout")).to_have_text("42\n")
    finally:
        context.close()


def test_a_dying_kernel_shows_dead_with_its_cause(browser, web_server):
    with _console(browser, web_server) as page:
        page.evaluate(
            """() => {
                window.seen = [];
                cellmuxConsole.kernel.on('status', () => seen.push(
                    document.getElementById('kernel-state').textContent));
            }"""
        )
        cell = _run(page, "import os\nos._exit(3)")
        expect(cell.locator(".cellmux-notice")).to_have_text("not finished: the kernel stopped")
        page.wait_for_function("seen.includes('dead (exit code 3)')")
        # Whether or not the server restarted it by itself, Restart brings it back.
        page.click("#restart")
        expect(page.locator("#kernel-state")).to_have_text("idle")
        cell = _run(page, "print('alive')")
        expect(cell.locator(".cellmux-stdout")).to_have_text("alive\n")


def test_a_dropped_websocket_reconnects_and_loses_nothing(browser, web_server):
    with _console(browser, web_server) as page:
        cell = _run(
            page, "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.25)"
        )
        expect(cell.locator(".cellmux-stdout")).to_contain_text("1")
        page.evaluate("cellmuxConsole.kernel.transport.ws.close(3000)")
        expect(page.locator("#notices")).to_contain_text("reconnecting")
        _finished(cell)
        # Output made while disconnected came back from the replay log, once.
        expect(cell.locator(".cellmux-stdout")).to_have_text("".join(f"{i}\n" for i in range(8)))


def test_kernel_html_cannot_read_the_page_cookie(browser, web_server):
    with _console(browser, web_server) as page:
        # A readable cookie on the page's origin (the login cookie is HttpOnly).
        page.evaluate("document.cookie = 'probe=page-secret; path=/'")
        assert "page-secret" in page.evaluate("document.cookie")
        cell = _run(
            page,
            "from IPython.display import HTML\n"
            "HTML('''<div id=out>waiting</div><script>\n"
            "let own, top_;\n"
            "try { own = document.cookie } catch (e) { own = 'denied ' + e.name }\n"
            "try { top_ = parent.document.cookie } catch (e) { top_ = 'denied ' + e.name }\n"
            "document.getElementById('out').textContent = 'ran; own=' + own + '; parent=' + top_;\n"
            "</script>''')",
        )
        out = cell.frame_locator("iframe").locator("#out")
        # The script ran, in its own opaque origin, and saw nothing of the page.
        expect(out).to_contain_text("ran;")
        text = out.inner_text()
        assert "page-secret" not in text
        assert "own=denied SecurityError" in text
        assert "parent=denied SecurityError" in text


def test_read_only_link_sees_output_but_cannot_run(browser, web_server):
    with _console(browser, web_server) as owner:
        owner.click("#share-observer")
        link = owner.locator("#share-observer-link").input_value()
        assert "/login?kernel=" in link and "&token=" in link
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        viewer = context.new_page()
        try:
            viewer.goto(link)
            expect(viewer.locator("#cellmux-console[data-ready=true]")).to_be_visible()
            assert viewer.locator("#cellmux-console").get_attribute("data-role") == "observer"
            expect(viewer.locator("#notices")).to_contain_text("read-only")
            expect(viewer.locator("#interrupt")).to_be_disabled()
            # No editable cell for an observer.
            expect(
                viewer.locator("section.cellmux-console-cell:not(.cellmux-foreign)")
            ).to_have_count(0)
            _run(owner, "print('seen by the observer')")
            foreign = viewer.locator(".cellmux-foreign")
            expect(foreign.locator(".cellmux-stdout")).to_have_text("seen by the observer\n")
            # Even a hand-made request from the observer's page is refused.
            refused = viewer.evaluate(
                """() => new Promise((resolve) => {
                    const k = cellmuxConsole.kernel;
                    const off = k.on('notice', (t) => { off(); resolve(t); });
                    k.execute('print(1)', {output() {}, input() {}});
                })"""
            )
            assert "observers cannot send" in refused
        finally:
            context.close()


def test_collaborator_link_runs_code_that_the_owner_sees(browser, web_server):
    with _console(browser, web_server) as owner:
        owner.click("#share-collaborator")
        link = owner.locator("#share-collaborator-link").input_value()
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        guest = context.new_page()
        try:
            guest.goto(link)
            expect(guest.locator("#cellmux-console[data-ready=true]")).to_be_visible()
            assert guest.locator("#cellmux-console").get_attribute("data-role") == "collaborator"
            expect(guest.locator("#restart")).to_be_disabled()
            cell = _run(guest, "print('from the collaborator')")
            expect(cell.locator(".cellmux-stdout")).to_have_text("from the collaborator\n")
            foreign = owner.locator(".cellmux-foreign")
            expect(foreign.locator(".cellmux-stdout")).to_have_text("from the collaborator\n")
        finally:
            context.close()


def test_upload_and_download(browser, web_server, tmp_path):
    with _console(browser, web_server) as page:
        page.set_input_files(
            "#upload-input",
            files=[{"name": "data.txt", "mimeType": "text/plain", "buffer": b"uploaded bytes"}],
        )
        expect(page.locator("#notices")).to_contain_text("uploaded data.txt")
        cell = _run(page, "print(open('data.txt').read())")
        expect(cell.locator(".cellmux-stdout")).to_have_text("uploaded bytes\n")
        # Dropping a file on the page uploads it too.
        page.evaluate(
            """() => {
                const data = new DataTransfer();
                data.items.add(new File(['dropped bytes'], 'dropped.txt'));
                document.dispatchEvent(new DragEvent('drop',
                    {dataTransfer: data, bubbles: true, cancelable: true}));
            }"""
        )
        expect(page.locator("#notices")).to_contain_text("uploaded dropped.txt")
        cell = _run(page, "print(open('dropped.txt').read())")
        expect(cell.locator(".cellmux-stdout")).to_have_text("dropped bytes\n")
        _finished(_run(page, "open('result.csv', 'w').write('a,b\\n1,2\\n')"))
        link = page.locator("#files a", has_text="result.csv")
        expect(link).to_be_visible()
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / "result.csv"
        download.value.save_as(saved)
        assert saved.read_text() == "a,b\n1,2\n"


def test_permalink_button_reopens_the_code(browser, web_server):
    with _console(browser, web_server) as page:
        cell = _run(page, "print('from a permalink')")
        _finished(cell)
        page.click("#permalink")
        url = page.locator("#permalink-link").input_value()
        assert "?permalink=" in url
        page.goto(url)
        expect(page.locator("#cellmux-console[data-ready=true]")).to_be_visible()
        expect(_cells(page).first.locator(".cm-content")).to_have_text("print('from a permalink')")


def test_embedded_linked_cells_share_a_kernel(browser, web_server, embed_site):
    origin, directory = embed_site
    (directory / "embed.html").write_text(
        f"""<!doctype html><meta charset="utf-8"><title>embed</title>
<script src="{web_server.url}static/cellmux.js"></script>
<div id="one">shared = 6 * 7</div>
<div id="two">print('shared is', shared)</div>
<div id="alone">print('shared' in globals())</div>
<script>
  const opts = {{server: {web_server.url.rstrip("/")!r}, token: {web_server.token!r}}};
  window.one = cellmux.makeCell({{element: '#one', linkKey: 'demo', autorun: true, ...opts}});
  window.two = cellmux.makeCell({{element: '#two', linkKey: 'demo', ...opts}});
  window.alone = cellmux.makeCell(
    {{element: '#alone', hideEditor: true, transport: 'longpoll', ...opts}});
</script>
"""
    )
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(f"{origin}/embed.html")
        one = page.locator("#one")
        expect(one.locator(".cellmux-count")).to_have_text("[1]")
        expect(one.locator(".cellmux-execute_result")).to_have_count(0)
        two = page.locator("#two")
        two.locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")
        expect(two.locator(".cellmux-stdout")).to_have_text("shared is 42\n")
        # A cell without the key has its own kernel, and no editor shown; this
        # one long-polls, across origins (CORS for an allowed origin).
        expect(page.locator("#alone .cellmux-input")).to_be_hidden()
        # Not awaited: the expect below bounds the wait (an awaited run that
        # never ends would hang the test until pytest's timeout).
        page.evaluate("() => { alone.run(); }")
        expect(page.locator("#alone .cellmux-stdout")).to_have_text("False\n")
    finally:
        context.close()


def _get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_pages_and_static_assets_over_http(web_server):
    """Content types, the CSP, caching, and ``/`` for non-browsers."""
    status, headers, body = _get(web_server.url, {"Accept": "text/html"})
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "object-src 'none'" in csp
    assert "frame-ancestors 'self'" in csp
    assert b'src="/static/cellmux.js"' in body
    # Not a browser: the JSON description, as before.
    status, headers, body = _get(web_server.url, {"Accept": "application/json"})
    assert json.loads(body)["name"] == "cellmux"
    for name, content_type in [
        ("cellmux.js", "text/javascript; charset=utf-8"),
        ("cellmux.css", "text/css; charset=utf-8"),
        ("fonts/KaTeX_Main-Regular.woff2", "font/woff2"),
    ]:
        status, headers, body = _get(f"{web_server.url}static/{name}")
        assert status == 200 and headers["content-type"] == content_type, name
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["access-control-allow-origin"] == "*"
        etag = headers["etag"]
        status, _, body = _get(f"{web_server.url}static/{name}", {"If-None-Match": etag})
        assert status == 304 and body == b""
    status, _, body = _get(f"{web_server.url}static/nope.js")
    assert status == 404 and json.loads(body)["message"] == "not found"
    status, _, _ = _get(f"{web_server.url}static/../../setup.cfg")
    assert status == 404
