"""Jupyter clients on /api/kernels/{id}/channels, in both formats, on real kernels.

The client side is written with jupyter_server's own (de)serialisers, so the
server's codec is checked against an implementation it shares no code with.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid

import pytest
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from cellmux.server.jupyter.codec import V1_SUBPROTOCOL
from conftest import start_server

FORMATS = ["v1", "legacy"]


def channels_url(server, kernel_id: str, session_id: str | None = None, token: bool = True) -> str:
    base = server.url.replace("http://", "ws://").rstrip("/")
    query = [f"session_id={session_id}"] if session_id else []
    if token:
        query.append(f"token={server.token}")
    return f"{base}/api/kernels/{kernel_id}/channels?{'&'.join(query)}"


# An error makes ipykernel abort the requests that arrive just after it
# (stop_on_error); the test's next request must not be one of them.
LOOP = {"code": "while True: pass", "silent": False, "stop_on_error": False}


class JupyterClient:
    """A minimal Jupyter websocket client, in either format."""

    def __init__(
        self, server, kernel_id: str, fmt: str, session_id: str | None = None, **options
    ) -> None:
        self.fmt = fmt
        self.session = session_id or uuid.uuid4().hex
        protocols = [V1_SUBPROTOCOL] if fmt == "v1" else None
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(
            connect(
                channels_url(server, kernel_id, self.session),
                subprotocols=protocols,
                max_size=None,
                open_timeout=30,
                **options,
            )
        )

    def close(self) -> None:
        self._stack.close()

    def send(
        self, channel: str, msg_type: str, content: dict, buffers=(), parent=None, **header_fields
    ) -> str:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": self.session,
            "username": "test",
            "date": "2026-01-01T00:00:00.000000Z",
            "version": "5.3",
            **header_fields,
        }
        parts = [header, parent or {}, {}, content]
        if self.fmt == "v1":
            payload = serialize_msg_to_ws_v1(
                [json.dumps(p).encode() for p in parts] + list(buffers), channel
            )
        else:
            msg = dict(zip(["header", "parent_header", "metadata", "content"], parts, strict=True))
            msg["channel"] = channel
            if buffers:
                msg["buffers"] = list(buffers)
                payload = serialize_binary_message(msg)
            else:
                payload = json.dumps(msg)
        self.ws.send(payload)
        return msg_id

    def recv(self, timeout: float = 30) -> dict:
        data = self.ws.recv(timeout=timeout)
        if self.fmt == "v1":
            assert isinstance(data, bytes)
            channel, parts = deserialize_msg_from_ws_v1(data)
            header, parent, metadata, content = (json.loads(p) for p in parts[:4])
            return {
                "channel": channel,
                "header": header,
                "parent_header": parent,
                "metadata": metadata,
                "content": content,
                "msg_type": header["msg_type"],
                "buffers": [bytes(b) for b in parts[4:]],
            }
        if isinstance(data, bytes):
            msg = deserialize_binary_message(data)
            msg["buffers"] = [bytes(b) for b in msg["buffers"]]
        else:
            msg = json.loads(data)
            msg.setdefault("buffers", [])
        return msg

    def until(self, predicate, timeout: float = 30) -> list[dict]:
        """Messages received up to and including the first that matches."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(timeout=max(0.1, deadline - time.monotonic()))
            seen.append(msg)
            if predicate(msg):
                return seen

    def execute(self, code: str, on_input=None, timeout: float = 60) -> tuple[str, list[dict]]:
        """Run code; answer input_request with on_input; return (stdout, messages)."""
        msg_id = self.send(
            "shell", "execute_request", {"code": code, "silent": False, "allow_stdin": True}
        )
        seen = []
        idle = replied = False
        deadline = time.monotonic() + timeout
        while not (idle and replied):
            msg = self.recv(timeout=max(0.1, deadline - time.monotonic()))
            seen.append(msg)
            if msg["msg_type"] == "input_request":
                assert msg["channel"] == "stdin"
                self.send("stdin", "input_reply", {"value": on_input(msg["content"]["prompt"])})
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "execute_reply":
                assert msg["channel"] == "shell"
                replied = True
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        stdout = "".join(
            m["content"]["text"]
            for m in seen
            if m["msg_type"] == "stream"
            and m["content"]["name"] == "stdout"
            and m["parent_header"].get("msg_id") == msg_id
        )
        return stdout, seen


@pytest.fixture
def kernel_id(client):
    model = client.create_kernel()
    yield model.id
    with contextlib.suppress(Exception):
        client.delete_kernel(model.id)


@pytest.fixture(params=FORMATS)
def jupyter(request, server, kernel_id):
    c = JupyterClient(server, kernel_id, request.param)
    yield c
    c.close()


