"""From nothing to a first result in one round trip: ``hello.create`` (protocol version 2).

A client opens the websocket, sends a hello that asks for a new kernel and,
without waiting for ``welcome``, its first request; the server makes the
kernel, attaches, and then handles what the client sent, in order. (The
orderings a real server cannot be made to show on demand, a client that
leaves or floods before its kernel is ready, are in test_native_units.py.)
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cellmux.protocol import Channel, JupyterSocket, control_frame, decode_frame, encode_frame
from cellmux.protocol.framing import Frame
from cellmux.protocol.jupyter import jupyter_parts


def ws_url(server, token: str | None = None) -> str:
    return server.url.replace("http://", "ws://") + f"ws?token={token or server.token}"


def create_hello(session: str, **create) -> bytes:
    return encode_frame(control_frame("hello", version=2, session=session, create=create))


def execute(code: str, session: str) -> tuple[bytes, str]:
    msg_id = uuid.uuid4().hex
    parts = jupyter_parts(
        "execute_request",
        {"code": code, "silent": False},
        now=datetime.now(UTC),
        session=session,
        msg_id=msg_id,
    )
    frame = Frame(channel=Channel.EXECUTE, parts=parts, socket=JupyterSocket.SHELL)
    return encode_frame(frame), msg_id


def read_until_result(ws, msg_id: str) -> tuple[dict, list[dict]]:
    """The welcome, then messages until the request's execute_result."""
    welcome = None
    seen = []
    while True:
        frame = decode_frame(ws.recv(timeout=60))
        if frame.channel == Channel.CONTROL:
            body = json.loads(frame.parts[0])
            if body["op"] == "welcome":
                welcome = body
            seen.append(body)
            continue
        header, parent = json.loads(frame.parts[0]), json.loads(frame.parts[1])
        if parent.get("msg_id") == msg_id and header["msg_type"] == "execute_result":
            assert welcome is not None, "a result before welcome"
            return welcome, [*seen, {"result": json.loads(frame.parts[3])}]


def test_hello_create_and_a_request_sent_before_welcome_give_a_result(server, client):
    session = uuid.uuid4().hex
    request, msg_id = execute("6 * 7", session)
    with connect(ws_url(server)) as ws:
        ws.send(create_hello(session))
        ws.send(request)  # at once: no waiting for welcome
        welcome, seen = read_until_result(ws, msg_id)
    assert welcome["version"] == 2 and welcome["role"] == "owner"
    kernel_id = welcome["kernel"]["id"]
    assert seen[-1]["result"]["data"]["text/plain"] == "42"
    # The kernel outlives the connection, like one made over REST.
    assert kernel_id in [k.id for k in client.list_kernels()]
    client.delete_kernel(kernel_id)


def test_the_python_client_starts_a_kernel_in_one_step(client):
    with client.start() as kernel:
        assert kernel.execute("1 + 1").result_text == "2"
        kernel_id = kernel.kernel_id
    assert client.get_kernel(kernel_id).id == kernel_id
    client.delete_kernel(kernel_id)


def test_a_plain_attach_still_speaks_version_1(server, client):
    model = client.create_kernel()
    with connect(ws_url(server)) as ws:
        ws.send(encode_frame(control_frame("hello", version=1, kernel=model.id, session="s")))
        body = json.loads(decode_frame(ws.recv(timeout=30)).parts[0])
    assert body["op"] == "welcome" and body["version"] == 1
    client.delete_kernel(model.id)


def test_an_unknown_kernel_spec_is_refused_with_a_clear_error(server, client):
    before = {k.id for k in client.list_kernels()}
    with connect(ws_url(server)) as ws:
        ws.send(create_hello("s", name="cobol"))
        body = json.loads(decode_frame(ws.recv(timeout=30)).parts[0])
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert body["op"] == "error" and body["code"] == "unknown_kernel_spec"
    assert "cobol" in body["message"] and body["fatal"] is True
    assert closed.value.rcvd.code == 4404
    assert {k.id for k in client.list_kernels()} == before


def test_a_share_token_may_not_create_kernels(server, client):
    model = client.create_kernel()
    share = client.share_kernel(model.id, "collaborator")
    before = {k.id for k in client.list_kernels()}
    with connect(ws_url(server, share["token"])) as ws:
        ws.send(create_hello("s"))
        body = json.loads(decode_frame(ws.recv(timeout=30)).parts[0])
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert body["code"] == "forbidden" and closed.value.rcvd.code == 4403
    assert {k.id for k in client.list_kernels()} == before
    client.delete_kernel(model.id)
