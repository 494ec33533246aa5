"""The cellmux wire protocol: framing, channels, handshakes. No I/O.

Nothing in this package imports Twisted, ZeroMQ or a socket; the server
and the kernel-side pump are adapters around it. docs/protocol.md is the
normative description.
"""

from .channels import (
    CLIENT_SENDABLE,
    KERNEL_FORBIDDEN,
    PLUGIN_CHANNELS,
    Channel,
    JupyterSocket,
    channel_for,
    is_known_channel,
)
from .control import (
    PROTOCOL_VERSION,
    ClientState,
    DataMessage,
    Hello,
    Request,
    ServerSideHandshake,
    control_frame,
    error_payload,
    parse_control,
)
from .errors import CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_DATA, ProtocolError
from .framing import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    MAX_PARTS,
    TAG_SIZE,
    Frame,
    decode_frame,
    decode_tag,
    encode_frame,
    encode_tag,
    frame_bytes,
)
from .link import (
    DEFAULT_LINK_CREDIT,
    LINK_VERSION,
    KernelFrame,
    KernelSideLink,
    LinkPong,
    LinkReady,
    Reply,
    ServerLink,
    link_control,
    link_mac,
)

__all__ = [
    "CLIENT_SENDABLE",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "DEFAULT_LINK_CREDIT",
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "KERNEL_FORBIDDEN",
    "LINK_VERSION",
    "MAX_PARTS",
    "PLUGIN_CHANNELS",
    "PROTOCOL_VERSION",
    "TAG_SIZE",
    "Channel",
    "ClientState",
    "DataMessage",
    "Frame",
    "Hello",
    "JupyterSocket",
    "KernelFrame",
    "KernelSideLink",
    "LinkPong",
    "LinkReady",
    "ProtocolError",
    "Reply",
    "Request",
    "ServerLink",
    "ServerSideHandshake",
    "channel_for",
    "control_frame",
    "decode_frame",
    "decode_tag",
    "encode_frame",
    "encode_tag",
    "error_payload",
    "frame_bytes",
    "is_known_channel",
    "link_control",
    "link_mac",
    "parse_control",
]
