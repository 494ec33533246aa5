"""Named tokens: each user sees and controls only their own kernels, within
their own quota; the server token still sees everything."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid

import pytest
from websockets.sync.client import connect

from cellmux.client import HTTPError
from cellmux.config import ConfigError, named_tokens
from cellmux.protocol import (
    PROTOCOL_VERSION,
    Channel,
    control_frame,
    decode_frame,
    encode_frame,
    parse_control,
)
from cellmux.server.auth import generate_token, token_hash
from conftest import config_file, start_server

ALICE = generate_token()
BOB = generate_token()


@pytest.fixture(scope="module")
def users_server():
    path = config_file(
        f"""
[tokens.alice]
token_hash = "{token_hash(ALICE)}"
max_kernels = 2

[tokens.bob]
token_hash = "{token_hash(BOB)}"
max_kernels = 1
"""
    )
    server = start_server("--config", path, "--pool-size", "1")
    yield server
    server.stop()


def status_of(call) -> int:
    with pytest.raises(HTTPError) as caught:
        call()
    return caught.value.status


def hello_answer(server, token: str, kernel_id: str) -> dict:
    url = server.url.replace("http://", "ws://") + f"ws?token={token}"
    with connect(url) as ws:
        hello = control_frame(
            "hello", version=PROTOCOL_VERSION, kernel=kernel_id, session=uuid.uuid4().hex
        )
        ws.send(encode_frame(hello))
        while True:
            frame = decode_frame(ws.recv(timeout=15))
            if frame.channel == Channel.CONTROL:
                return parse_control(frame)


def test_each_user_has_a_quota_and_only_their_own_kernels(users_server):
    owner = users_server.client()
    alice = users_server.client(ALICE)
    bob = users_server.client(BOB)
    made = []
    try:
        a1, a2 = alice.create_kernel(), alice.create_kernel()
        b1 = bob.create_kernel()
        made += [a1.id, a2.id, b1.id]
        with pytest.raises(HTTPError) as caught:
            alice.create_kernel()
        assert caught.value.status == 429
        assert "max_kernels = 2" in str(caught.value)
        assert status_of(bob.create_kernel) == 429

        assert {k.id for k in alice.list_kernels()} == {a1.id, a2.id}
        assert {k.id for k in bob.list_kernels()} == {b1.id}
        assert {a1.id, a2.id, b1.id} <= {k.id for k in owner.list_kernels()}

        # Bob's kernel is out of Alice's reach, by every door.
        assert status_of(lambda: alice.get_kernel(b1.id)) == 403
        assert status_of(lambda: alice.delete_kernel(b1.id)) == 403
        assert status_of(lambda: alice.interrupt_kernel(b1.id)) == 403
        assert status_of(lambda: alice.share_kernel(b1.id, "observer")) == 403
        refused = hello_answer(users_server, ALICE, b1.id)
        assert (refused["op"], refused["code"]) == ("error", "forbidden")
        welcome = hello_answer(users_server, ALICE, a1.id)
        assert (welcome["op"], welcome["role"]) == ("welcome", "owner")

        # Her own kernels are hers to run, share and shut down.
        with alice.connect(a1.id) as kernel:
            assert kernel.execute("print(6 * 7)").stdout == "42\n"
        share = alice.share_kernel(a1.id, "observer")
        assert users_server.client(share["token"]).get_kernel(a1.id).id == a1.id
        alice.delete_kernel(a2.id)
        a3 = alice.create_kernel()  # room again
        made.append(a3.id)
    finally:
        for kernel_id in made:
            with contextlib.suppress(HTTPError):
                owner.delete_kernel(kernel_id)


def test_a_user_reaches_files_of_own_kernels_only_and_no_service_runs(users_server):
    import urllib.error
    import urllib.request

    alice = users_server.client(ALICE)
    bob = users_server.client(BOB)
    a1, b1 = alice.create_kernel(), bob.create_kernel()
    try:

        def get(path: str, method: str = "GET", body: bytes | None = None) -> int:
            req = urllib.request.Request(
                users_server.url + path.lstrip("/"),
                data=body,
                method=method,
                headers={"Authorization": f"token {ALICE}"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        assert get(f"/files/{a1.id}/") == 200
        assert get(f"/files/{b1.id}/") == 403
        assert get("/service", "POST", b'{"code": "1"}') == 403
        assert get("/kernelspecs/python3/logo-64x64.png") == 200  # for her Jupyter client
        assert get("/permalink", "POST", b'{"code": "1"}') == 201
    finally:
        users_server.client().delete_kernel(a1.id)
        users_server.client().delete_kernel(b1.id)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ({"alice": {"token_hash": "abc"}}, "sha256:<64 hex digits>"),
        ({"alice": {"token_hash": "sha256:" + "zz" * 32}}, "sha256:<64 hex digits>"),
        ({"a b": {"token_hash": token_hash("x")}}, "letters, digits"),
        ({"alice": {"token_hash": token_hash("x"), "max_kernels": 0}}, "above 0"),
        ({"alice": {"token_hash": token_hash("x"), "quota": 1}}, "unknown settings quota"),
        (
            {"a": {"token_hash": token_hash("x")}, "b": {"token_hash": token_hash("x")}},
            "same token_hash",
        ),
    ],
)
def test_bad_token_tables_are_refused_with_a_clear_message(tokens, message):
    with pytest.raises(ConfigError, match=message):
        named_tokens(tokens)


def test_cellmux_token_new_prints_a_table_the_server_takes():
    out = subprocess.run(
        [sys.executable, "-m", "cellmux", "token", "new", "carol", "--max-kernels", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = out[out.index("[tokens.carol]") :]
    import tomllib

    parsed = tomllib.loads(table)
    (setting,) = named_tokens(parsed["tokens"])
    token = out.split("\n")[1].strip()
    assert setting.name == "carol" and setting.max_kernels == 3
    assert token_hash(token) == parsed["tokens"]["carol"]["token_hash"]
    assert token not in table


def test_one_round_trip_starts_count_against_the_quota_and_belong_to_their_user(users_server):
    owner = users_server.client()
    bob = users_server.client(BOB)
    with bob.start() as kernel:  # hello.create over the websocket
        assert kernel.execute("print('mine')").stdout == "mine\n"
        kernel_id = kernel.kernel_id
        assert [k.id for k in bob.list_kernels()] == [kernel_id]
        with pytest.raises(HTTPError) as caught:
            bob.create_kernel()
        assert caught.value.status == 429
        with pytest.raises(Exception, match="max_kernels = 1"):
            bob.start()
    owner.delete_kernel(kernel_id)


def test_a_bad_token_table_stops_the_server_with_one_line_and_exit_2(tmp_path):
    config = tmp_path / "cellmux.toml"
    config.write_text('[tokens.alice]\ntoken_hash = "not-a-hash"\n')
    result = subprocess.run(
        [sys.executable, "-m", "cellmux", "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "tokens.alice.token_hash must be sha256:<64 hex digits>" in result.stderr
