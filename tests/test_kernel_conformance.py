"""Jupyter's own kernel test suite (jupyter_kernel_test) against kernels served by cellmux.

Each check talks to a kernel through the server's Jupyter websocket
(``/api/kernels/{id}/channels``, v1 format), the way a Jupyter Server in
gateway mode does: a small client below gives jupyter_kernel_test the
blocking client API it expects (``execute``, ``get_shell_msg`` …) over that
websocket instead of ZeroMQ. python3 is cellmux's forked kernel, bash is
bash_kernel started cold behind the adaptor. The bash checks run once more
through ``cellmux bridge`` with jupyter_client's own ZeroMQ client
(python3's are in tests/test_bridge_kernel_test.py).

Checks that cannot apply to a kernel are left out of its class, each with
the reason in C{NOT_APPLICABLE}; C{test_what_is_left_out_really_is_missing}
proves the kernel indeed lacks what they test.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import jupyter_kernel_test
import pytest
from jupyter_client.session import Session, extract_dates
from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from websockets.sync.client import connect

from conftest import RunningServer, start_server
from kernel_test_samples import OnTheBridge, PythonSamples, bridged_client

V1 = "v1.kernel.websocket.jupyter.org"


class _Channel:
    """One of jupyter_client's channels, fed by the websocket reader."""

    def __init__(self) -> None:
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()

    def get_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return self.messages.get(timeout=timeout)  # raises queue.Empty, as jupyter_client

    def msg_ready(self) -> bool:
        return not self.messages.empty()


class WebsocketKernelClient:
    """jupyter_client's BlockingKernelClient API over cellmux's Jupyter websocket."""

    def __init__(self, server: RunningServer, kernel_id: str) -> None:
        self.session = Session(key=b"", username="kernel-test")
        base = urlsplit(server.url)
        url = (
            f"ws://{base.netloc}/api/kernels/{kernel_id}/channels?session_id={self.session.session}"
        )
        self._connection = contextlib.ExitStack()
        self._ws = self._connection.enter_context(
            connect(
                url,
                additional_headers={"Authorization": f"token {server.token}"},
                subprotocols=[V1],
                max_size=None,
            )
        )
        assert self._ws.subprotocol == V1
        self.shell_channel = _Channel()
        self.iopub_channel = _Channel()
        self.stdin_channel = _Channel()
        self.control_channel = _Channel()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                frame = self._ws.recv()
                channel, parts = deserialize_msg_from_ws_v1(frame)
                header, parent, metadata, content = (json.loads(p) for p in parts[:4])
                message = {
                    "header": extract_dates(header),
                    "parent_header": extract_dates(parent),
                    "metadata": metadata,
                    "content": content,
                    "buffers": parts[4:],
                    "msg_id": header["msg_id"],
                    "msg_type": header["msg_type"],
                }
                getattr(self, f"{channel}_channel").messages.put(message)
        except Exception:  # closed: nothing more arrives
            return

    def _send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg = self.session.msg(msg_type, content)
        parts = [
            json.dumps(msg[key], default=str).encode()
            for key in ("header", "parent_header", "metadata", "content")
        ]
        self._ws.send(serialize_msg_to_ws_v1(parts, channel))
        return msg["header"]["msg_id"]

    # -- what jupyter_kernel_test calls ------------------------------------

    def start_channels(self) -> None:
        pass

    def stop_channels(self) -> None:
        self._connection.close()
        self._reader.join(10)

    def get_shell_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return self.shell_channel.get_msg(timeout)

    def get_iopub_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return self.iopub_channel.get_msg(timeout)

    def execute(
        self,
        code: str,
        silent: bool = False,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        stop_on_error: bool = True,
    ) -> str:
        return self._send(
            "shell",
            "execute_request",
            {
                "code": code,
                "silent": silent,
                "store_history": store_history,
                "user_expressions": user_expressions or {},
                "allow_stdin": allow_stdin,
                "stop_on_error": stop_on_error,
            },
        )

    def kernel_info(self) -> str:
        return self._send("shell", "kernel_info_request", {})

    def complete(self, code: str, cursor_pos: int | None = None) -> str:
        pos = len(code) if cursor_pos is None else cursor_pos
        return self._send("shell", "complete_request", {"code": code, "cursor_pos": pos})

    def inspect(self, code: str, cursor_pos: int | None = None, detail_level: int = 0) -> str:
        pos = len(code) if cursor_pos is None else cursor_pos
        content = {"code": code, "cursor_pos": pos, "detail_level": detail_level}
        return self._send("shell", "inspect_request", content)

    def history(
        self,
        raw: bool = True,
        output: bool = False,
        hist_access_type: str = "range",
        **kwargs: Any,
    ) -> str:
        if hist_access_type == "range":
            kwargs.setdefault("session", 0)
            kwargs.setdefault("start", 0)
        content = {"raw": raw, "output": output, "hist_access_type": hist_access_type, **kwargs}
        return self._send("shell", "history_request", content)

    def is_complete(self, code: str) -> str:
        return self._send("shell", "is_complete_request", {"code": code})


class _KernelManager:
    """What jupyter_kernel_test does with its KernelManager: shut down."""

    def __init__(self, server: RunningServer, kernel_id: str, cleanup) -> None:
        self._server = server
        self._kernel_id = kernel_id
        self._cleanup = cleanup

    def shutdown_kernel(self) -> None:
        try:
            with self._server.client() as client:
                client.delete_kernel(self._kernel_id)
        finally:
            self._cleanup()


