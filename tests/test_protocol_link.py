"""Tests for cellmux.protocol.link: the kernel link handshake and data frames."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.protocol import (
    BUNDLE_TAG,
    DEFAULT_MAX_FRAME_SIZE,
    LINK_VERSION,
    Channel,
    JupyterSocket,
    KernelBundle,
    KernelFrame,
    KernelSideLink,
    LinkReady,
    ProtocolError,
    Reply,
    ServerLink,
    bundle_bytes,
    encode_tag,
    frame_bytes,
    link_control,
    link_mac,
)
from cellmux.protocol.link import DEFAULT_LINK_CREDIT, MAX_LINK_CONTROL, LinkPong

LINK_ID = b"link-0f3a"
SECRET = b"nursery-secret"
NONCE = bytes(range(16))
PID = 4242

CONTROL_TAG = encode_tag(Channel.CONTROL, JupyterSocket.NONE)
JUPYTER_PARTS = [b'{"msg_type":"stream"}', b"{}", b"{}", b'{"name":"stdout","text":"hi"}']


def body(parts: list[bytes]) -> dict[str, Any]:
    assert len(parts) == 2
    assert parts[0] == CONTROL_TAG
    return json.loads(parts[1])


def kernel_message(channel: int, socket: int = JupyterSocket.IOPUB, parts=JUPYTER_PARTS):
    return [encode_tag(channel, socket), *parts]


class Pair:
    """A server link and a kernel link wired back to back, in memory."""

    def __init__(self, kernel_secret: bytes = SECRET, pid: int = PID) -> None:
        self.server = ServerLink(LINK_ID, SECRET, NONCE)
        self.kernel = KernelSideLink(LINK_ID, kernel_secret, pid)

    def hello(self) -> Reply:
        challenge = self.server.receive(self.kernel.hello())
        assert isinstance(challenge, Reply)
        return challenge

    def prove(self) -> Reply:
        proof = self.kernel.receive(self.hello().parts)
        assert proof is not None
        accepted = self.server.receive(proof)
        assert isinstance(accepted, Reply)
        assert self.kernel.receive(accepted.parts) is None
        return accepted

    def handshake(self) -> LinkReady:
        self.prove()
        ready = self.server.receive(self.kernel.ready())
        assert isinstance(ready, LinkReady)
        return ready


def refuse(link: ServerLink, parts: list[bytes], code: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        link.receive(parts)
    assert info.value.code == code
    return info.value


def assert_refused_forever(link: ServerLink) -> None:
    """A refused link refuses everything, even a correct handshake message."""
    assert not link.ready
    kernel = KernelSideLink(LINK_ID, SECRET, PID)
    correct_proof = link_control("proof", mac=link_mac(SECRET, LINK_ID, NONCE))
    for parts in [kernel.hello(), correct_proof, kernel.ready(), kernel_message(Channel.STDOUT)]:
        refuse(link, parts, "refused")
    assert not link.ready


# --- the whole handshake -----------------------------------------------------------------


def test_handshake() -> None:
    pair = Pair()
    assert pair.handshake() == LinkReady(PID)
    assert pair.server.ready
    assert pair.kernel.accepted


def test_handshake_step_by_step() -> None:
    server = ServerLink(LINK_ID, SECRET, NONCE)
    kernel = KernelSideLink(LINK_ID, SECRET, PID)

    hello = kernel.hello()
    assert body(hello) == {"op": "hello", "version": LINK_VERSION, "pid": PID}

    challenge = server.receive(hello)
    assert challenge == Reply(link_control("challenge", nonce=NONCE.hex()))
    assert not server.ready

    proof = kernel.receive(challenge.parts)
    assert proof is not None
    assert body(proof) == {"op": "proof", "mac": link_mac(SECRET, LINK_ID, NONCE)}
    assert not kernel.accepted

    accepted = server.receive(proof)
    assert accepted == Reply(
        link_control("accepted", credit=DEFAULT_LINK_CREDIT, max_size=DEFAULT_MAX_FRAME_SIZE)
    )
    assert not server.ready

    assert kernel.receive(accepted.parts) is None
    assert kernel.accepted
    assert kernel.credit == DEFAULT_LINK_CREDIT
    assert kernel.max_size == DEFAULT_MAX_FRAME_SIZE

    assert server.receive(kernel.ready()) == LinkReady(PID)
    assert server.ready


def test_link_mac_binds_secret_link_id_and_nonce() -> None:
    mac = link_mac(SECRET, LINK_ID, NONCE)
    assert len(mac) == 64
    int(mac, 16)
    assert mac == link_mac(SECRET, LINK_ID, NONCE)
    assert mac != link_mac(b"other-secret", LINK_ID, NONCE)
    assert mac != link_mac(SECRET, b"other-link", NONCE)
    assert mac != link_mac(SECRET, LINK_ID, bytes(16))


def test_link_control() -> None:
    parts = link_control("ready")
    assert parts == [CONTROL_TAG, b'{"op": "ready"}']


# --- data after ready --------------------------------------------------------------------


@pytest.mark.parametrize(
    "channel, socket",
    [
        (Channel.STDOUT, JupyterSocket.IOPUB),
        (Channel.STATUS, JupyterSocket.IOPUB),
        (Channel.EXECUTE, JupyterSocket.SHELL),
        (Channel.STDIN, JupyterSocket.STDIN),
        (Channel.KERNEL, JupyterSocket.CONTROL),
        (Channel.DISPLAY, JupyterSocket.IOPUB),
        (16, JupyterSocket.IOPUB),
        (65535, JupyterSocket.IOPUB),
    ],
)
def test_data_frames_after_ready(channel: int, socket: JupyterSocket) -> None:
    pair = Pair()
    pair.handshake()
    assert pair.server.receive(kernel_message(channel, socket)) == KernelFrame(channel, socket)
    assert pair.server.ready


def test_data_frame_with_buffers() -> None:
    pair = Pair()
    pair.handshake()
    parts = kernel_message(Channel.COMM, parts=[*JUPYTER_PARTS, b"\x00" * 10, b""])
    assert pair.server.receive(parts) == KernelFrame(Channel.COMM, JupyterSocket.IOPUB)


@pytest.mark.parametrize("channel", [Channel.CONTROL, Channel.FILES])
def test_forbidden_channel_keeps_the_link(channel: Channel) -> None:
    pair = Pair()
    pair.handshake()
    refuse(pair.server, kernel_message(channel), "forbidden_channel")
    assert pair.server.ready
    assert pair.server.receive(kernel_message(Channel.STDOUT)) == KernelFrame(
        Channel.STDOUT, JupyterSocket.IOPUB
    )


def test_control_op_after_ready_is_forbidden() -> None:
    pair = Pair()
    pair.handshake()
    refuse(pair.server, pair.kernel.ready(), "forbidden_channel")
    refuse(pair.server, pair.kernel.hello(), "forbidden_channel")
    assert pair.server.ready


@pytest.mark.parametrize(
    "parts, code",
    [
        ([], "bad_message"),
        ([encode_tag(Channel.STDOUT, JupyterSocket.IOPUB)], "bad_message"),
        (kernel_message(Channel.STDOUT, parts=JUPYTER_PARTS[:3]), "bad_message"),
        ([b"\x00\x02\x02", *JUPYTER_PARTS], "bad_tag"),
        ([b"\x00\x02\x09\x00", *JUPYTER_PARTS], "bad_tag"),
        ([b"\x00\x02\x02\x01", *JUPYTER_PARTS], "bad_tag"),
    ],
)
def test_malformed_data_frame_keeps_the_link(parts: list[bytes], code: str) -> None:
    pair = Pair()
    pair.handshake()
    refuse(pair.server, parts, code)
    assert pair.server.ready
    assert pair.server.receive(kernel_message(Channel.STDERR)) == KernelFrame(
        Channel.STDERR, JupyterSocket.IOPUB
    )


# --- a failed proof ----------------------------------------------------------------------


def test_wrong_secret() -> None:
    pair = Pair(kernel_secret=b"guessed")
    proof = pair.kernel.receive(pair.hello().parts)
    assert proof is not None
    refuse(pair.server, proof, "bad_proof")
    assert_refused_forever(pair.server)


@pytest.mark.parametrize(
    "mac",
    [
        None,
        12,
        "",
        ["x"],
        link_mac(SECRET, LINK_ID, NONCE).upper(),
        link_mac(SECRET, LINK_ID, NONCE)[:-1],
        link_mac(SECRET, LINK_ID, NONCE) + "0",
        "\u00e9" * 64,  # non-ASCII: hmac.compare_digest would raise TypeError
        "\ud800",  # a lone surrogate, which JSON can carry
    ],
)
def test_bad_mac(mac: object) -> None:
    pair = Pair()
    pair.hello()
    refuse(pair.server, link_control("proof", mac=mac), "bad_proof")
    assert_refused_forever(pair.server)


def test_proof_without_mac() -> None:
    pair = Pair()
    pair.hello()
    refuse(pair.server, link_control("proof"), "bad_proof")
    assert_refused_forever(pair.server)


def test_proof_for_another_link_id() -> None:
    pair = Pair()
    pair.hello()
    stolen = link_control("proof", mac=link_mac(SECRET, b"another-link", NONCE))
    refuse(pair.server, stolen, "bad_proof")
    assert_refused_forever(pair.server)


# --- out of order, malformed and oversize handshake messages ------------------------------


@pytest.mark.parametrize("op", ["proof", "ready", "accepted", "challenge", "bogus"])
def test_fresh_link_wants_hello(op: str) -> None:
    link = ServerLink(LINK_ID, SECRET, NONCE)
    refuse(link, link_control(op, mac=link_mac(SECRET, LINK_ID, NONCE)), "unexpected_op")
    assert_refused_forever(link)


@pytest.mark.parametrize("op", ["hello", "ready", "accepted"])
def test_challenged_link_wants_proof(op: str) -> None:
    pair = Pair()
    pair.hello()
    refuse(pair.server, link_control(op, version=LINK_VERSION, pid=PID), "unexpected_op")
    assert_refused_forever(pair.server)


@pytest.mark.parametrize("op", ["hello", "proof", "accepted"])
def test_authenticated_link_wants_ready(op: str) -> None:
    pair = Pair()
    pair.prove()
    good = {"version": LINK_VERSION, "pid": PID, "mac": link_mac(SECRET, LINK_ID, NONCE)}
    refuse(pair.server, link_control(op, **good), "unexpected_op")
    assert_refused_forever(pair.server)


def test_data_before_ready_refuses_the_link() -> None:
    pair = Pair()
    pair.prove()
    refuse(pair.server, kernel_message(Channel.STDOUT), "bad_link_control")
    assert_refused_forever(pair.server)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_hello_wrong_version(version: object) -> None:
    link = ServerLink(LINK_ID, SECRET, NONCE)
    refuse(link, link_control("hello", version=version, pid=PID), "unsupported_version")
    assert_refused_forever(link)


@pytest.mark.parametrize("pid", [None, 0, -1, True, "4242", 4242.0])
def test_hello_bad_pid(pid: object) -> None:
    link = ServerLink(LINK_ID, SECRET, NONCE)
    refuse(link, link_control("hello", version=LINK_VERSION, pid=pid), "bad_hello")
    assert_refused_forever(link)


@pytest.mark.parametrize(
    "parts, code",
    [
        ([], "bad_link_control"),
        ([CONTROL_TAG], "bad_link_control"),
        ([CONTROL_TAG, b'{"op": "hello"}', b""], "bad_link_control"),
        ([encode_tag(Channel.STDOUT, JupyterSocket.IOPUB), b'{"op": "hello"}'], "bad_link_control"),
        ([b"\x00\x00\x00", b'{"op": "hello"}'], "bad_tag"),
        ([CONTROL_TAG, b"hello"], "bad_link_control"),
        ([CONTROL_TAG, b"\xff\xfe\xfa"], "bad_link_control"),
        ([CONTROL_TAG, b'["hello"]'], "bad_link_control"),
        ([CONTROL_TAG, b'{"version": 1}'], "bad_link_control"),
        ([CONTROL_TAG, b'{"op": 1}'], "bad_link_control"),
        ([CONTROL_TAG, b"[" * MAX_LINK_CONTROL], "bad_link_control"),
    ],
)
def test_malformed_control_refuses_the_link(parts: list[bytes], code: str) -> None:
    link = ServerLink(LINK_ID, SECRET, NONCE)
    refuse(link, parts, code)
    assert_refused_forever(link)


def padded_hello(size: int) -> list[bytes]:
    """A valid hello whose JSON part is exactly C{size} bytes."""
    head = b'{"op": "hello", "version": 1, "pid": 4242, "pad": "'
    tail = b'"}'
    return [CONTROL_TAG, head + b"x" * (size - len(head) - len(tail)) + tail]


def test_control_message_at_the_size_limit() -> None:
    link = ServerLink(LINK_ID, SECRET, NONCE)
    assert isinstance(link.receive(padded_hello(MAX_LINK_CONTROL)), Reply)


def test_oversize_control_message() -> None:
    link = ServerLink(LINK_ID, SECRET, NONCE)
    refuse(link, padded_hello(MAX_LINK_CONTROL + 1), "bad_link_control")
    assert_refused_forever(link)


# --- the kernel side ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "parts, code",
    [
        (link_control("challenge", nonce="not hex"), "bad_challenge"),
        (link_control("challenge", nonce="\u00e9"), "bad_challenge"),
        (link_control("challenge", nonce=12), "unexpected_op"),
        (link_control("challenge"), "unexpected_op"),
        (link_control("proof", mac="00"), "unexpected_op"),
        ([CONTROL_TAG, b"nope"], "bad_link_control"),
        (
            [encode_tag(Channel.STDOUT, JupyterSocket.IOPUB), b'{"op": "accepted"}'],
            "bad_link_control",
        ),
    ],
)
def test_kernel_side_refuses(parts: list[bytes], code: str) -> None:
    kernel = KernelSideLink(LINK_ID, SECRET, PID)
    with pytest.raises(ProtocolError) as info:
        kernel.receive(parts)
    assert info.value.code == code
    assert not kernel.accepted


# --- hypothesis ---------------------------------------------------------------------------

multipart = st.lists(st.binary(max_size=40), max_size=6)
tags = st.builds(encode_tag, st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255))
tagged_multipart = st.builds(lambda tag, rest: [tag, *rest], tags, multipart)
messages = multipart | tagged_multipart

short_text = st.text(max_size=10)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | short_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=4,
)
link_bodies = st.fixed_dictionaries(
    {"op": st.sampled_from(["hello", "proof", "ready", "challenge", "accepted"]) | short_text},
    optional={
        "version": st.just(LINK_VERSION) | json_values,
        "pid": st.integers() | json_values,
        "mac": st.text(max_size=70) | json_values,
        "nonce": st.text(max_size=40) | json_values,
    },
)
link_controls = st.builds(lambda b: [CONTROL_TAG, json.dumps(b).encode()], link_bodies)


@given(st.lists(messages | link_controls, min_size=1, max_size=4))
def test_fresh_link_raises_only_protocol_error(inputs: list[list[bytes]]) -> None:
    link = ServerLink(LINK_ID, SECRET, NONCE)
    for parts in inputs:
        try:
            event = link.receive(parts)
        except ProtocolError:
            if not link.ready:
                assert_refused_forever(link)
                return
        else:
            assert isinstance(event, (Reply, LinkReady, KernelFrame, KernelBundle))


@given(st.lists(messages | link_controls, min_size=1, max_size=4))
def test_ready_link_raises_only_protocol_error(inputs: list[list[bytes]]) -> None:
    pair = Pair()
    pair.handshake()
    for parts in inputs:
        try:
            event = pair.server.receive(parts)
        except ProtocolError as e:
            assert e.code in {
                "bad_message",
                "bad_tag",
                "bad_socket",
                "forbidden_channel",
                "frame_too_large",
                "bad_bundle",
            }
        else:
            if isinstance(event, (LinkPong, KernelBundle)):
                continue
            assert isinstance(event, KernelFrame)
            assert (event.channel, event.socket) == (
                int.from_bytes(parts[0][:2], "big"),
                parts[0][2],
            )
        assert pair.server.ready


@given(link_bodies)
def test_challenged_link_raises_only_protocol_error(proof: dict[str, Any]) -> None:
    pair = Pair()
    pair.hello()
    try:
        event = pair.server.receive([CONTROL_TAG, json.dumps(proof).encode()])
    except ProtocolError:
        assert_refused_forever(pair.server)
    else:
        assert event == Reply(link_control("accepted"))


@given(messages | link_controls)
def test_kernel_side_raises_only_protocol_error(parts: list[bytes]) -> None:
    kernel = KernelSideLink(LINK_ID, SECRET, PID)
    try:
        answer = kernel.receive(parts)
    except ProtocolError:
        return
    assert answer is None or body(answer)["op"] == "proof"


def test_ping_pong_and_credit_after_ready() -> None:
    """The only control a ready kernel may send is the pong to a ping."""
    pair = Pair()
    pair.handshake()
    pong = pair.kernel.receive(link_control("ping", n=7))
    assert body(pong) == {"op": "pong", "n": 7}
    assert pair.server.receive(pong) == LinkPong(7)
    assert pair.kernel.receive(link_control("credit", bytes=1000)) is None
    assert pair.kernel.credit == DEFAULT_LINK_CREDIT + 1000
    refuse(pair.server, link_control("pong", n="7"), "forbidden_channel")
    assert pair.server.ready


def test_kernel_frames_are_checked() -> None:
    """Socket 0 (server-made), unassigned channels and oversize frames are refused."""
    pair = Pair()
    pair.server = ServerLink(LINK_ID, SECRET, NONCE, max_size=200)
    pair.handshake()
    refuse(pair.server, kernel_message(Channel.STATUS, JupyterSocket.NONE), "bad_socket")
    refuse(pair.server, kernel_message(11), "forbidden_channel")
    big = kernel_message(Channel.STDOUT, parts=[*JUPYTER_PARTS[:3], b"x" * 300])
    refuse(pair.server, big, "frame_too_large")
    assert pair.server.receive(kernel_message(16)) == KernelFrame(16, JupyterSocket.IOPUB)


# --- bundles: several messages in one link message -----------------------------------

data_channels = st.sampled_from(
    [c for c in Channel if c not in (Channel.CONTROL, Channel.FILES)]
) | st.integers(16, 0xFFFF)
kernel_sockets = st.sampled_from(
    [JupyterSocket.SHELL, JupyterSocket.IOPUB, JupyterSocket.STDIN, JupyterSocket.CONTROL]
)
jupyter_parts = st.lists(st.binary(max_size=30), min_size=4, max_size=7)
bundled = st.lists(st.tuples(data_channels, kernel_sockets, jupyter_parts), min_size=1, max_size=8)


@given(bundled)
def test_a_bundle_is_its_messages_one_by_one(messages: list[tuple[int, int, list[bytes]]]) -> None:
    """The server gets from a bundle exactly the messages, in order, that it
    would get sent one by one, and the kernel's credit goes down the same."""
    one_by_one, bundled_pair = Pair(), Pair()
    one_by_one.handshake()
    bundled_pair.handshake()
    for channel, socket, parts in messages:
        assert one_by_one.server.receive([encode_tag(channel, socket), *parts]) == KernelFrame(
            channel, socket
        )
    event = bundled_pair.server.receive([BUNDLE_TAG, bundle_bytes(messages)])
    assert event == KernelBundle([(c, s, list(p)) for c, s, p in messages])
    assert bundled_pair.server.credit_left == one_by_one.server.credit_left


