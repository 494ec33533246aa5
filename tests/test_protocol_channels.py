"""Tests for cellmux.protocol.channels: the channel table and message routing."""

from __future__ import annotations

import pytest

from cellmux.protocol import (
    CLIENT_SENDABLE,
    KERNEL_FORBIDDEN,
    PLUGIN_CHANNELS,
    Channel,
    JupyterSocket,
    channel_for,
    is_known_channel,
)


def test_channel_numbers_are_the_wire_numbers() -> None:
    assert {c.name: c.value for c in Channel} == {
        "CONTROL": 0,
        "STDIN": 1,
        "STDOUT": 2,
        "STDERR": 3,
        "STATUS": 4,
        "INTROSPECTION": 5,
        "EXECUTE": 6,
        "DISPLAY": 7,
        "COMM": 8,
        "FILES": 9,
        "KERNEL": 10,
    }


def test_socket_numbers_are_the_wire_numbers() -> None:
    assert {s.name: s.value for s in JupyterSocket} == {
        "NONE": 0,
        "SHELL": 1,
        "IOPUB": 2,
        "STDIN": 3,
        "CONTROL": 4,
    }


@pytest.mark.parametrize(
    "stream_name, channel",
    [
        ("stdout", Channel.STDOUT),
        ("stderr", Channel.STDERR),
        (None, Channel.STDOUT),
        ("other", Channel.STDOUT),
    ],
)
def test_stream(stream_name: str | None, channel: Channel) -> None:
    assert channel_for("stream", stream_name) is channel


@pytest.mark.parametrize(
    "msg_type, channel",
    [
        ("input_request", Channel.STDIN),
        ("input_reply", Channel.STDIN),
        ("status", Channel.STATUS),
        ("execute_request", Channel.EXECUTE),
        ("execute_input", Channel.EXECUTE),
        ("execute_reply", Channel.EXECUTE),
        ("display_data", Channel.DISPLAY),
        ("update_display_data", Channel.DISPLAY),
        ("execute_result", Channel.DISPLAY),
        ("error", Channel.DISPLAY),
        ("clear_output", Channel.DISPLAY),
        ("comm_open", Channel.COMM),
        ("comm_msg", Channel.COMM),
        ("comm_close", Channel.COMM),
        ("comm_info_request", Channel.COMM),
        ("comm_info_reply", Channel.COMM),
        ("complete_request", Channel.INTROSPECTION),
        ("complete_reply", Channel.INTROSPECTION),
        ("inspect_request", Channel.INTROSPECTION),
        ("inspect_reply", Channel.INTROSPECTION),
        ("is_complete_request", Channel.INTROSPECTION),
        ("is_complete_reply", Channel.INTROSPECTION),
        ("history_request", Channel.INTROSPECTION),
        ("history_reply", Channel.INTROSPECTION),
        ("kernel_info_request", Channel.KERNEL),
        ("kernel_info_reply", Channel.KERNEL),
        ("shutdown_request", Channel.KERNEL),
        ("shutdown_reply", Channel.KERNEL),
        ("interrupt_request", Channel.KERNEL),
        ("debug_request", Channel.KERNEL),
        ("debug_event", Channel.KERNEL),
        ("a_type_from_the_future", Channel.KERNEL),
        ("", Channel.KERNEL),
        ("Stream", Channel.KERNEL),
    ],
)
def test_channel_for(msg_type: str, channel: Channel) -> None:
    assert channel_for(msg_type) is channel


def test_stream_name_only_matters_for_stream() -> None:
    assert channel_for("status", "stderr") is Channel.STATUS
    assert channel_for("execute_result", "stderr") is Channel.DISPLAY


def test_kernel_messages_never_land_on_server_channels() -> None:
    for msg_type in ["stream", "status", "execute_reply", "comm_msg", "file", "files", "control"]:
        assert channel_for(msg_type) not in KERNEL_FORBIDDEN


@pytest.mark.parametrize("number", [c.value for c in Channel])
def test_table_channels_are_known(number: int) -> None:
    assert is_known_channel(number)


@pytest.mark.parametrize("number", [16, 17, 1000, 0xFFFF])
def test_plugin_channels_are_known(number: int) -> None:
    assert number in PLUGIN_CHANNELS
    assert is_known_channel(number)


@pytest.mark.parametrize("number", [11, 12, 13, 14, 15])
def test_gap_is_unknown(number: int) -> None:
    assert not is_known_channel(number)


@pytest.mark.parametrize("number", [-1, 0x10000, 2**64])
def test_out_of_range_is_unknown(number: int) -> None:
    assert not is_known_channel(number)


def test_server_only_channels() -> None:
    assert {Channel.CONTROL, Channel.FILES} == KERNEL_FORBIDDEN
    assert not (KERNEL_FORBIDDEN & CLIENT_SENDABLE)
