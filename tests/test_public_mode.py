"""Public mode over HTTP: an anonymous visitor gets a kernel of their own
and a capability for it alone (never the server token), under the public
limits, within per-address limits that answer 429 with a clear message."""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import pytest
from websockets.sync.client import connect

from cellmux.client import Client, HTTPError
from cellmux.protocol import (
    PROTOCOL_VERSION,
    Channel,
    control_frame,
    decode_frame,
    encode_frame,
    parse_control,
)
from conftest import config_file, start_server, wait_for
from http_helpers import request

ORIGIN = "http://embed.example"


def mint(server):
    """What an embedding page on ORIGIN asks for: no credentials at all."""
    return request(server.url, "POST", "/embed/kernels", {"Origin": ORIGIN})


def hello_answer(server, token: str, kernel_id: str) -> dict:
    url = server.url.replace("http://", "ws://") + f"ws?token={token}"
    with connect(url, additional_headers={"Origin": ORIGIN}) as ws:
        hello = control_frame(
            "hello", version=PROTOCOL_VERSION, kernel=kernel_id, session=uuid.uuid4().hex
        )
        ws.send(encode_frame(hello))
        while True:
            frame = decode_frame(ws.recv(timeout=15))
            if frame.channel == Channel.CONTROL:
                return parse_control(frame)


@pytest.fixture(scope="module")
def public_server():
    path = config_file(
        """
public = true
allow_origins = ['http://embed\\.example']
public_kernels_per_address = 2
public_requests_per_minute = 5
public_limit_cpu_seconds = 30
public_limit_open_files = 100
"""
    )
    server = start_server("--config", path, "--pool-size", "1")
    yield server
    server.stop()


def test_a_visitor_gets_one_kernel_within_the_limits_and_never_the_owner_token(public_server):
    owner = public_server.client()
    made = []
    try:
        status, headers, first = mint(public_server)
        assert status == 201, first
        made.append(first["id"])
        assert headers["access-control-allow-origin"] == ORIGIN
        assert first["token"] and public_server.token not in json.dumps(first)
        status, _, second = mint(public_server)
        assert status == 201, second
        made.append(second["id"])

        # The capability runs code on its own kernel, under the public limits.
        visitor = Client(public_server.url, token=first["token"])
        with visitor.connect(first["id"]) as kernel:
            result = kernel.execute(
                "import resource\n"
                "print(resource.getrlimit(resource.RLIMIT_CPU), "
                "resource.getrlimit(resource.RLIMIT_NOFILE))"
            )
            assert result.stdout == "(30, 32) (100, 100)\n"
        # ... and reaches nothing else.
        refused = hello_answer(public_server, first["token"], second["id"])
        assert (refused["op"], refused["code"]) == ("error", "forbidden")
        welcome = hello_answer(public_server, first["token"], first["id"])
        assert (welcome["op"], welcome["role"]) == ("welcome", "collaborator")
        with pytest.raises(HTTPError) as caught:
            visitor.list_kernels()
        assert caught.value.status == 403
        with pytest.raises(HTTPError):
            visitor.create_kernel()
        assert visitor.get_kernel(first["id"]).id == first["id"]

        # A third kernel for the same address: 429, saying why.
        status, _, body = mint(public_server)
        assert status == 429
        assert "already has 2 kernel(s), the most a visitor may have" in body["message"]
        # Once one of its kernels ends, the address may have another.
        owner.delete_kernel(first["id"])
        status, _, third = mint(public_server)
        assert status == 201, third
        made.append(third["id"])

        # Four requests so far this minute; the fifth is refused for kernels,
        # the sixth for the rate, with the time to wait.
        assert mint(public_server)[0] == 429
        status, headers, body = mint(public_server)
        assert status == 429
        assert "at most 5 a minute" in body["message"]
        assert 1 <= int(headers["retry-after"]) <= 60
    finally:
        for kernel_id in made:
            with contextlib.suppress(HTTPError):
                owner.delete_kernel(kernel_id)


def test_without_public_mode_an_anonymous_visitor_gets_403(server):
    status, _, body = request(server.url, "POST", "/embed/kernels")
    assert status == 403 and body["message"] == "a valid token is required"


def test_a_visitors_kernel_left_alone_ends_and_frees_the_addresss_place():
    path = config_file(
        """
public = true
allow_origins = ['http://embed\\.example']
public_kernels_per_address = 1
public_idle_timeout = 1.5
"""
    )
    server = start_server("--config", path, "--pool-size", "1")
    try:
        owner = server.client()
        status, _, first = mint(server)
        assert status == 201
        # With its page open (a client attached) it stays.
        with Client(server.url, token=first["token"]).connect(first["id"]) as kernel:
            time.sleep(3)
            assert kernel.execute("print('still here')").stdout == "still here\n"
        assert mint(server)[0] == 429
        # Once the page is gone, it ends after public_idle_timeout.
        wait_for(lambda: first["id"] not in {k.id for k in owner.list_kernels()}, timeout=15)
        status, _, second = mint(server)
        assert status == 201, second
        owner.delete_kernel(second["id"])
    finally:
        server.stop()


def test_behind_a_trusted_proxy_the_limits_count_the_forwarded_address():
    path = config_file(
        """
public = true
trusted_proxies = ["127.0.0.1"]
public_kernels_per_address = 1
"""
    )
    server = start_server("--config", path, "--pool-size", "1")
    try:
        made = []
        for client in ("203.0.113.7", "203.0.113.8"):
            status, _, body = request(
                server.url, "POST", "/embed/kernels", {"X-Forwarded-For": client}
            )
            assert status == 201, body
            made.append(body["id"])
        status, _, body = request(
            server.url, "POST", "/embed/kernels", {"X-Forwarded-For": "203.0.113.7"}
        )
        assert status == 429 and "already has 1 kernel(s)" in body["message"]
        for kernel_id in made:
            server.client().delete_kernel(kernel_id)
    finally:
        server.stop()
