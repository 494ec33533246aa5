# -*- test-case-name: tests.test_protocol_framing -*-
"""The one exception type of the wire protocol."""

from __future__ import annotations

__all__ = ["CLOSE_PROTOCOL_ERROR", "CLOSE_UNSUPPORTED_DATA", "ProtocolError"]

#: Websocket close code for a peer that broke the protocol (RFC 6455).
CLOSE_PROTOCOL_ERROR = 1002
#: Websocket close code for a peer that sent a text message (we speak binary).
CLOSE_UNSUPPORTED_DATA = 1003


class ProtocolError(Exception):
    """Malformed or out-of-order input on a cellmux link.

    Every parser in :mod:`cellmux.protocol` raises this and nothing else;
    any other exception escaping the package is a bug.

    @ivar code: a short, stable, machine-readable reason such as
        ``"frame_truncated"``; clients receive it in error frames.
    @ivar fatal: whether the connection cannot continue after this error
        (a broken handshake) or only the one frame is refused.
    @ivar request_id: the ``id`` of the control request that was refused,
        when there was one, so the client can match the error to it.
    """

    def __init__(
        self, code: str, message: str, *, fatal: bool = False, request_id: object = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, fatal={self.fatal})"
