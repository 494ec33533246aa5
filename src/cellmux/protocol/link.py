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
      [tag(0), {"op":"ready"}]                       -->   (kernel is usable)

``mac`` is HMAC-SHA256(secret, "cellmux-link/1" | link id | nonce), hex.
After ``ready`` every message is ``[tag, *jupyter parts]`` and a control
tag from the kernel is a violation.

Server side states (L{ServerLink})::

    EXPECTING --hello--> CHALLENGED --proof ok--> AUTHENTICATED --ready--> READY
    any --violation--> REFUSED (every later message is refused)
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from typing import Any

import attrs

from .channels import KERNEL_FORBIDDEN, Channel, JupyterSocket
from .errors import ProtocolError
from .framing import decode_tag, encode_tag

__all__ = [
    "LINK_VERSION",
    "KernelFrame",
    "KernelSideLink",
    "LinkReady",
    "LinkState",
    "Reply",
    "ServerLink",
    "link_control",
    "link_mac",
]

LINK_VERSION = 1
_CONTROL_TAG = encode_tag(Channel.CONTROL, JupyterSocket.NONE)
#: A control message on the link is tiny; anything bigger is hostile.
MAX_LINK_CONTROL = 4096


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
        body = json.loads(parts[1])
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
class KernelFrame:
    """A Jupyter message from a ready kernel, validated, on C{channel}."""

    channel: int
    socket: int


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

    def __init__(self, link_id: bytes, secret: bytes, nonce: bytes) -> None:
        self.link_id = link_id
        self._secret = secret
        self._nonce = nonce
        self._state = LinkState.EXPECTING
        self._pid = 0

    @property
    def ready(self) -> bool:
        return self._state is LinkState.READY

    def receive(self, parts: list[bytes]) -> Reply | LinkReady | KernelFrame:
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

    def _data(self, parts: list[bytes]) -> KernelFrame:
        if not parts:
            raise ProtocolError("bad_message", "empty link message")
        channel, socket = decode_tag(parts[0])
        if channel in KERNEL_FORBIDDEN:
            raise ProtocolError("forbidden_channel", f"kernels may not send on channel {channel}")
        if len(parts) < 5:
            raise ProtocolError("bad_message", "a Jupyter message has at least 4 parts")
        return KernelFrame(channel, socket)

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
            return Reply(link_control("accepted"))
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

    def hello(self) -> list[bytes]:
        return link_control("hello", version=LINK_VERSION, pid=self._pid)

    def ready(self) -> list[bytes]:
        return link_control("ready")

    def receive(self, parts: list[bytes]) -> list[bytes] | None:
        """Handle a server control message; return the answer, if any.

        @raise ProtocolError: if the server says something unexpected.
        """
        body = _parse_link_control(parts)
        if body["op"] == "challenge" and isinstance(body.get("nonce"), str):
            try:
                nonce = bytes.fromhex(body["nonce"])
            except ValueError:
                raise ProtocolError("bad_challenge", "nonce is not hex") from None
            return link_control("proof", mac=link_mac(self._secret, self._link_id, nonce))
        if body["op"] == "accepted":
            self.accepted = True
            return None
        raise ProtocolError("unexpected_op", f"unexpected link op {body['op']!r}")
