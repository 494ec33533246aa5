# -*- test-case-name: tests.test_protocol_link -*-
"""The kernel link handshake, with no I/O.

Each kernel's pump connects one ZeroMQ DEALER to the server's ROUTER with a
random *link id* as its routing id. Before anything else it must prove it
holds the secret the nursery gave it at fork time::

    kernel                                   server
      [tag(0), {"op":"hello","version":1,"pid":N}]  -->
                         <--  [tag(0), {"op":"challenge","nonce":hex}]
      [tag(0), {"op":"proof","mac":hex}]             -->
                         <--  [tag(0), {"op":"accepted"}]
                         <--  [tag(0), {"op":"accepted","credit":bytes,"max_size":bytes}]
      [tag(0), {"op":"ready"}]                       -->   (kernel is usable)

``mac`` is HMAC-SHA256(secret, "cellmux-link/1" | link id | nonce), hex.
After ``ready`` every kernel message is ``[tag, *jupyter parts]``, or a
*bundle* of several: ``[BUNDLE_TAG, frames]``, where ``frames`` is one part
holding Jupyter messages back to back, each laid out as a websocket frame
(L{cellmux.protocol.framing}) with seq 0. A bundle means exactly what its
messages would mean sent one by one, in that order; it saves the pump and
the server a ZeroMQ message per small message under a flood. The only
control message a kernel may still send is ``{"op":"pong","n":n}``, the
answer to the server's ``{"op":"ping","n":n}`` (answered by the pump, which
needs the GIL: a missing pong means the kernel holds it).

Flow control: the kernel may send ``credit`` bytes of Jupyter parts; then
it stops reading its kernel's sockets until the server grants more with
``{"op":"credit","bytes":n}``. The server grants while its clients keep up,
so a kernel can never fill the server's memory. The server holds the kernel
to it: a data message that would take the kernel more than one largest
message (``max_size``) below zero is refused (``over_credit``), since a
pump that honours its credit can overshoot by at most the one message it
read while it still had credit.

Server side states (L{ServerLink})::

    EXPECTING --hello--> CHALLENGED --proof ok--> AUTHENTICATED --ready--> READY
    any --violation--> REFUSED (every later message is refused)
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
from collections.abc import Sequence
from typing import Any

import attrs

from . import boundedjson
from .channels import KERNEL_FORBIDDEN, Channel, JupyterSocket, is_known_channel
from .errors import ProtocolError
from .framing import DEFAULT_MAX_FRAME_SIZE, HEADER_SIZE, MAX_PARTS, decode_tag, encode_tag

__all__ = [
    "BUNDLE_TAG",
    "DEFAULT_LINK_CREDIT",
    "LINK_VERSION",
    "KernelBundle",
    "KernelFrame",
    "KernelSideLink",
    "LinkPong",
    "LinkReady",
    "LinkState",
    "Reply",
    "ServerLink",
    "bundle_bytes",
    "bundle_entry",
    "link_control",
    "link_mac",
    "split_bundle",
]

LINK_VERSION = 1
#: Bytes a kernel may send before the server grants more: enough for any
#: burst a client can absorb at once, small enough to bound server memory.
DEFAULT_LINK_CREDIT = 4 * 1024 * 1024
_CONTROL_TAG = encode_tag(Channel.CONTROL, JupyterSocket.NONE)
#: A control message on the link is tiny; anything bigger is hostile.
MAX_LINK_CONTROL = 4096
#: The tag of a bundle: channel 0, socket 0, flags 1 (no other tag has
#: flags set, so no single message can be mistaken for a bundle).
BUNDLE_TAG = encode_tag(Channel.CONTROL, JupyterSocket.NONE, 1)
_FRAME_HEAD = struct.Struct(">HBBQI")
#: The head of one message in a bundle (as of a websocket frame), for a
#: reader of one entry (the pump, of what the kernel laid out).
ENTRY_HEAD = _FRAME_HEAD


def bundle_entry(channel: int, socket: int, parts: Sequence[Any]) -> bytes:
    """One message as it lies in a bundle (see L{bundle_bytes}): a kernel
    may lay out a message so ahead, and the pump put it in as it is."""
    n = len(parts)
    return b"".join(
        [
            _FRAME_HEAD.pack(channel, socket, 0, 0, n),
            struct.pack(f">{n}I", *map(len, parts)),
            *parts,
        ]
    )


def bundle_bytes(messages: Sequence[tuple[int, int, Sequence[Any]]]) -> bytes:
    """The one part of a bundle: (channel, socket, parts) messages back to
    back as websocket frames with seq 0 (parts: bytes-like objects)."""
    pieces: list[Any] = []
    append = pieces.append
    pack = _FRAME_HEAD.pack
    for channel, socket, parts in messages:
        n = len(parts)
        append(pack(channel, socket, 0, 0, n))
        append(struct.pack(f">{n}I", *map(len, parts)))
        pieces.extend(parts)
    return b"".join(pieces)


def split_bundle(data: bytes) -> list[tuple[int, int, list[bytes]]]:
    """The (channel, socket, parts) messages of a bundle's one part, as laid
    out by L{bundle_bytes}; only its layout is checked (L{ServerLink}
    checks each message against the rules as well)."""
    end = len(data)
    view = memoryview(data)
    messages: list[tuple[int, int, list[bytes]]] = []
    offset = 0
    while offset < end:
        if end - offset < HEADER_SIZE:
            raise ProtocolError("bad_bundle", "a bundle ends inside a frame header")
        channel, socket, flags, seq, nparts = _FRAME_HEAD.unpack_from(data, offset)
        if flags or seq or nparts > MAX_PARTS:
            raise ProtocolError("bad_bundle", "a bundled frame has flags, a seq or too many parts")
        offset += HEADER_SIZE
        table_end = offset + 4 * nparts
        if table_end > end:
            raise ProtocolError("bad_bundle", "a bundle ends inside a length table")
        lengths = struct.unpack_from(f">{nparts}I", data, offset)
        if table_end + sum(lengths) > end:
            raise ProtocolError("bad_bundle", "a bundle ends inside a message")
        message = []
        offset = table_end
        for length in lengths:
            message.append(bytes(view[offset : offset + length]))
            offset += length
        messages.append((channel, socket, message))
    if not messages:
        raise ProtocolError("bad_bundle", "an empty bundle")
    return messages


def link_mac(secret: bytes, link_id: bytes, nonce: bytes) -> str:
    """The proof a kernel sends: it shows the secret without revealing it."""
    return hmac.new(secret, b"cellmux-link/1" + link_id + nonce, hashlib.sha256).hexdigest()


def link_control(op: str, **fields: Any) -> list[bytes]:
    """The multipart message of a link control message."""
    return [_CONTROL_TAG, json.dumps({"op": op, **fields}).encode()]


def _parse_link_control(parts: list[bytes]) -> dict[str, Any]:
    if len(parts) != 2 or len(parts[1]) > MAX_LINK_CONTROL:
        raise ProtocolError("bad_link_control", "a link control message is a tag and one part")
    channel, _socket = decode_tag(parts[0])
    if channel != Channel.CONTROL:
        raise ProtocolError("bad_link_control", "expected a control message")
    try:
        body = boundedjson.loads(parts[1])
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("bad_link_control", "link control part is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise ProtocolError("bad_link_control", "link control part is not an op object")
    return body


@attrs.frozen
class Reply:
    """Send these parts back to the kernel."""

    parts: list[bytes]


@attrs.frozen
class LinkReady:
    """The kernel proved its identity and is ready for requests."""

    pid: int


@attrs.frozen
class LinkPong:
    """The kernel's pump answered ping C{n}."""

    n: int