def test_a_bundled_message_is_laid_out_as_a_websocket_frame() -> None:
    """Each message in a bundle is a client frame with seq 0 (protocol.md)."""
    first = (Channel.STDOUT, JupyterSocket.IOPUB, JUPYTER_PARTS)
    second = (Channel.STATUS, JupyterSocket.IOPUB, [*JUPYTER_PARTS, b"buffer"])
    assert bundle_bytes([first, second]) == frame_bytes(*first[:2], 0, first[2]) + frame_bytes(
        *second[:2], 0, second[2]
    )


def _bundle(*messages: tuple[int, int, list[bytes]]) -> bytes:
    return bundle_bytes(list(messages))


GOOD = (Channel.STDOUT, JupyterSocket.IOPUB, JUPYTER_PARTS)


@pytest.mark.parametrize(
    "parts, code",
    [
        ([BUNDLE_TAG], "bad_bundle"),
        ([BUNDLE_TAG, _bundle(GOOD), b"more"], "bad_bundle"),
        ([BUNDLE_TAG, b""], "bad_bundle"),
        ([BUNDLE_TAG, _bundle(GOOD)[:-1]], "bad_bundle"),
        ([BUNDLE_TAG, _bundle(GOOD) + b"\x00" * 5], "bad_bundle"),
        ([BUNDLE_TAG, _bundle(GOOD)[:20]], "bad_bundle"),
        (
            [BUNDLE_TAG, frame_bytes(Channel.STDOUT, JupyterSocket.IOPUB, 7, JUPYTER_PARTS)],
            "bad_bundle",
        ),
        (
            [BUNDLE_TAG, _bundle(GOOD, (Channel.FILES, JupyterSocket.IOPUB, JUPYTER_PARTS))],
            "forbidden_channel",
        ),
        (
            [BUNDLE_TAG, _bundle(GOOD, (Channel.CONTROL, JupyterSocket.IOPUB, JUPYTER_PARTS))],
            "forbidden_channel",
        ),
        (
            [BUNDLE_TAG, _bundle((Channel.STDOUT, JupyterSocket.NONE, JUPYTER_PARTS), GOOD)],
            "bad_socket",
        ),
        ([BUNDLE_TAG, _bundle(GOOD, (Channel.STDOUT, 9, JUPYTER_PARTS))], "bad_socket"),
        (
            [BUNDLE_TAG, _bundle(GOOD, (Channel.STDOUT, JupyterSocket.IOPUB, JUPYTER_PARTS[:3]))],
            "bad_message",
        ),
    ],
)
def test_a_bad_bundle_is_dropped_whole_and_keeps_the_link(parts: list[bytes], code: str) -> None:
    """Nothing of a bundle that breaks a rule is relayed (a pump never makes
    one, so nothing a real kernel sent is lost), and the link goes on."""
    pair = Pair()
    pair.handshake()
    credit = pair.server.credit_left
    refuse(pair.server, parts, code)
    assert pair.server.credit_left == credit
    assert pair.server.ready
    assert pair.server.receive([BUNDLE_TAG, _bundle(GOOD, GOOD)]) == KernelBundle([GOOD, GOOD])


def test_a_bundle_is_held_to_the_credit_and_the_frame_size() -> None:
    """Credit is spent message by message inside a bundle: a kernel cannot
    hide an overdraft in one; each message is held to max_size as if alone."""
    pair = Pair()
    pair.server = ServerLink(LINK_ID, SECRET, NONCE, credit=100, max_size=200)
    pair.handshake()
    big = (Channel.STDOUT, JupyterSocket.IOPUB, [*JUPYTER_PARTS[:3], b"x" * 300])
    refuse(pair.server, [BUNDLE_TAG, _bundle(GOOD, big)], "frame_too_large")
    payload = sum(map(len, JUPYTER_PARTS))  # 54 bytes: the sixth takes 100 below -200
    refuse(pair.server, [BUNDLE_TAG, _bundle(*[GOOD] * 6)], "over_credit")
    assert pair.server.receive([BUNDLE_TAG, _bundle(*[GOOD] * 5)]) == KernelBundle([GOOD] * 5)
    pair.server.granted(5 * payload)
    assert pair.server.credit_left == 100
    assert pair.server.receive([BUNDLE_TAG, _bundle(GOOD, GOOD)]) == KernelBundle([GOOD, GOOD])
    assert pair.server.credit_left == 100 - 2 * payload
