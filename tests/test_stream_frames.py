"""The kernel's stream messages, built without Session's general path,
are byte for byte what Session makes of them (cellmux.kernel.tuning)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session

from cellmux.kernel.tuning import StreamFrames
from cellmux.protocol import Channel, JupyterSocket, split_bundle

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


@settings(max_examples=100, deadline=None)
@given(name=_names, text=st.text(min_size=1, max_size=StreamFrames.LAID_OUT_MAX + 100))
def test_laid_out_streams_are_the_bundle_entry_of_the_same_message(name, text):
    """What the kernel sends the pump's ``published`` socket: a small
    message as [delimiter, signature, its bundle entry], on its channel; a
    large one as Session's frames, for the pump to send alone."""
    session = Session(key=b"")
    frames = StreamFrames(session)
    parent = session.msg("execute_request", {"code": "1"})["header"]
    ours, _, _ = frames.laid_out(name, text, parent)
    header = session.unpack(ours[2] if len(ours) > 3 else split_bundle(ours[2])[0][2][0])
    msg = session.msg("stream", {"name": name, "text": text}, parent=parent, header=header)
    stock = session.serialize(msg)
    if len(ours) > 3:
        assert ours == stock
        assert sum(map(len, stock[2:])) > StreamFrames.LAID_OUT_MAX
        return
    assert ours[:2] == stock[:2]
    channel = Channel.STDERR if name == "stderr" else Channel.STDOUT
    assert split_bundle(ours[2]) == [(channel, JupyterSocket.IOPUB, stock[2:])]
