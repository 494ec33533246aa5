"""Roles and share links: owners, collaborators and read-only observers."""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
import uuid

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cellmux.client import Client, HTTPError, ServerError
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


@contextlib.contextmanager
def raw(server, token: str, kernel_id: str, session: str | None = None):
    """A bare websocket attached to a kernel with a given token."""
    with connect(server.url.replace("http://", "ws://") + f"ws?token={token}") as ws:
        hello = control_frame(
            "hello",
            version=PROTOCOL_VERSION,
            kernel=kernel_id,
            session=session or uuid.uuid4().hex,
        )
        ws.send(encode_frame(hello))
        yield ws


def next_control(ws) -> dict:
    while True:
        frame = decode_frame(ws.recv(timeout=15))
        if frame.channel == Channel.CONTROL:
            return parse_control(frame)


def execute_frame(code: str, session: str) -> bytes:
    from datetime import UTC, datetime

    parts = jupyter_parts(
        "execute_request",
        {"code": code, "silent": False, "allow_stdin": True},
        now=datetime.now(UTC),
        session=session,
    )
    return frame_bytes(Channel.EXECUTE, JupyterSocket.SHELL, 0, list(parts))


@pytest.fixture
def shared(client):
    model = client.create_kernel()
    yield model
    client.delete_kernel(model.id)


def test_observer_sees_output_but_cannot_execute_interrupt_or_restart(server, client, shared):
    share = client.share_kernel(shared.id, "observer")
    assert share["role"] == "observer" and "token" in share
    with raw(server, share["token"], shared.id) as ws:
        welcome = next_control(ws)
        assert welcome["op"] == "welcome" and welcome["role"] == "observer"
        ws.send(execute_frame("print('sneaky')", "observer-session"))
        refused = next_control(ws)
        assert (refused["code"], refused["fatal"]) == ("forbidden", False)
        for op in ("interrupt", "restart", "shutdown"):
            ws.send(encode_frame(control_frame(op, id=op)))
            reply = next_control(ws)
            assert (reply["op"], reply["id"], reply["code"]) == ("error", op, "forbidden")
        # it still receives the owner's output
        with client.connect(shared.id) as owner:
            owner.execute("print('visible')")
        texts = []
        while not any("visible" in t for t in texts):
            frame = decode_frame(ws.recv(timeout=15))
            if frame.channel == Channel.STDOUT:
                texts.append(frame.parts[3].decode())
        assert not any("sneaky" in t for t in texts)


def test_observer_never_gets_stdin_prompts_even_with_the_owners_session(server, client, shared):
    share = client.share_kernel(shared.id, "observer")
    owner_session = "owner-" + uuid.uuid4().hex
    seen = []
    with raw(server, share["token"], shared.id, session=owner_session) as spy:
        assert next_control(spy)["op"] == "welcome"
        with client.connect(shared.id, session=owner_session) as owner:
            result = owner.execute("print(input('pin? '))", on_stdin=lambda p, pw: "1234")
            assert result.stdout == "1234\n"
        spy.send(encode_frame(control_frame("ping", id=1)))
        while True:
            frame = decode_frame(spy.recv(timeout=15))
            seen.append(frame.channel)
            if frame.channel == Channel.CONTROL and parse_control(frame).get("op") == "pong":
                break
    assert Channel.STDOUT in seen
    assert Channel.STDIN not in seen


def test_collaborator_executes_answers_stdin_and_interrupts_but_cannot_restart(
    server, client, shared
):
    share = client.share_kernel(shared.id, "collaborator")
    with (
        Client(server.url, token=share["token"]) as collaborator,
        collaborator.connect(shared.id) as k,
    ):
        assert k.execute("print(input())", on_stdin=lambda p, pw: "ok").stdout == "ok\n"
        k.interrupt()
        with pytest.raises(ServerError) as info:
            k.restart()
        assert info.value.code == "forbidden"
        with pytest.raises(ServerError):
            k.shutdown()


def test_a_share_token_is_for_its_kernel_only(server, client, shared):
    other = client.create_kernel()
    share = client.share_kernel(shared.id, "collaborator")
    try:
        with raw(server, share["token"], other.id) as ws:
            error = next_control(ws)
            assert (error["code"], error["fatal"]) == ("forbidden", True)
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd.code == 4403
        with Client(server.url, token=share["token"]) as guest:
            assert guest.get_kernel(shared.id).id == shared.id
            for call in (
                lambda: guest.get_kernel(other.id),
                guest.list_kernels,
                guest.create_kernel,
                lambda: guest.delete_kernel(shared.id),
                lambda: guest.share_kernel(shared.id, "observer"),
            ):
                with pytest.raises(HTTPError) as refused:
                    call()
                assert refused.value.status == 403
    finally:
        client.delete_kernel(other.id)


def test_revoking_a_share_cuts_off_its_connections(server, client, shared):
    share = client.share_kernel(shared.id, "observer")
    assert [s["id"] for s in client.list_shares(shared.id)] == [share["id"]]
    with raw(server, share["token"], shared.id) as ws:
        assert next_control(ws)["op"] == "welcome"
        client.revoke_share(shared.id, share["id"])
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=10)
        assert info.value.rcvd.code == 4403
    with pytest.raises(Exception, match="403"), raw(server, share["token"], shared.id):
        pass
    assert client.list_shares(shared.id) == []


def test_share_roles_are_validated(client, shared):
    for role in ("owner", "admin", ""):
        with pytest.raises(HTTPError) as info:
            client.share_kernel(shared.id, role)
        assert info.value.status == 400


def test_login_sets_a_strict_http_only_cookie_and_never_redirects_away(server, client, shared):
    opener = urllib.request.build_opener(NoRedirect)
    for target, expected in [("/api/kernels", "/api/kernels"), ("//evil.example/x", "/")]:
        url = f"{server.url}login?token={server.token}&next={target}"
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open(url, timeout=10)
        response = info.value
        assert response.code == 302
        assert response.headers["location"] == expected
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    name_value = cookie.split(";")[0]
    request = urllib.request.Request(f"{server.url}api/kernels", headers={"Cookie": name_value})
    with urllib.request.urlopen(request, timeout=10) as ok:
        assert ok.status == 200
    bad = urllib.request.Request(f"{server.url}login?token=wrong")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=10)
    assert info.value.code == 403


def test_form_bodies_are_never_read(server):
    # No endpoint takes form bodies, so the server does not parse them (it
    # saves time on every POST): a token in one is not a token.
    form = urllib.request.Request(
        f"{server.url}login",
        data=f"token={server.token}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(form, timeout=10)
    assert info.value.code == 403
    header = urllib.request.Request(
        f"{server.url}login", headers={"Authorization": f"token {server.token}"}, method="POST"
    )
    with urllib.request.urlopen(header, timeout=10) as ok:
        assert ok.status == 200


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
