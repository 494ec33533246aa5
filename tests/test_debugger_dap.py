"""``cellmux debug --listen``: a DAP client speaks to a real kernel's debugpy
through the relay and a real server, over TCP, as VS Code or nvim-dap would."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from terminal_helpers import cellmux_env

TIMEOUT = 60


class DapClient:
    """DAP over a TCP socket: Content-Length framed JSON."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""
        self.seq = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, command: str, **arguments: Any) -> int:
        self.seq += 1
        body = json.dumps(
            {"type": "request", "seq": self.seq, "command": command, "arguments": arguments}
        ).encode()
        self.sock.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return self.seq

    def _read(self) -> dict[str, Any]:
        while b"\r\n\r\n" not in self.buffer:
            self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: *(\d+)", head, re.I).group(1))
        while len(rest) < length:
            self.buffer = head + b"\r\n\r\n" + rest
            self._recv()
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.buffer = rest[length:]
        return json.loads(rest[:length])

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the relay closed the connection")
        self.buffer += data

    def request(self, command: str, **arguments: Any) -> dict[str, Any]:
        seq = self.send(command, **arguments)
        while True:
            message = self._read()
            if message.get("type") == "event":
                self.events.append(message)
            elif message.get("request_seq") == seq:
                assert message["success"], message
                return message

    def event(self, name: str) -> dict[str, Any]:
        for i, event in enumerate(self.events):
            if event["event"] == name:
                return self.events.pop(i)
        while True:
            message = self._read()
            if message.get("type") == "event":
                if message["event"] == name:
                    return message
                self.events.append(message)


@pytest.fixture
def relay(server, client, tmp_path):
    model = client.create_kernel()
    env = cellmux_env(server, tmp_path / "state")
    process = subprocess.Popen(
        [sys.executable, "-m", "cellmux", "debug", "--kernel", model.id, "--listen", "127.0.0.1:0"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()
        match = re.search(r"DAP for kernel \S+ on 127\.0\.0\.1:(\d+)", line)
        assert match, line + process.stderr.read()
        yield model, int(match.group(1))
    finally:
        client.delete_kernel(model.id)
        try:
            assert process.wait(20) == 0  # the relay ends with its kernel
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            print(process.stderr.read())
            process.stderr.close()


def test_a_dap_client_sets_a_breakpoint_and_reads_variables_through_the_relay(relay, client):
    model, port = relay
    dap = DapClient(port)
    try:
        init = dap.request(
            "initialize", clientID="nvim-dap", adapterID="python", linesStartAt1=True
        )
        assert init["body"]["supportsConfigurationDoneRequest"]
        dap.request("attach", justMyCode=True)
        code = "a = 20\nb = 22\nc = a + b\nprint(c)\n"
        # The kernel names a cell's code after its hash (as for JupyterLab).
        path = dap.request("dumpCell", code=code)["body"]["sourcePath"]
        dap.request("setBreakpoints", source={"path": path}, breakpoints=[{"line": 3}])
        dap.request("configurationDone")

        with client.connect(model.id) as kernel:
            outcome: dict = {}
            thread = threading.Thread(
                target=lambda: outcome.update(r=kernel.execute(code, timeout=TIMEOUT))
            )
            thread.start()
            stopped = dap.event("stopped")["body"]
            assert stopped["reason"] == "breakpoint"
            frames = dap.request("stackTrace", threadId=stopped["threadId"])["body"]
            top = frames["stackFrames"][0]
            assert (top["source"]["path"], top["line"]) == (path, 3)
            scopes = dap.request("scopes", frameId=top["id"])["body"]["scopes"]
            ref = scopes[0]["variablesReference"]
            names = dap.request("variables", variablesReference=ref)["body"]["variables"]
            values = {v["name"]: v["value"] for v in names}
            assert (values["a"], values["b"]) == ("20", "22")
            answer = dap.request("evaluate", expression="a * b", frameId=top["id"])
            assert answer["body"]["result"] == "440"
            dap.request("continue", threadId=stopped["threadId"])
            thread.join(TIMEOUT)
            assert outcome["r"].stdout == "42\n"
    finally:
        dap.close()
    # The client left without "disconnect": the relay ended the session, so
    # the breakpoint is gone and the same code runs through.
    time.sleep(1)
    with client.connect(model.id) as kernel:
        again = kernel.execute(code, timeout=TIMEOUT)
        assert again.stdout == "42\n"


def test_a_second_dap_client_is_told_and_turned_away(relay):
    _model, port = relay
    first = DapClient(port)
    try:
        first.request("initialize", clientID="first", adapterID="python")
        second = DapClient(port)
        try:
            note = second._read()
            assert note["event"] == "output"
            assert "another DAP client" in note["body"]["output"]
            with pytest.raises(EOFError):
                second._read()
        finally:
            second.close()
        first.request("disconnect", restart=False, terminateDebuggee=False)
    finally:
        first.close()


def test_a_breakpoint_in_a_file_the_kernel_only_received_from_cellmux_run(relay, client):
    """An editor's breakpoint on its own file's path stops the code that
    cellmux run sent from that file (the source map's name), although the
    kernel has no such file."""
    model, port = relay
    path = "/nowhere/on/the/kernel/analysis.py"
    code = "a = 20\nb = 22\nc = a + b\nprint(c)\n"
    metadata = {"cellmux": {"filename": path, "first_line": 10}}
    with client.connect(model.id) as kernel:
        # an earlier run sent the file's lines 10-13
        assert kernel.execute(code, metadata=metadata, timeout=TIMEOUT).stdout == "42\n"
        dap = DapClient(port)
        try:
            dap.request("initialize", clientID="vscode", adapterID="python")
            dap.request("attach")
            answer = dap.request(
                "setBreakpoints", source={"path": path}, breakpoints=[{"line": 12}]
            )
            assert answer["body"]["breakpoints"][0]["verified"], answer
            dap.request("configurationDone")
            outcome: dict = {}
            thread = threading.Thread(
                target=lambda: outcome.update(
                    r=kernel.execute(code, metadata=metadata, timeout=TIMEOUT)
                )
            )
            thread.start()
            stopped = dap.event("stopped")["body"]
            top = dap.request("stackTrace", threadId=stopped["threadId"])["body"]["stackFrames"][0]
            assert (top["source"]["path"], top["line"]) == (path, 12)
            dap.request("continue", threadId=stopped["threadId"])
            thread.join(TIMEOUT)
            assert outcome["r"].stdout == "42\n"
            dap.request("disconnect", restart=False, terminateDebuggee=False)
        finally:
            dap.close()