class CellmuxKernelTests(jupyter_kernel_test.KernelTests):
    """KernelTests on a kernel of a server of its own, through the websocket."""

    __test__ = False  # the kernels' classes below are the tests

    #: Variables for the server (JUPYTER_PATH for installed kernelspecs).
    server_env: dict[str, str] = {}

    @classmethod
    def install(cls) -> tuple[dict[str, str], str | None]:
        return {}, None

    @classmethod
    def setUpClass(cls) -> None:
        env, directory = cls.install()
        server = start_server("--pool-size", "1", env=env)

        def cleanup() -> None:
            server.stop()
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

        try:
            with server.client() as client:
                model = client.create_kernel(cls.kernel_name)
            cls.kc = WebsocketKernelClient(server, model.id)
        except BaseException:
            cleanup()
            raise
        cls.km = _KernelManager(server, model.id, cleanup)


class TestPython3(PythonSamples, CellmuxKernelTests):
    __test__ = True
    supported_history_operations = ("tail", "range", "search")

    def test_history(self) -> None:
        # jupyter_kernel_test asks for a range in the session number that
        # tail gave; IPython answers ranges of the current session with
        # session 0 (as stock ipykernel does). Its tail and search checks
        # run as they are; the range is checked here in IPython's terms.
        self.supported_history_operations = ("tail", "search")
        with mock.patch.object(self, "subTest", self._no_range):
            super().test_history()
        codes = [s["code"] for s in self.code_execute_result]
        reply = self.history_helper(codes, hist_access_type="tail", n=1)
        session, start, _ = reply["content"]["history"][0]
        self.assertGreater(session, 0)
        reply = self.history_helper(
            codes, hist_access_type="range", session=0, start=start, stop=start + 1
        )
        self.assertEqual(reply["content"]["history"], [[0, start, codes[-1]]])

    @contextlib.contextmanager
    def _no_range(self, **params: Any):
        if params.get("hist_access_type") == "range":
            with contextlib.suppress(unittest.SkipTest):  # checked in test_history
                yield
            return
        with unittest.TestCase.subTest(self, **params):
            yield


def _install_bash() -> tuple[dict[str, str], str]:
    directory = tempfile.mkdtemp(prefix="kernelspecs-")
    subprocess.run(
        [sys.executable, "-m", "bash_kernel.install", "--prefix", directory],
        check=True,
        capture_output=True,
    )
    return {"JUPYTER_PATH": f"{directory}/share/jupyter"}, directory


#: jupyter_kernel_test's checks that bash_kernel cannot pass, and why.
NOT_APPLICABLE = {
    "test_execute_stderr": "bash_kernel runs bash on a pty: stderr arrives as stdout",
    "test_is_complete": "bash_kernel has no is_complete (it answers 'unknown')",
    "test_pager": "bash has no pager payloads",
    "test_execute_result": "bash_kernel sends output as streams, never execute_result",
    "test_history": "bash_kernel keeps no history (and its checks need execute_result)",
    "test_inspect": "bash_kernel has no inspect (it answers found: false)",
    "test_clear_output": "bash_kernel never sends clear_output",
}


class _BashSamples:
    kernel_name = "bash"
    language_name = "bash"
    file_extension = ".sh"
    code_hello_world = "echo 'hello, world'"
    completion_samples = [{"text": "ech", "matches": {"echo"}}]
    code_generate_error = "false"
    code_display_data = [{"code": "echo '<b>t</b>' | displayHTML", "mime": "text/html"}]

    def test_what_is_left_out_really_is_missing(self) -> None:
        self.flush_channels()
        reply, outputs = self.execute_helper("echo out; echo err >&2; echo 41")
        self.assertEqual(reply["content"]["status"], "ok")
        kinds = {(m["msg_type"], m["content"].get("name")) for m in outputs}
        self.assertEqual(kinds, {("stream", "stdout")}, outputs)
        self.kc.is_complete("echo 'hi")
        self.assertEqual(self.kc.get_shell_msg(timeout=15)["content"]["status"], "unknown")
        self.kc.inspect("echo")
        self.assertFalse(self.kc.get_shell_msg(timeout=15)["content"]["found"])
        self.kc.history(hist_access_type="tail", n=3)
        self.assertEqual(self.kc.get_shell_msg(timeout=15)["content"]["history"], [])


class TestBash(_BashSamples, CellmuxKernelTests):
    __test__ = True

    install = classmethod(lambda cls: _install_bash())


# -- the same checks through cellmux bridge (ZeroMQ on the client's side) -----


@pytest.fixture(scope="module")
def bridged_bash(tmp_path_factory):
    """A jupyter_client blocking client on ``cellmux bridge bash``, on a
    server that offers bash_kernel."""
    env, directory = _install_bash()
    server = start_server("--pool-size", "1", env=env)
    try:
        with bridged_client(
            server, tmp_path_factory.mktemp("bridge"), "bash", "--spec", "bash"
        ) as kc:
            yield kc
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="class")
def _bridged(request, bridged_bash):
    request.cls.kc = bridged_bash


@pytest.mark.usefixtures("_bridged")
class TestBashThroughBridge(OnTheBridge, _BashSamples, jupyter_kernel_test.KernelTests):
    pass


for _name in NOT_APPLICABLE:  # not collected (see NOT_APPLICABLE)
    setattr(TestBash, _name, None)
    setattr(TestBashThroughBridge, _name, None)