def test_subprotocol_is_selected_only_when_offered(jupyter):
    expected = V1_SUBPROTOCOL if jupyter.fmt == "v1" else None
    assert jupyter.ws.subprotocol == expected


def test_execute_gives_stream_result_and_reply(jupyter):
    stdout, seen = jupyter.execute("print('hi'); 6 * 7")
    assert stdout == "hi\n"
    result = next(m for m in seen if m["msg_type"] == "execute_result")
    assert result["channel"] == "iopub"
    assert result["content"]["data"]["text/plain"] == "42"
    reply = next(m for m in seen if m["msg_type"] == "execute_reply")
    assert reply["content"]["status"] == "ok"
    if jupyter.fmt == "legacy":  # buffer-free messages travel as text with Jupyter's keys
        assert reply["msg_id"] == reply["header"]["msg_id"]


def test_subshells_run_cells_beside_the_main_shell(jupyter):
    # JupyterLab runs widget callbacks in subshells (ipykernel 7). cellmux
    # sends the main shell's replies to the pump by a shorter path (tuning
    # change "replies"); a subshell's keep ipykernel's own.
    def reply_to(msg_id):
        return lambda m: m["msg_type"].endswith("_reply") and m["parent_header"]["msg_id"] == msg_id

    created = jupyter.until(reply_to(jupyter.send("control", "create_subshell_request", {})))
    subshell_id = created[-1]["content"]["subshell_id"]
    # The main shell is busy in a loop while the subshell answers.
    main = jupyter.send(
        "shell", "execute_request", {"code": "import time; time.sleep(1); 'main'", "silent": False}
    )
    sub = jupyter.send(
        "shell",
        "execute_request",
        {"code": "'sub'", "silent": False},
        subshell_id=subshell_id,
    )
    before = jupyter.until(reply_to(sub))
    assert before[-1]["channel"] == "shell" and before[-1]["content"]["status"] == "ok"
    assert not any(reply_to(main)(m) for m in before)  # the main shell is still sleeping
    after = jupyter.until(reply_to(main))
    assert after[-1]["channel"] == "shell" and after[-1]["content"]["status"] == "ok"
    results = [m for m in before + after if m["msg_type"] == "execute_result"]
    assert [r["content"]["data"]["text/plain"] for r in results] == ["'sub'", "'main'"]
    stdout, _ = jupyter.execute("print('after')")
    assert stdout == "after\n"


def test_input_is_answered_over_stdin(jupyter):
    prompts = []

    def answer(prompt: str) -> str:
        prompts.append(prompt)
        return "Ada"

    stdout, _ = jupyter.execute("name = input('name? ')\nprint('hello', name)", on_input=answer)
    assert prompts == ["name? "]
    assert stdout == "hello Ada\n"


def test_prompt_reaches_a_client_whose_header_session_is_not_its_session_id(server, kernel_id):
    jupyter = JupyterClient(server, kernel_id, "legacy", session_id="query-session")
    jupyter.session = "header-session"  # what its messages say from now on
    try:
        stdout, _ = jupyter.execute("print(input('q? '))", on_input=lambda prompt: "yes")
        assert stdout == "yes\n"
    finally:
        jupyter.close()


ECHO_TARGET = """
from comm import get_comm_manager

def _echo_target(comm, open_msg):
    @comm.on_msg
    def _echo(msg):
        comm.send({"echo": msg["content"]["data"]}, buffers=msg["buffers"])

get_comm_manager().register_target("echo", _echo_target)
"""


