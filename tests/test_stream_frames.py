"""The kernel's stream messages, built without Session's general path,
are byte for byte what Session makes of them (cellmux.kernel.tuning)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session

from cellmux.kernel.tuning import StreamFrames

_texts = st.text(min_size=1, max_size=200)
_names = st.sampled_from(["stdout", "stderr"])


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.tuples(_names, _texts), min_size=1, max_size=5),
    codes=st.lists(st.text(max_size=20), min_size=1, max_size=3),
    topic=st.sampled_from([None, b"stream.stdout", b"stream.stderr"]),
)
def test_stream_frames_are_what_session_sends(texts, codes, topic):
    session = Session(key=b"")
    frames = StreamFrames(session)
    parents = [session.msg("execute_request", {"code": c})["header"] for c in codes]
    parents.append({})  # output with no parent (a thread's, after the cell)
    for i, (name, text) in enumerate(texts):
        parent = parents[i % len(parents)]
        ours, flags, copy = frames(name, text, parent, topic)
        # the same header (its id and date are made per message) through stock
        header = session.unpack(ours[-4])
        assert header["msg_id"].endswith(f"_{session.message_count - 1}")
        msg = session.msg("stream", {"name": name, "text": text}, parent=parent, header=header)
        assert ours == session.serialize(msg, ident=topic)
        assert (flags, copy) == (0, True)


def test_a_signed_session_is_not_used():
    assert StreamFrames.usable(Session(key=b""))
    assert not StreamFrames.usable(Session(key=b"secret"))
    adapting = Session(key=b"")
    adapting.adapt_version = 4
    assert not StreamFrames.usable(adapting)
