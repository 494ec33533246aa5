"""The console's kernel spec picker, in Chromium: a bash kernel, then back to Python."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from conftest import RunningServer, start_server
from test_browser import _console, _finished, _run


@pytest.fixture(scope="module")
def picker_server(tmp_path_factory) -> Iterator[RunningServer]:
    prefix = tmp_path_factory.mktemp("kernelspecs")
    subprocess.run(
        [sys.executable, "-m", "bash_kernel.install", "--prefix", str(prefix)],
        check=True,
        capture_output=True,
    )
    running = start_server(
        "--pool-size", "1", env={"JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    )
    yield running
    running.stop()


def test_the_picker_lists_the_specs_and_opens_a_kernel_of_the_one_chosen(browser, picker_server):
    with _console(browser, picker_server, "?spec=bash") as page:
        picker = page.locator("#kernel-spec")
        expect(picker).to_be_visible()
        expect(picker).to_have_value("bash")
        expect(picker.locator("option[value=python3]")).to_have_text("Python 3 (cellmux)")
        expect(picker.locator("option[value=bash]")).to_have_text("Bash")
        cell = _run(page, "echo from $(basename $0)")
        _finished(cell)
        expect(cell.locator(".cellmux-stdout")).to_have_text("from bash\n")
        bash_kernel = page.evaluate("cellmuxConsole.kernelId")
        picker.select_option("python3")
        expect(page.locator("#cellmux-console[data-spec=python3]")).to_be_visible()
        assert page.evaluate("cellmuxConsole.kernelId") != bash_kernel
        cell = _run(page, "print(6 * 7)")
        _finished(cell)
        expect(cell.locator(".cellmux-stdout")).to_have_text("42\n")
    with picker_server.client() as client:
        for model in client.list_kernels():
            client.delete_kernel(model.id)
