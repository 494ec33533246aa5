# -*- test-case-name: tests.test_protocol_channels -*-
"""The channel table: which numbered channel carries which message.

The kernel-side pump uses :func:`channel_for` to tag every message it
forwards, so the server can route by number without reading payloads.
"""

from __future__ import annotations

import enum

__all__ = [
    "CLIENT_SENDABLE",
    "KERNEL_FORBIDDEN",
    "PLUGIN_CHANNELS",
    "Channel",
    "JupyterSocket",
    "channel_for",
    "is_known_channel",
]


class Channel(enum.IntEnum):
    """Numbered channels multiplexed over one link."""

    #: Handshake, attach, errors, interrupt/restart/shutdown. Server and
    #: clients only; a kernel frame on this channel is a violation.
    CONTROL = 0
    #: input_request / input_reply.
    STDIN = 1
    #: stream messages named stdout.
    STDOUT = 2
    #: stream messages named stderr.
    STDERR = 3
    #: busy/idle from the kernel; starting/dead/restarting from the server.
    STATUS = 4
    #: complete, inspect, is_complete, history and cellmux_namespace
    #: requests and replies (answered while a cell runs).
    INTROSPECTION = 5
    #: execute_request, execute_input, execute_reply.
    EXECUTE = 6
    #: display_data, update_display_data, execute_result, error, clear_output.
    DISPLAY = 7
    #: comm_open, comm_msg, comm_close, comm_info (widgets, interacts).
    COMM = 8
    #: file transfer and new-file notices (server made).
    FILES = 9
    #: everything else a kernel speaks: kernel_info, shutdown, interrupt,
    #: debug, and message types this table does not know.
    KERNEL = 10


#: Numbers from here up are for plugins (see docs/plugins.md).
PLUGIN_CHANNELS = range(16, 65536)


class JupyterSocket(enum.IntEnum):
    """Which of ipykernel's sockets a message came from or goes to."""

    #: Made by the cellmux server, not by a kernel.
    NONE = 0
    SHELL = 1
    IOPUB = 2
    STDIN = 3
    CONTROL = 4


#: Channels a client may send Jupyter messages on (besides CONTROL).
CLIENT_SENDABLE = frozenset(
    {Channel.STDIN, Channel.INTROSPECTION, Channel.EXECUTE, Channel.COMM, Channel.KERNEL}
)

#: Channels a kernel may never send on: the server's own.
KERNEL_FORBIDDEN = frozenset({Channel.CONTROL, Channel.FILES})

_BY_MSG_TYPE: dict[str, Channel] = {
    "input_request": Channel.STDIN,
    "input_reply": Channel.STDIN,
    "status": Channel.STATUS,
    "execute_request": Channel.EXECUTE,
    "execute_input": Channel.EXECUTE,
    "execute_reply": Channel.EXECUTE,
    "display_data": Channel.DISPLAY,
    "update_display_data": Channel.DISPLAY,
    "execute_result": Channel.DISPLAY,
    "error": Channel.DISPLAY,
    "clear_output": Channel.DISPLAY,
    "comm_open": Channel.COMM,
    "comm_msg": Channel.COMM,
    "comm_close": Channel.COMM,
    "comm_info_request": Channel.COMM,
    "comm_info_reply": Channel.COMM,
}
for _kind in ("complete", "inspect", "is_complete", "history", "cellmux_namespace"):
    _BY_MSG_TYPE[f"{_kind}_request"] = Channel.INTROSPECTION
    _BY_MSG_TYPE[f"{_kind}_reply"] = Channel.INTROSPECTION


def channel_for(msg_type: str, stream_name: str | None = None) -> Channel:
    """The channel a Jupyter message of this type travels on.

    @param stream_name: for ``stream`` messages, the content's ``name``.
    """
    if msg_type == "stream":
        return Channel.STDERR if stream_name == "stderr" else Channel.STDOUT
    return _BY_MSG_TYPE.get(msg_type, Channel.KERNEL)


def is_known_channel(number: int) -> bool:
    """Whether a channel number is in the table or the plugin range."""
    return number in Channel._value2member_map_ or number in PLUGIN_CHANNELS
