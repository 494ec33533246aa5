# -*- test-case-name: tests.test_bridge_wire -*-
"""Jupyter's ZeroMQ wire format, as ``cellmux bridge`` needs it. No I/O.

A Jupyter message on a ZeroMQ socket is ``[identities…, b"<IDS|MSG>",
signature, header, parent_header, metadata, content, buffers…]``; the
signature is the hex HMAC-SHA256 of the four JSON parts under the key in
the connection file. cellmux frames carry the same four JSON parts and the
buffers, unsigned, so the bridge only splits, checks and signs: payloads
pass as they are.

Except one field. The server routes a kernel's ``input_request`` to the
client connection whose ``hello`` session is the request's
``parent_header.session`` (docs/protocol.md, section 5). Every local client
has a session of its own and the bridge has one connection, so the bridge
sends each request under its own session and puts the client's back into
the ``parent_header`` of what the kernel answers: jupyter console shows only
output whose parent session is its own. L{Origins} remembers, per request,
whom to give that back to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import attrs

__all__ = [
    "DELIMITER",
    "MAX_ORIGINS",
    "Origin",
    "Origins",
    "Signer",
    "WireError",
    "parse_header",
    "restore_parent",
    "split_message",
    "with_session",
]

#: Separates the routing identities from the message.
DELIMITER = b"<IDS|MSG>"
#: Requests remembered for routing their answers (about 200 bytes each):
#: output parented to an older request reaches clients with the bridge's
#: session in its parent header, so jupyter console does not show it.
MAX_ORIGINS = 10_000


class WireError(ValueError):
    """A ZeroMQ message that is not a Jupyter message."""


class Signer:
    """Signs and checks messages with the connection file's key (HMAC-SHA256).

    An empty key means unsigned messages, as in Jupyter.
    """

    def __init__(self, key: bytes) -> None:
        self.key = key

    def sign(self, parts: Sequence[bytes]) -> bytes:
        if not self.key:
            return b""
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts[:4]:
            mac.update(part)
        return mac.hexdigest().encode()

    def verify(self, signature: bytes, parts: Sequence[bytes]) -> bool:
        if not self.key:
            return True
        return hmac.compare_digest(signature, self.sign(parts))

    def wire(self, identities: Sequence[bytes], parts: Sequence[bytes]) -> list[bytes]:
        """The frames to send: identities, delimiter, signature, parts."""
        return [*identities, DELIMITER, self.sign(parts), *parts]


def split_message(frames: Sequence[bytes]) -> tuple[tuple[bytes, ...], bytes, tuple[bytes, ...]]:
    """(identities, signature, parts) of a message received on a ROUTER.

    @raise WireError: no delimiter, or fewer than four parts after the signature.
    """
    try:
        at = list(frames).index(DELIMITER)
    except ValueError:
        raise WireError("no <IDS|MSG> delimiter") from None
    parts = tuple(frames[at + 2 :])
    if at + 1 >= len(frames) or len(parts) < 4:
        raise WireError("fewer than four message parts")
    return tuple(frames[:at]), bytes(frames[at + 1]), parts


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} is not a JSON object")
    return value


def parse_header(data: bytes) -> dict[str, Any]:
    """A client message's header, with a string msg_id and msg_type.

    @raise WireError: if it is not.
    """
    header = _json_object(data, "header")
    for field in ("msg_id", "msg_type"):
        if not isinstance(header.get(field), str) or not header[field]:
            raise WireError(f"header has no {field}")
    return header


def with_session(header: dict[str, Any], session: str) -> bytes:
    """The header, encoded, with its session replaced."""
    return json.dumps({**header, "session": session}, separators=(",", ":")).encode()


@attrs.frozen
class Origin:
    """Who sent a request: its socket (``shell``, ``control``), the ROUTER
    identities to answer, and the client's own session."""

    socket: str
    identities: tuple[bytes, ...]
    session: str


class Origins:
    """msg_id -> L{Origin} of the latest L{MAX_ORIGINS} requests."""

    def __init__(self, limit: int = MAX_ORIGINS) -> None:
        self.limit = limit
        self._by_id: OrderedDict[str, Origin] = OrderedDict()

    def remember(self, msg_id: str, origin: Origin) -> None:
        self._by_id[msg_id] = origin
        self._by_id.move_to_end(msg_id)
        while len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)

    def get(self, msg_id: object) -> Origin | None:
        return self._by_id.get(msg_id) if isinstance(msg_id, str) else None

    def __len__(self) -> int:
        return len(self._by_id)


def restore_parent(
    parts: Sequence[bytes], bridge_session: str, origins: Origins
) -> tuple[tuple[bytes, ...], Origin | None]:
    """A kernel message's parts with its parent's session given back to the
    client that sent the parent, and that client's L{Origin}.

    Messages parented to another client's request (or to none) come back
    unchanged, with None.
    """
    parts = tuple(parts)
    if len(parts) < 2 or bridge_session.encode() not in parts[1]:
        return parts, None
    try:
        parent = _json_object(parts[1], "parent_header")
    except WireError:
        return parts, None
    origin = origins.get(parent.get("msg_id"))
    if origin is None or parent.get("session") != bridge_session:
        return parts, origin
    restored = json.dumps({**parent, "session": origin.session}, separators=(",", ":")).encode()
    return (parts[0], restored, *parts[2:]), origin
