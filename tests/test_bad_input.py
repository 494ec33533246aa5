"""Bad input gets a clear error and takes down nothing but its request."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cellmux.protocol import (
    PROTOCOL_VERSION,
    Channel,
    JupyterSocket,
    control_frame,
    decode_frame,
    encode_frame,
    frame_bytes,
    parse_control,
)


def ws_url(server, token=True) -> str:
    url = server.url.replace("http://", "ws://") + "ws"
    return url + (f"?token={server.token}" if token else "")


def recv_control(ws) -> dict:
    while True:
        frame = decode_frame(ws.recv(timeout=10))
        if frame.channel == Channel.CONTROL:
            return parse_control(frame)


def hello(kernel_id: str) -> bytes:
    return encode_frame(
        control_frame("hello", version=PROTOCOL_VERSION, kernel=kernel_id, session=uuid.uuid4().hex)
    )


def http(server, method: str, path: str, token: str | None = "", body: bytes | None = None):
    headers = {}
    if token is not None:
        headers["Authorization"] = f"token {token or server.token}"
    req = urllib.request.Request(server.url.rstrip("/") + path, body, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("content-type"), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


def assert_server_still_serves(client):
    model = client.create_kernel()
    with client.connect(model.id) as k:
        assert k.execute("2 + 3").result_text == "5"
    client.delete_kernel(model.id)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00",
        b"\xff" * 16,
        frame_bytes(6, 1, 0, [b"{}"])[:-1],  # truncated
        frame_bytes(6, 1, 0, [b"{}"]) + b"!",  # trailing byte
        frame_bytes(2, 1, 0, [b"{}", b"{}", b"{}", b"{}"]),  # clients cannot send stdout
        frame_bytes(6, 1, 0, [b"{}"]),  # not a Jupyter message
        frame_bytes(0, 0, 0, [b"not json"]),
        frame_bytes(0, 0, 0, [json.dumps({"op": "fly"}).encode()]),
    ],
)
def test_malformed_frames_get_error_frames_and_the_connection_lives(server, client, garbage):
    model = client.create_kernel()
    with connect(ws_url(server)) as ws:
        ws.send(hello(model.id))
        assert recv_control(ws)["op"] == "welcome"
        ws.send(garbage)
        error = recv_control(ws)
        assert error["op"] == "error"
        assert error["fatal"] is False
        assert error["code"] and error["message"]
        ws.send(encode_frame(control_frame("ping", id=7)))
        assert recv_control(ws) == {"op": "pong", "id": 7}
    client.delete_kernel(model.id)
    assert_server_still_serves(client)


def test_text_frame_closes_with_unsupported_data(server, client):
    with connect(ws_url(server)) as ws:
        ws.send("hello as text")
        error = recv_control(ws)
        assert error["code"] == "text_frame"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 1003
    assert_server_still_serves(client)


def test_data_before_hello_closes_with_protocol_error(server, client):
    with connect(ws_url(server)) as ws:
        ws.send(frame_bytes(6, JupyterSocket.SHELL, 0, [b"{}"] * 4))
        assert recv_control(ws)["code"] == "expected_hello"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 1002
    assert_server_still_serves(client)


def test_unknown_kernel_in_hello(server):
    with connect(ws_url(server)) as ws:
        ws.send(hello("no-such-kernel"))
        error = recv_control(ws)
        assert error["code"] == "unknown_kernel"
        assert error["fatal"] is True
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 4404


def test_websocket_without_or_with_wrong_token_is_refused(server):
    for url in (ws_url(server, token=False), ws_url(server, token=False) + "?token=wrong"):
        with pytest.raises(Exception) as info:
            connect(url).close()
        assert "403" in str(info.value)


def test_oversized_frame_closes_with_1009(client):
    """A server with a small frame limit closes on a frame past it."""
    from conftest import start_server

    small = start_server("--pool-size", "1", "--config", _write_config("max_frame_size = 4096"))
    try:
        with small.client() as c:
            model = c.create_kernel()
        with connect(ws_url(small)) as ws:
            ws.send(hello(model.id))
            assert recv_control(ws)["op"] == "welcome"
            ws.send(frame_bytes(6, 1, 0, [b"x" * 10000] * 4))
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    ws.recv(timeout=10)
            assert info.value.rcvd.code == 1009
        assert_server_still_serves(small.client())
    finally:
        small.stop()


def _write_config(text: str) -> str:
    from conftest import config_file

    return config_file(text)


def test_unknown_kernel_is_404_json(server):
    for method, path in [
        ("GET", "/api/kernels/nope"),
        ("DELETE", "/api/kernels/nope"),
        ("POST", "/api/kernels/nope/interrupt"),
        ("POST", "/api/kernels/nope/restart"),
    ]:
        status, ctype, body = http(server, method, path)
        assert status == 404, (method, path)
        assert ctype == "application/json"
        assert set(json.loads(body)) == {"message", "reason"}


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_403(server, token):
    for method, path in [("GET", "/api/kernels"), ("POST", "/api/kernels"), ("GET", "/api")]:
        status, _ctype, body = http(server, method, path, token=token)
        assert status == 403
        assert json.loads(body)["reason"] == "Forbidden"


def test_token_in_query_is_accepted(server):
    status, _, _ = http(server, "GET", f"/api/kernels?token={server.token}", token=None)
    assert status == 200


def test_bad_bodies_and_methods(server):
    assert http(server, "POST", "/api/kernels", body=b"{nope")[0] == 400
    assert http(server, "POST", "/api/kernels", body=b"[1]")[0] == 400
    assert http(server, "POST", "/api/kernels", body=b'{"name": "ruby"}')[0] == 404
    assert http(server, "PUT", "/api/kernels")[0] == 405
    status, ctype, _body = http(server, "GET", "/nowhere")
    assert status == 404 and ctype == "application/json"


def test_token_never_reaches_the_log(server, client):
    http(server, "GET", f"/api/kernels?token={server.token}", token=None)
    client.list_kernels()
    assert server.token not in server.log()
    assert "token=<redacted>" in server.log()
