"""Knowing another client's session id is not enough to see its prompts or replies."""

from __future__ import annotations

import contextlib
import json
import types
import uuid
from datetime import UTC, datetime

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
from cellmux.protocol.jupyter import jupyter_parts
from test_jupyter_ws import JupyterClient


@contextlib.contextmanager
def attached(server, token: str, kernel_id: str, session: str):
    with connect(server.url.replace("http://", "ws://") + f"ws?token={token}") as ws:
        hello = control_frame("hello", version=PROTOCOL_VERSION, kernel=kernel_id, session=session)
        ws.send(encode_frame(hello))
        frame = decode_frame(ws.recv(timeout=15))
        assert parse_control(frame)["op"] == "welcome"
        yield ws


def sync(owner: JupyterClient, spy: JupyterClient) -> list[dict]:
    """What the spy received up to the end of a request the owner makes now.

    The server relays in order, so this is everything sent to it before.
    """
    msg_id = owner.send("shell", "kernel_info_request", {})
    owner.until(lambda m: m["msg_type"] == "kernel_info_reply")
    return spy.until(
        lambda m: (
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == msg_id
            and m["content"]["execution_state"] == "idle"
        )
    )


def until_pong(ws) -> list:
    """Every frame up to the answer of a ping (all the server sent before it)."""
    ws.send(encode_frame(control_frame("ping", id="sync")))
    frames = []
    while True:
        frame = decode_frame(ws.recv(timeout=15))
        if frame.channel == Channel.CONTROL and parse_control(frame).get("op") == "pong":
            return frames
        frames.append(frame)


def ask(ws, session: str) -> None:
    parts = jupyter_parts(
        "execute_request",
        {"code": "print(input('pin? '))", "silent": False, "allow_stdin": True},
        now=datetime.now(UTC),
        session=session,
    )
    ws.send(frame_bytes(Channel.EXECUTE, JupyterSocket.SHELL, 0, list(parts)))


def test_the_owners_waiting_prompt_goes_to_nobody_else_who_names_its_session(server, client):
    model = client.create_kernel()
    owner_session = "owner-" + uuid.uuid4().hex
    observer = client.share_kernel(model.id, "observer")["token"]
    collaborator = client.share_kernel(model.id, "collaborator")["token"]
    try:
        with attached(server, server.token, model.id, owner_session) as owner:
            ask(owner, owner_session)
            while decode_frame(owner.recv(timeout=30)).channel != Channel.STDIN:
                pass
        # The owner is gone; its prompt waits. Others attach with its session
        # id (history shows it) and must not be shown the prompt.
        for token in (observer, collaborator):
            with attached(server, token, model.id, owner_session) as spy:
                assert Channel.STDIN not in [f.channel for f in until_pong(spy)]
        # The owner comes back and still gets it, and answers it.
        with attached(server, server.token, model.id, owner_session) as owner:
            frames = until_pong(owner)
            prompt = next(f for f in frames if f.channel == Channel.STDIN)
            reply = jupyter_parts(
                "input_reply",
                {"value": "1234"},
                now=datetime.now(UTC),
                session=owner_session,
                parent=json.loads(prompt.parts[0]),
            )
            owner.send(frame_bytes(Channel.STDIN, JupyterSocket.STDIN, 0, list(reply)))
            while True:
                frame = decode_frame(owner.recv(timeout=30))
                if frame.channel == Channel.STDOUT and b"1234" in frame.parts[3]:
                    break
    finally:
        client.delete_kernel(model.id)


def test_a_refused_jupyter_message_does_not_make_its_session_the_observers(server, client):
    model = client.create_kernel()
    observer = client.share_kernel(model.id, "observer")["token"]
    owner = JupyterClient(server, model.id, "legacy")
    spy = JupyterClient(types.SimpleNamespace(url=server.url, token=observer), model.id, "v1")
    try:
        # The observer names the owner's session in a message (refused).
        spy.send("shell", "kernel_info_request", {}, session=owner.session)
        refused = spy.until(lambda m: m["msg_type"] == "kernel_info_reply")
        assert refused[-1]["content"]["status"] == "error"
        msg_id = owner.send(
            "shell",
            "execute_request",
            {"code": "pin = 1234", "silent": False, "user_expressions": {"secret": "pin"}},
        )
        owner.until(lambda m: m["msg_type"] == "execute_reply")
        # The observer sees the owner's output, but not its reply.
        seen = sync(owner, spy)
        assert msg_id in [m["parent_header"].get("msg_id") for m in seen]
        assert not [m for m in seen if m["msg_type"].endswith("_reply")]
    finally:
        owner.close()
        spy.close()
        client.delete_kernel(model.id)


def test_an_observer_using_the_owners_session_id_gets_none_of_its_replies(server, client):
    model = client.create_kernel()
    observer = client.share_kernel(model.id, "observer")["token"]
    owner = JupyterClient(server, model.id, "v1")
    try:
        owner.execute("1")
        spy = JupyterClient(
            types.SimpleNamespace(url=server.url, token=observer), model.id, "v1", owner.session
        )
        try:
            msg_id = owner.send("shell", "execute_request", {"code": "2", "silent": False})
            owner.until(lambda m: m["msg_type"] == "execute_reply")
            seen = sync(owner, spy)
            assert "execute_result" in [m["msg_type"] for m in seen]
            assert msg_id in [m["parent_header"].get("msg_id") for m in seen]
            assert not [m for m in seen if m["msg_type"].endswith("_reply")]
        finally:
            spy.close()
    finally:
        owner.close()
        client.delete_kernel(model.id)
