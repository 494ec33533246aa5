"""The rows of docs/jupyter.md's bad-input table that other tests leave out,
each on a real server and kernel, as the table words them."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cellmux.server.jupyter.channels import MAX_REFUSED
from test_jupyter_status import no_jupyter_restarts  # noqa: F401 - a fixture
from test_jupyter_ws import FORMATS, JupyterClient


@pytest.fixture
def kernel_id(client):
    model = client.create_kernel()
    yield model.id
    with contextlib.suppress(Exception):
        client.delete_kernel(model.id)


def _closed_code(jupyter: JupyterClient) -> int:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            jupyter.recv(timeout=10)
    return info.value.rcvd.code


def test_a_legacy_message_without_channel_goes_to_shell(server, kernel_id):
    # What jupyter_server's GatewayKernelClient sends.
    jupyter = JupyterClient(server, kernel_id, "legacy")
    try:
        header = {
            "msg_id": "nochannel",
            "msg_type": "kernel_info_request",
            "session": jupyter.session,
            "username": "test",
            "version": "5.3",
        }
        jupyter.ws.send(json.dumps({"header": header, "parent_header": {}, "content": {}}))
        reply = jupyter.until(
            lambda m: m["parent_header"].get("msg_id") == "nochannel" and m["channel"] == "shell"
        )[-1]
        assert reply["msg_type"] == "kernel_info_reply"
        assert reply["channel"] == "shell"
        assert reply["content"]["status"] == "ok"
    finally:
        jupyter.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_message_type_clients_do_not_send_gets_a_notice(server, kernel_id, fmt):
    jupyter = JupyterClient(server, kernel_id, fmt)
    try:
        jupyter.send("shell", "status", {"execution_state": "idle"})
        notice = jupyter.until(lambda m: m["msg_type"] == "stream")[-1]
        assert notice["channel"] == "iopub"
        assert notice["content"]["name"] == "stderr"
        assert "clients cannot send status on shell" in notice["content"]["text"]
        assert jupyter.execute("print('open')")[0] == "open\n"
    finally:
        jupyter.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_request_to_a_dead_kernel_gets_an_error_reply(no_jupyter_restarts, fmt):  # noqa: F811
    server = no_jupyter_restarts
    with server.client() as client:
        model = client.create_kernel()
        jupyter = JupyterClient(server, model.id, fmt)
        try:
            jupyter.send("shell", "execute_request", {"code": "import os; os._exit(1)"})
            jupyter.until(
                lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "dead"
            )
            msg_id = jupyter.send("shell", "execute_request", {"code": "1", "silent": False})
            reply = jupyter.until(
                lambda m: m["parent_header"].get("msg_id") == msg_id and m["channel"] == "shell"
            )[-1]
            assert reply["msg_type"] == "execute_reply"
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "CellmuxError"
            # the socket stays open: a restart brings the kernel back to it
            client.restart_kernel(model.id)
            assert jupyter.execute("print('back')")[0] == "back\n"
        finally:
            jupyter.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_more_than_max_refused_messages_close_the_socket(server, kernel_id, fmt):
    jupyter = JupyterClient(server, kernel_id, fmt)
    try:
        for _ in range(MAX_REFUSED):
            jupyter.send("iopub", "stream", {"name": "stdout", "text": "x"})
        for _ in range(MAX_REFUSED):  # each answered, the socket still open
            assert jupyter.recv()["msg_type"] == "stream"
        jupyter.send("iopub", "stream", {"name": "stdout", "text": "x"})
        assert _closed_code(jupyter) == 1002
    finally:
        jupyter.close()


def _share_url(server, kernel_id: str, token: str) -> str:
    base = server.url.replace("http://", "ws://").rstrip("/")
    return f"{base}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}&token={token}"


def test_an_observers_request_gets_an_error_reply_and_revoking_closes_4403(
    server, client, kernel_id
):
    share = client.share_kernel(kernel_id, "observer")
    with connect(
        _share_url(server, kernel_id, share["token"]),
        subprotocols=["v1.kernel.websocket.jupyter.org"],
        open_timeout=30,
    ) as ws:
        header = {"msg_id": "spy", "msg_type": "execute_request", "session": "s"}
        content = json.dumps({"code": "print('sneaky')", "silent": False}).encode()
        ws.send(
            serialize_msg_to_ws_v1([json.dumps(header).encode(), b"{}", b"{}", content], "shell")
        )
        while True:
            channel, parts = deserialize_msg_from_ws_v1(ws.recv(timeout=30))
            parent = json.loads(parts[1])
            if parent.get("msg_id") == "spy" and channel == "shell":
                break
        assert channel == "shell"
        reply = json.loads(parts[3])
        assert reply["status"] == "error" and reply["ename"] == "CellmuxError"
        client.revoke_share(kernel_id, share["id"])
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=10)
        assert info.value.rcvd.code == 4403
    # the kernel never ran it: its execution count is still 0
    with client.connect(kernel_id) as native:
        assert native.execute("print('owner')").execution_count == 1
