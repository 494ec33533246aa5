"""The Jupyter messages the server makes (cellmux.protocol.jupyter), as a
stock Jupyter client reads them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from cellmux.protocol.jupyter import JUPYTER_PROTOCOL_VERSION, SERVER_SESSION, jupyter_parts

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
objects = st.dictionaries(st.text(), json_values, max_size=4)
times = st.datetimes(timezones=st.just(UTC))


@given(st.text(min_size=1), objects, times, st.none() | objects)
def test_four_json_parts_with_a_jupyter_header(msg_type, content, now, parent):
    parts = jupyter_parts(msg_type, content, now=now, parent=parent)
    assert len(parts) == 4 and all(isinstance(p, bytes) for p in parts)
    header, parent_header, metadata, decoded = (json.loads(p) for p in parts)
    assert decoded == content
    assert parent_header == (parent or {})
    assert metadata == {}
    assert header["msg_type"] == msg_type
    assert header["session"] == SERVER_SESSION
    assert header["version"] == JUPYTER_PROTOCOL_VERSION
    assert datetime.fromisoformat(header["date"]) == now
    assert isinstance(header["msg_id"], str) and header["msg_id"]


def test_message_ids_are_fresh_unless_given():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ids = {json.loads(jupyter_parts("status", {}, now=now)[0])["msg_id"] for _ in range(100)}
    assert len(ids) == 100
    header = json.loads(jupyter_parts("status", {}, now=now, msg_id="m1", session="s")[0])
    assert (header["msg_id"], header["session"]) == ("m1", "s")
