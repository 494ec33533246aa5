"""The bridge's sans-IO wire helpers (cellmux.terminal.bridgewire), property-tested."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jupyter_client.session import Session

from cellmux.terminal.bridgewire import (
    DELIMITER,
    Origin,
    Origins,
    Signer,
    WireError,
    parse_header,
    restore_parent,
    split_message,
    with_session,
)

identities = st.lists(
    st.binary(min_size=1, max_size=16).filter(lambda b: b != DELIMITER), max_size=3
)
json_parts = st.lists(
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3).map(
        lambda d: json.dumps(d).encode()
    ),
    min_size=4,
    max_size=4,
)
buffers = st.lists(st.binary(max_size=32), max_size=3)
keys = st.binary(min_size=1, max_size=64)


@given(keys, identities, json_parts, buffers)
def test_what_is_signed_splits_back_and_verifies(key, idents, parts, bufs):
    signer = Signer(key)
    frames = signer.wire(idents, [*parts, *bufs])
    got_idents, signature, got_parts = split_message(frames)
    assert got_idents == tuple(idents)
    assert got_parts == (*parts, *bufs)
    assert signer.verify(signature, got_parts)


@given(keys, json_parts, st.integers(0, 3), st.integers(0, 1000))
def test_a_changed_json_part_fails_verification(key, parts, which, position):
    signer = Signer(key)
    signature = signer.sign(parts)
    changed = list(parts)
    data = bytearray(changed[which])
    data[position % len(data)] ^= 1
    changed[which] = bytes(data)
    assert not signer.verify(signature, changed)


@given(keys, json_parts)
def test_signatures_are_jupyter_clients(key, parts):
    """The oracle: jupyter_client's own Session signs the same bytes the same way."""
    assert Signer(key).sign(parts) == Session(key=key).sign(parts)


def test_an_empty_key_means_unsigned():
    signer = Signer(b"")
    assert signer.sign([b"{}"] * 4) == b""
    assert signer.verify(b"anything", [b"{}"] * 4)


@given(st.lists(st.binary(max_size=12), max_size=8))
def test_split_refuses_with_wire_error_only(frames):
    try:
        idents, signature, parts = split_message(frames)
    except WireError:
        return
    assert len(parts) >= 4
    assert [*idents, DELIMITER, signature, *parts] == frames


@given(st.binary(max_size=64))
def test_parse_header_refuses_with_wire_error_only(data):
    try:
        header = parse_header(data)
    except WireError:
        return
    assert isinstance(header["msg_id"], str) and isinstance(header["msg_type"], str)


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_the_clients_session_comes_back_in_the_parent(client_session, msg_id):
    bridge_session = "b" * 32
    origins = Origins()
    origin = Origin("shell", (b"id",), client_session)
    origins.remember(msg_id, origin)
    request = {"msg_id": msg_id, "msg_type": "execute_request", "session": client_session}
    sent = json.loads(with_session(request, bridge_session))
    assert sent == {**request, "session": bridge_session}
    # the kernel copies the request's header into its replies' parent header
    reply = (b'{"msg_type":"stream"}', json.dumps(sent).encode(), b"{}", b"{}", b"buffer")
    parts, found = restore_parent(reply, bridge_session, origins)
    assert found == origin
    assert json.loads(parts[1]) == request
    assert parts[0] == reply[0] and parts[2:] == reply[2:]


@pytest.mark.parametrize(
    "parent",
    [b"{}", b'{"msg_id":"x","session":"someone else"}', b"not json", b'["b' + b"b" * 31 + b'"]'],
)
def test_other_clients_messages_pass_unchanged(parent):
    origins = Origins()
    origins.remember("x", Origin("shell", (), "mine"))
    parts = (b"{}", parent, b"{}", b"{}")
    assert restore_parent(parts, "b" * 32, origins) == (parts, None)


def test_origins_keep_only_the_latest():
    origins = Origins(limit=3)
    for n in range(5):
        origins.remember(str(n), Origin("shell", (), str(n)))
    assert len(origins) == 3
    assert origins.get("0") is None and origins.get("1") is None
    assert origins.get("4") == Origin("shell", (), "4")
    assert origins.get(None) is None and origins.get(["4"]) is None
