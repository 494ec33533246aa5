"""JupyterLab in Chromium, through a Jupyter Server with ``--gateway-url``,
on cellmux kernels: what a notebook user does, driven by Playwright.

One notebook in a folder of the shared root, run cell by cell: it reads a
data file from its own folder, imports a package that only the kernels'
environment has, dies (and is restarted automatically: the next cell runs),
and survives a user restart without a "kernel appears to have died" dialog.
Another is debugged with JupyterLab's debugger: a breakpoint set in the
cell's gutter, a step, the variables panel, continue.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from conftest import RunningServer, start_server
from ports import free_port

TIMEOUT_MS = 30_000
START_TIMEOUT = 90

CELLS = [
    "print(open('data.txt').read().strip())",
    "import onlyinkernels\nprint(onlyinkernels.ANSWER)",
    "import os\nos._exit(1)",
    "print('after the crash')",
    "print('after the restart')",
]


def _notebook(cells: list[str]) -> dict:
    return {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"cell{i}",
                "metadata": {},
                "outputs": [],
                "source": source,
            }
            for i, source in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {
                "display_name": "Python 3 (cellmux)",
                "language": "python",
                "name": "python3",
            }
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


DEBUGGED_CELL = "def double(n):\n    twice = n * 2\n    return twice\n\nprint('result', double(21))"


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("notebooks")
    root.chmod(0o755)  # as a notebooks folder is: kernels run under their own uids
    project = root / "project"
    project.mkdir()
    (project / "data.txt").write_text("numbers from the notebook's folder\n")
    (project / "analysis.ipynb").write_text(json.dumps(_notebook(CELLS)))
    (project / "debugged.ipynb").write_text(json.dumps(_notebook([DEBUGGED_CELL])))
    return str(root)


@pytest.fixture(scope="module")
def cellmux(tmp_path_factory, notebooks, kernel_venv) -> Iterator[RunningServer]:
    config = tmp_path_factory.mktemp("cellmux-config") / "cellmux.toml"
    config.write_text(
        f"shared_root = {notebooks!r}\nkernel_python = {kernel_venv!r}\npool_size = 1\n"
    )
    running = start_server("--config", str(config))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, notebooks, cellmux) -> Iterator[str]:
    """``jupyter lab --gateway-url`` on cellmux; yields its URL with the token."""
    home = tmp_path_factory.mktemp("jupyter-home")
    env = dict(os.environ)
    for name in ("CONFIG", "DATA", "RUNTIME"):
        env[f"JUPYTER_{name}_DIR"] = str(home / name.lower())
    # No news toast over the notebook (JupyterLab asks on first start).
    settings = home / "lab-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (
        settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    ).write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(home / "workspaces")
    token = secrets.token_hex(16)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={notebooks}",
        f"--IdentityProvider.token={token}",
        f"--GatewayClient.url={cellmux.url.rstrip('/')}",
        f"--GatewayClient.auth_token={cellmux.token}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log_path = home / "lab.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"jupyter lab did not start: {log_path.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r,
        ):
            if r.status == 200:
                break
        time.sleep(0.3)
    try:
        yield f"{url}/lab/tree/project/analysis.ipynb?token={token}"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run_cell(page: Page, index: int, check: bool = True) -> None:
    """Put the cursor in cell C{index} and run it (Shift+Enter), as a user does."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    for attempt in range(2):
        cell.locator(".cm-content").click()
        expect(cell).to_have_class(re.compile(r"\bjp-mod-active\b"))
        expect(cell.locator(".jp-Editor.jp-mod-focused")).to_have_count(1)
        page.keyboard.press("Shift+Enter")
        if not check:  # a cell whose kernel dies gets its [ ] back
            return
        # JupyterLab took it: the prompt shows [*] or the execution count.
        # A key pressed while the page was still busy can be lost on a
        # loaded machine (this drives the browser, not cellmux): once more.
        try:
            expect(prompt).to_have_text(re.compile(r"\[(\*|\d+)\]"), timeout=5_000 * (attempt + 1))
            return
        except AssertionError:
            if attempt:
                raise