def test_comm_buffers_pass_byte_for_byte_both_ways(jupyter):
    """Widgets' binary buffers: client -> kernel -> client, every byte value, 1 MiB."""
    jupyter.execute(ECHO_TARGET)
    comm_id = uuid.uuid4().hex
    jupyter.send("shell", "comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}})
    sent = [bytes(range(256)), os.urandom(1024 * 1024), b""]
    jupyter.send("shell", "comm_msg", {"comm_id": comm_id, "data": {"n": len(sent)}}, buffers=sent)
    echo = jupyter.until(
        lambda m: m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id
    )[-1]
    assert echo["channel"] == "iopub"
    assert echo["content"]["data"] == {"echo": {"n": 3}}
    assert echo["buffers"] == sent


def test_kernel_made_buffers_reach_the_client(jupyter):
    _, seen = jupyter.execute(
        "from comm import create_comm\n"
        "c = create_comm(target_name='viewer', data={'x': 1}, buffers=[bytes(range(256)) * 4])"
    )
    opened = next(m for m in seen if m["msg_type"] == "comm_open")
    assert opened["buffers"] == [bytes(range(256)) * 4]


def test_jupyter_and_native_clients_see_the_same_output(server, client, kernel_id):
    jupyter = JupyterClient(server, kernel_id, "v1")
    native_seen = []
    try:
        with client.connect(kernel_id) as native:
            native.add_listener(native_seen.append)
            stdout, _ = jupyter.execute("for i in range(3): print('line', i)")
            assert stdout == "line 0\nline 1\nline 2\n"
            native.ping()  # everything sent before this has arrived
            native_out = "".join(
                json.loads(f.parts[3])["text"] for f in native_seen if f.channel == 2
            )
            assert native_out == stdout
            # and the other way round: the native client's output reaches Jupyter
            result = native.execute("print('from native')")
            assert result.stdout == "from native\n"
            streams = jupyter.until(
                lambda m: m["msg_type"] == "stream" and "from native" in m["content"]["text"]
            )
            assert streams[-1]["channel"] == "iopub"
    finally:
        jupyter.close()


def test_shell_replies_go_only_to_the_requesting_session(server, kernel_id):
    a = JupyterClient(server, kernel_id, "v1")
    b = JupyterClient(server, kernel_id, "legacy")
    try:
        a.execute("1")
        b.send("shell", "kernel_info_request", {})
        got = b.until(lambda m: m["msg_type"] == "kernel_info_reply")
        assert not [m for m in got if m["msg_type"] == "execute_reply"]
    finally:
        a.close()
        b.close()


def test_interrupt_and_restart_through_the_rest_api(server, client, kernel_id, jupyter):
    msg_id = jupyter.send("shell", "execute_request", LOOP)
    jupyter.until(lambda m: m["msg_type"] == "execute_input")
    time.sleep(0.5)  # let the loop start
    client.interrupt_kernel(kernel_id)
    reply = jupyter.until(
        lambda m: m["msg_type"] == "execute_reply" and m["parent_header"]["msg_id"] == msg_id
    )[-1]
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    client.restart_kernel(kernel_id)
    # as a stock restart: the new kernel is starting, then idle
    statuses = jupyter.until(
        lambda m: (
            m["msg_type"] == "status"
            and m["content"]["execution_state"] == "idle"
            and not m["parent_header"]
        )
    )
    assert any(m["content"]["execution_state"] == "starting" for m in statuses)
    assert all(m["channel"] == "iopub" for m in statuses if m["msg_type"] == "status")
    stdout, _ = jupyter.execute("print('after restart')")
    assert stdout == "after restart\n"


def test_reconnecting_session_gets_what_it_missed(server, kernel_id):
    """Close the socket mid-run; the same session_id gets the later output."""
    session = uuid.uuid4().hex
    first = JupyterClient(server, kernel_id, "v1", session_id=session)
    first.execute("import time")
    first.send(
        "shell",
        "execute_request",
        {"code": "time.sleep(1.5); print('while you were away')", "silent": False},
    )
    first.until(lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "busy")
    first.close()
    time.sleep(2.5)
    second = JupyterClient(server, kernel_id, "v1", session_id=session)
    try:
        got = second.until(
            lambda m: m["msg_type"] == "stream" and "while you were away" in m["content"]["text"],
            timeout=10,
        )
        assert got[-1]["channel"] == "iopub"
    finally:
        second.close()


def test_a_session_away_too_long_is_told_what_it_lost(tmp_path):
    """With a tiny replay log, the returning session learns how much is gone."""
    config = tmp_path / "cellmux.toml"
    config.write_text("[cellmux]\nreplay_bytes = 4096\n")
    small = start_server("--pool-size", "1", "--config", str(config))
    try:
        with small.client() as native:
            kernel_id = native.create_kernel().id
        session = uuid.uuid4().hex
        first = JupyterClient(small, kernel_id, "v1", session_id=session)
        first.execute("print('seen')")
        first.close()
        with small.client() as native, native.connect(kernel_id) as k:
            k.execute("import sys\nfor i in range(40): print('x' * 500, i); sys.stdout.flush()")
        second = JupyterClient(small, kernel_id, "v1", session_id=session)
        try:
            notice = second.until(lambda m: m["msg_type"] == "stream", timeout=10)[-1]
            assert notice["content"]["name"] == "stderr"
            assert "no longer kept" in notice["content"]["text"]
            # what the log still holds follows the notice, the newest line last
            got = second.until(
                lambda m: m["msg_type"] == "stream" and m["content"]["text"].endswith(" 39\n")
            )
            assert got[-1]["channel"] == "iopub"
        finally:
            second.close()
    finally:
        small.stop()


def test_a_client_that_stops_reading_costs_nothing_and_loses_nothing_silently(
    server, client, kernel_id
):
    """A silent client that does not read is paused, not buffered for.

    30 MB of output go past it (more than socket buffers and the 8 MiB
    replay log hold); when it reads again it gets a notice of what is gone,
    then the rest in order, up to the last line.
    """
    slow = JupyterClient(server, kernel_id, "v1", max_queue=1)
    try:
        with client.connect(kernel_id) as native:
            result = native.execute(
                "import sys\nfor i in range(30000): print('y' * 1000, i)\nprint('end')",
                timeout=240,
            )
            assert result.stdout.endswith("29999\nend\n")
        got = slow.until(lambda m: m["msg_type"] == "stream" and "end\n" in m["content"]["text"])
        streams = [m["content"] for m in got if m["msg_type"] == "stream"]
        notices = [c["text"] for c in streams if c["name"] == "stderr"]
        assert len(notices) == 1 and "no longer kept" in notices[0]
        # after the notice: contiguous, in order, up to the last line (the
        # first line may start mid-line: stream messages split anywhere)
        after = streams[[c["name"] for c in streams].index("stderr") + 1 :]
        lines = "".join(c["text"] for c in after if c["name"] == "stdout").splitlines()[1:]
        assert lines[-1] == "end"
        numbers = [int(line.rsplit(" ", 1)[1]) for line in lines[:-1]]
        assert numbers and numbers[-1] == 29999
        assert numbers == list(range(numbers[0], 30000))
    finally:
        slow.close()


def test_shutdown_closes_the_socket(server, client):
    model = client.create_kernel()
    jupyter = JupyterClient(server, model.id, "legacy")
    client.delete_kernel(model.id)
    with pytest.raises(ConnectionClosed) as info:
        while True:
            jupyter.recv(timeout=10)
    assert info.value.rcvd.code == 4000


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "session", "token", "status"),
    [("no-such-kernel", "s", True, 404), (None, "s", False, 403), (None, "s" * 201, True, 400)],
)
def test_refused_handshakes(server, kernel_id, kernel, session, token, status):
    url = channels_url(server, kernel or kernel_id, session, token=token)
    with pytest.raises(InvalidStatus) as info:
        connect(url, open_timeout=10)
    assert info.value.response.status_code == status