@attrs.frozen
class KernelFrame:
    """A Jupyter message from a ready kernel, validated, on C{channel}."""

    channel: int
    socket: int


@attrs.frozen
class KernelBundle:
    """Several Jupyter messages from a ready kernel, validated, in order:
    (channel, socket, parts) each."""

    messages: list[tuple[int, int, list[bytes]]]


_KERNEL_SOCKETS = frozenset(
    (JupyterSocket.SHELL, JupyterSocket.CONTROL, JupyterSocket.STDIN, JupyterSocket.IOPUB)
)


class LinkState(enum.Enum):
    #: The nursery was asked for this kernel; no message seen yet.
    EXPECTING = "expecting"
    #: Hello seen, challenge sent, waiting for the proof.
    CHALLENGED = "challenged"
    #: Proof accepted; waiting for the kernel to finish starting.
    AUTHENTICATED = "authenticated"
    #: Relaying Jupyter messages.
    READY = "ready"
    #: The peer broke the protocol; everything it sends is refused.
    REFUSED = "refused"


class ServerLink:
    """The server's side of one kernel link.

    @param nonce: random bytes for the challenge (injected for tests).
    """

    def __init__(
        self,
        link_id: bytes,
        secret: bytes,
        nonce: bytes,
        *,
        credit: int = DEFAULT_LINK_CREDIT,
        max_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.link_id = link_id
        self._credit = credit
        self._max_size = max_size
        self._secret = secret
        self._nonce = nonce
        self._state = LinkState.EXPECTING
        self._pid = 0
        #: Bytes of Jupyter parts the kernel may still send: the credit told
        #: in ``accepted`` plus every grant, minus what it sent.
        self.credit_left = credit

    @property
    def ready(self) -> bool:
        return self._state is LinkState.READY

    def granted(self, n: int) -> None:
        """The server sent the kernel ``{"op":"credit","bytes":n}``."""
        self.credit_left += n

    def receive(
        self, parts: list[bytes]
    ) -> Reply | LinkReady | KernelFrame | KernelBundle | LinkPong:
        """Feed one multipart message (routing id already removed).

        @raise ProtocolError: for a violation; the link is then REFUSED
            unless the error was only a forbidden or malformed data frame
            from a ready kernel (that frame alone is dropped).
        """
        state = self._state
        if state is LinkState.READY:
            return self._data(parts)
        try:
            return self._handshake(state, parts)
        except ProtocolError:
            self._state = LinkState.REFUSED
            raise

    def _data(self, parts: list[bytes]) -> KernelFrame | KernelBundle | LinkPong:
        if not parts:
            raise ProtocolError("bad_message", "empty link message")
        if parts[0] == BUNDLE_TAG:
            return self._bundle(parts)
        channel, socket = decode_tag(parts[0])
        if channel == Channel.CONTROL:
            try:
                body = _parse_link_control(parts)
            except ProtocolError:
                body = {"op": None}
            n = body.get("n")
            if body["op"] == "pong" and type(n) is int:
                return LinkPong(n)
            raise ProtocolError("forbidden_channel", "a ready kernel may only send pong on control")
        payload = self._check(channel, socket, len(parts) - 1, sum(map(len, parts[1:])))
        self.credit_left -= payload
        return KernelFrame(channel, socket)

    def _check(self, channel: int, socket: int, nparts: int, payload: int, spent: int = 0) -> int:
        """Check one data message against the rules, with C{spent} bytes
        already taken from the credit by the messages before it; its payload."""
        if channel in KERNEL_FORBIDDEN or not is_known_channel(channel):
            raise ProtocolError("forbidden_channel", f"kernels may not send on channel {channel}")
        if socket not in _KERNEL_SOCKETS:
            raise ProtocolError("bad_socket", "socket 0 is for server-made messages")
        if nparts < 4:
            raise ProtocolError("bad_message", "a Jupyter message has at least 4 parts")
        size = HEADER_SIZE + 4 * nparts + payload
        if size > self._max_size:
            raise ProtocolError("frame_too_large", f"a {size}-byte frame exceeds {self._max_size}")
        if self.credit_left - spent - payload < -self._max_size:
            raise ProtocolError("over_credit", "the kernel sent more than its link credit")
        return payload

    def _bundle(self, parts: list[bytes]) -> KernelBundle:
        """Split and check a bundle; all of it or nothing (a pump never
        bundles what it would not send alone, so a bad one is hostile)."""
        if len(parts) != 2:
            raise ProtocolError("bad_bundle", "a bundle is its tag and one part")
        messages = split_bundle(parts[1])
        spent = 0
        for channel, socket, message in messages:
            spent += self._check(channel, socket, len(message), sum(map(len, message)), spent)
        self.credit_left -= spent
        return KernelBundle(messages)

    def _handshake(self, state: LinkState, parts: list[bytes]) -> Reply | LinkReady:
        if state is LinkState.REFUSED:
            raise ProtocolError("refused", "this link was refused")
        body = _parse_link_control(parts)
        op = body["op"]
        if state is LinkState.EXPECTING and op == "hello":
            if type(body.get("version")) is not int or body["version"] != LINK_VERSION:
                raise ProtocolError("unsupported_version", f"link version {body.get('version')!r}")
            pid = body.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise ProtocolError("bad_hello", "hello needs the kernel's pid")
            self._pid = pid
            self._state = LinkState.CHALLENGED
            return Reply(link_control("challenge", nonce=self._nonce.hex()))
        if state is LinkState.CHALLENGED and op == "proof":
            mac = body.get("mac")
            expected = link_mac(self._secret, self.link_id, self._nonce)
            if (
                not isinstance(mac, str)
                or not mac.isascii()
                or not hmac.compare_digest(mac, expected)
            ):
                raise ProtocolError("bad_proof", "the kernel could not prove its secret")
            self._state = LinkState.AUTHENTICATED
            return Reply(link_control("accepted", credit=self._credit, max_size=self._max_size))
        if state is LinkState.AUTHENTICATED and op == "ready":
            self._state = LinkState.READY
            return LinkReady(self._pid)
        raise ProtocolError("unexpected_op", f"op {op!r} in link state {state.value}")


class KernelSideLink:
    """The kernel's side of the handshake (used by the pump)."""

    def __init__(self, link_id: bytes, secret: bytes, pid: int) -> None:
        self._link_id = link_id
        self._secret = secret
        self._pid = pid
        self.accepted = False
        #: Bytes the kernel may still send before waiting for more credit.
        self.credit = 0
        #: Largest message the server takes (told in ``accepted``).
        self.max_size = DEFAULT_MAX_FRAME_SIZE

    def hello(self) -> list[bytes]:
        return link_control("hello", version=LINK_VERSION, pid=self._pid)

    def ready(self) -> list[bytes]:
        return link_control("ready")

    def receive(self, parts: list[bytes]) -> list[bytes] | None:
        """Handle a server control message; return the answer, if any.

        @raise ProtocolError: if the server says something unexpected.
        """
        body = _parse_link_control(parts)
        if body["op"] == "ping" and type(body.get("n")) is int:
            return link_control("pong", n=body["n"])
        if body["op"] == "credit" and type(body.get("bytes")) is int:
            self.credit += body["bytes"]
            return None
        if body["op"] == "challenge" and isinstance(body.get("nonce"), str):
            try:
                nonce = bytes.fromhex(body["nonce"])
            except ValueError:
                raise ProtocolError("bad_challenge", "nonce is not hex") from None
            return link_control("proof", mac=link_mac(self._secret, self._link_id, nonce))
        if body["op"] == "accepted":
            self.accepted = True
            credit = body.get("credit")
            self.credit += credit if type(credit) is int else 0
            max_size = body.get("max_size")
            if type(max_size) is int and max_size > 0:
                self.max_size = max_size
            return None
        raise ProtocolError("unexpected_op", f"unexpected link op {body['op']!r}")