def _output(page: Page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea-output")


def _kernel_idle(page: Page) -> None:
    expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(
        1, timeout=TIMEOUT_MS
    )


def test_a_notebook_in_jupyterlab_through_the_gateway(browser, lab):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(lab)
        expect(page.locator(".jp-Notebook .jp-Cell")).to_have_count(len(CELLS), timeout=60_000)
        _kernel_idle(page)

        # a data file from the notebook's own folder
        _run_cell(page, 0)
        expect(_output(page, 0)).to_contain_text("numbers from the notebook's folder")

        # a package only the kernels' environment has
        _run_cell(page, 1)
        expect(_output(page, 1)).to_contain_text("from the kernel venv")

        # the kernel dies: JupyterLab says so as on a stock server, and the
        # kernel is back by itself
        _run_cell(page, 2, check=False)
        dialog = page.locator(".jp-Dialog")
        expect(dialog).to_contain_text("appears to have died")
        dialog.get_by_role("button", name="Ok").click()
        expect(dialog).to_have_count(0)
        expect(_output(page, 2)).to_contain_text("the kernel died (exit code 1)")
        _kernel_idle(page)
        _run_cell(page, 3)
        expect(_output(page, 3)).to_contain_text("after the crash")

        # a user restart: confirmed, and no "appears to have died" dialog
        page.locator(".jp-Notebook").click()
        page.keyboard.press("Escape")
        page.keyboard.press("0")
        page.keyboard.press("0")  # JupyterLab's restart shortcut in command mode
        confirm = page.locator(".jp-Dialog")
        expect(confirm).to_contain_text("Restart Kernel?")
        confirm.get_by_role("button", name="Confirm Kernel Restart").click()
        expect(confirm).to_have_count(0)
        _kernel_idle(page)
        _run_cell(page, 4)
        expect(_output(page, 4)).to_contain_text("after the restart")
        page.wait_for_timeout(1000)  # a late dialog would show up by now
        expect(page.locator(".jp-Dialog")).to_have_count(0)
        assert not errors, errors
    finally:
        context.close()


def test_jupyterlabs_debugger_through_the_gateway(browser, lab):
    """The debug protocol end to end: JupyterLab -> Jupyter Server (gateway)
    -> cellmux -> debugpy in a sandboxed kernel, and its events back."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        # reset: not the tabs an earlier test left open in the workspace
        page.goto(lab.replace("analysis.ipynb", "debugged.ipynb") + "&reset")
        panel = page.locator(".jp-NotebookPanel").filter(
            has=page.locator(".cm-content", has_text="def double")
        )
        cell = panel.locator(".jp-Cell").first
        expect(cell).to_be_visible(timeout=60_000)
        idle = panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
        expect(idle).to_have_count(1, timeout=TIMEOUT_MS)
        # The bug button is enabled only for a kernel that advertises the
        # debugger (kernelspec and kernel_info) and answers it.
        bug = panel.locator(".jp-DebuggerBugButton")
        # (a jp-button custom element: to_be_enabled does not read aria-disabled)
        expect(bug).to_have_attribute("aria-disabled", "false", timeout=TIMEOUT_MS)
        bug.click()
        expect(bug).to_have_attribute("aria-pressed", "true", timeout=TIMEOUT_MS)
        callstack = page.locator(".jp-DebuggerCallstack")
        if not callstack.is_visible():
            page.get_by_role("tab", name=re.compile("Debugger")).click()
        expect(callstack).to_be_visible()

        # a breakpoint on line 2 (inside double), clicked in the gutter
        gutter = cell.locator(".cm-gutter.cm-breakpoint-gutter")
        expect(gutter).to_be_visible()
        line = cell.locator(".cm-line").nth(1).bounding_box()
        column = gutter.bounding_box()
        page.mouse.click(column["x"] + column["width"] / 2, line["y"] + line["height"] / 2)
        expect(page.locator(".jp-DebuggerBreakpoint")).to_have_count(1)

        cell.locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")
        frames = page.locator(".jp-DebuggerCallstackFrame")
        expect(frames.first).to_contain_text("double", timeout=TIMEOUT_MS)
        variables = page.locator(".jp-DebuggerVariables")
        expect(variables).to_contain_text("n", timeout=TIMEOUT_MS)
        expect(variables).to_contain_text("21")

        # one step: twice is bound
        page.locator("jp-button[title^='Next']").first.click()
        expect(variables).to_contain_text("twice", timeout=TIMEOUT_MS)
        expect(variables).to_contain_text("42")

        page.locator("jp-button[title^='Continue']").first.click()
        expect(cell.locator(".jp-OutputArea-output")).to_contain_text("result 42")
        expect(idle).to_have_count(1, timeout=TIMEOUT_MS)
        assert not errors, errors
    finally:
        context.close()