def test_bad_request_gets_an_error_reply_and_the_socket_stays(jupyter):
    # a request whose content is not an object: answered, not relayed
    header = {"msg_id": "bad1", "msg_type": "execute_request", "session": jupyter.session}
    if jupyter.fmt == "v1":
        jupyter.ws.send(
            serialize_msg_to_ws_v1([json.dumps(header).encode(), b"{}", b"{}", b"[1]"], "shell")
        )
    else:
        jupyter.ws.send(
            json.dumps(
                {
                    "header": header,
                    "parent_header": {},
                    "metadata": {},
                    "content": [1],
                    "channel": "shell",
                }
            )
        )
    reply = jupyter.until(lambda m: m["parent_header"].get("msg_id") == "bad1")[-1]
    assert reply["msg_type"] == "execute_reply"
    assert reply["content"]["status"] == "error"
    assert "content must be a JSON object" in reply["content"]["evalue"]
    # an iopub message from a client: a stderr notice
    jupyter.send("iopub", "stream", {"name": "stdout", "text": "x"})
    notice = jupyter.until(lambda m: m["msg_type"] == "stream")[-1]
    assert notice["content"]["name"] == "stderr"
    assert "clients cannot send on iopub" in notice["content"]["text"]
    stdout, _ = jupyter.execute("print('still here')")
    assert stdout == "still here\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_unreadable_frame_closes_with_protocol_error(server, kernel_id, fmt):
    jupyter = JupyterClient(server, kernel_id, fmt)
    jupyter.ws.send(b"\x00\x00\x00\x05garbage")
    with pytest.raises(ConnectionClosed) as info:
        while True:
            jupyter.recv(timeout=10)
    assert info.value.rcvd.code == 1002
    # and the kernel still serves a new connection
    again = JupyterClient(server, kernel_id, fmt)
    try:
        assert again.execute("print(1)")[0] == "1\n"
    finally:
        again.close()


def test_text_frame_on_v1_closes_with_unsupported_data(server, kernel_id):
    jupyter = JupyterClient(server, kernel_id, "v1")
    jupyter.ws.send("{}")
    with pytest.raises(ConnectionClosed) as info:
        while True:
            jupyter.recv(timeout=10)
    assert info.value.rcvd.code == 1003


def test_foreign_browser_origin_is_refused(server, kernel_id):
    url = channels_url(server, kernel_id, "s")
    with pytest.raises(InvalidStatus) as info:
        connect(url, origin="http://evil.example", open_timeout=10)
    assert info.value.response.status_code == 403
    # the server's own origin is fine
    own = server.url.rstrip("/")
    with connect(url, origin=own, open_timeout=10) as ws:
        assert ws.subprotocol is None
