"""The Jupyter debug protocol (debugpy over the control channel) on real,
sandboxed kernels through a real server, spoken as JupyterLab speaks it."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.request
from typing import Any

from cellmux.client import Message
from cellmux.protocol import Channel

TIMEOUT = 60


class Debugging:
    """A kernel's debug_request/debug_reply pairs and its debug_events."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._seq = 0
        kernel.add_listener(self._on_frame)

    def _on_frame(self, frame) -> None:
        if frame.channel != Channel.KERNEL:
            return
        try:
            msg = Message.from_frame(frame)
        except ValueError:
            return
        if msg.msg_type == "debug_event":
            self.events.put(msg.content)

    def request(self, command: str, **arguments: Any) -> dict[str, Any]:
        self._seq += 1
        content = {"type": "request", "seq": self._seq, "command": command, "arguments": arguments}
        reply = self.kernel.request("debug_request", content, timeout=TIMEOUT).content
        assert reply.get("success"), reply
        return reply

    def wait_event(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if event.get("event") == name:
                return event

    def start(self) -> dict[str, Any]:
        """initialize, attach and debugInfo, as JupyterLab starts a session."""
        init = self.request(
            "initialize",
            clientID="cellmux-tests",
            clientName="cellmux-tests",
            adapterID="python",
            pathFormat="path",
            linesStartAt1=True,
            columnsStartAt1=True,
            supportsVariableType=True,
        )
        assert init["body"]["supportsConfigurationDoneRequest"]
        self.request("attach")
        return self.request("debugInfo")["body"]


def _in_thread(fn, *args, **kwargs) -> queue.Queue:
    done: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            done.put(fn(*args, **kwargs))
        except BaseException as e:
            done.put(e)

    threading.Thread(target=run, daemon=True).start()
    return done


CELL = """\
def double(n):
    twice = n * 2
    return twice

numbers = [1, 2, 3]
total = double(sum(numbers))
print("total", total)
"""


def test_a_breakpoint_in_a_cell_steps_and_shows_variables(kernel):
    debug = Debugging(kernel)
    info = debug.start()
    assert info["isStarted"]
    source = debug.request("dumpCell", code=CELL)["body"]["sourcePath"]
    assert source.startswith(info["tmpFilePrefix"])
    debug.request("setBreakpoints", source={"path": source}, breakpoints=[{"line": 6}])
    debug.request("configurationDone")

    running = _in_thread(kernel.execute, CELL, timeout=TIMEOUT)
    stopped = debug.wait_event("stopped")["body"]
    assert stopped["reason"] == "breakpoint"
    thread = stopped["threadId"]
    frames = debug.request("stackTrace", threadId=thread)["body"]["stackFrames"]
    assert (frames[0]["source"]["path"], frames[0]["line"]) == (source, 6)

    # step into double(): its local n is 6
    debug.request("stepIn", threadId=thread)
    debug.wait_event("stopped")
    frames = debug.request("stackTrace", threadId=thread)["body"]["stackFrames"]
    assert (frames[0]["name"], frames[0]["line"]) == ("double", 2)
    scopes = debug.request("scopes", frameId=frames[0]["id"])["body"]["scopes"]
    local = next(s for s in scopes if s["name"] == "Locals")
    variables = debug.request("variables", variablesReference=local["variablesReference"])
    values = {v["name"]: v["value"] for v in variables["body"]["variables"]}
    assert values["n"] == "6"

    # one step over: twice is bound
    debug.request("next", threadId=thread)
    debug.wait_event("stopped")
    frames = debug.request("stackTrace", threadId=thread)["body"]["stackFrames"]
    assert frames[0]["line"] == 3
    # the kernel's global names, as JupyterLab's variable explorer shows them
    names = {v["name"]: v["value"] for v in debug.request("inspectVariables")["body"]["variables"]}
    assert names["numbers"] == "[1, 2, 3]"

    debug.request("continue", threadId=thread)
    result = running.get(timeout=TIMEOUT)
    assert not isinstance(result, BaseException), result
    assert result.ok and result.stdout == "total 12\n"
    debug.request("disconnect", restart=False, terminateDebuggee=True)
    # the kernel runs cells as before, the breakpoints gone with the session
    assert kernel.execute("1 + 1", timeout=TIMEOUT).result_text == "2"


def test_the_kernelspec_and_kernel_info_advertise_the_debugger(kernel, server):
    assert "debugger" in kernel.kernel_info(timeout=TIMEOUT).get("supported_features", [])
    request = urllib.request.Request(
        f"{server.url}api/kernelspecs", headers={"Authorization": f"token {server.token}"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
        spec = json.load(r)["kernelspecs"]["python3"]["spec"]
    assert spec["metadata"]["debugger"] is True


def test_the_debuggers_cell_files_go_with_the_kernel(client):
    # ipykernel's debugger writes each dumped cell to a file in the temporary
    # directory. As root that is the kernel's private /tmp; without root it
    # must not be the machine's shared /tmp, where it would outlive the kernel.
    model = client.create_kernel()
    with client.connect(model.id) as kernel:
        debug = Debugging(kernel)
        debug.start()
        source = debug.request("dumpCell", code=CELL)["body"]["sourcePath"]
        workdir = kernel.execute("import os; os.getcwd()").result_text.strip("'")
        debug.request("disconnect", restart=False, terminateDebuggee=False)
    if os.path.exists(source):  # without root: the kernel's scratch directory
        assert source.startswith(workdir + ".tmp" + os.sep), source
    else:  # as root: a /tmp nobody outside the kernel sees
        assert source.startswith("/tmp/"), source
    client.delete_kernel(model.id)
    deadline = time.monotonic() + TIMEOUT
    while os.path.exists(source) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(source), "the cell file outlived its kernel"
