"""What jupyter_kernel_test's checks run on cellmux's python3 kernel, and how
its check classes get a client from ``cellmux bridge``: shared by
tests/test_kernel_conformance.py (over the Jupyter websocket, and bash
through the bridge) and tests/test_bridge_kernel_test.py (python3 through
the bridge)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from jupyter_client import BlockingKernelClient

from bridge_helpers import BridgeProcess, bridge_env
from terminal_helpers import delete_named_kernels


class PythonSamples:
    """The code samples each jupyter_kernel_test check needs for python3
    (C{supported_history_operations} is each class's own)."""

    kernel_name = "python3"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "import collectio", "matches": {"collections"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2", "for i in range(3):"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "print?"
    code_generate_error = "raise ValueError('no good')"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>t</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Markdown, display; display(Markdown('*x*'))",
            "mime": "text/markdown",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
            "mime": "text/latex",
        },
    ]
    code_history_pattern = "1?2*"
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"


class OnTheBridge:
    """jupyter_kernel_test's classes start a local kernel in setUpClass:
    these get their client (C{kc}) from a bridge, set by a class fixture."""

    @classmethod
    def setUpClass(cls) -> None:
        pass

    @classmethod
    def tearDownClass(cls) -> None:
        pass


@contextlib.contextmanager
def bridged_client(
    server, directory: Path, name: str, *extra: str
) -> Iterator[BlockingKernelClient]:
    """A blocking jupyter_client client on ``cellmux bridge`` (kernel
    C{name}, arguments C{extra}) to C{server}; the bridge and its kernel are
    gone afterwards."""
    state = directory / "state"
    bridge = BridgeProcess(bridge_env(server, state), name, directory / "kernel.json", *extra)
    kc = None
    try:
        bridge.wait_ready()
        kc = bridge.client()
        yield kc
    finally:
        if kc is not None:
            kc.stop_channels()
        bridge.finish()
        delete_named_kernels(server, state)
