"""A reloaded page's waiting input() at the protocol level: the same
session attaches again with a cursor (docs/protocol.md, section 5).

The browser's side is in test_browser_reload.py; these need no browser.
"""

from __future__ import annotations

import time

from cellmux.client import Message
from conftest import wait_for


def _input_requests(frames) -> list:
    found = []
    for frame in list(frames):
        if frame.channel == 1 and len(frame.parts) >= 4:
            msg = Message.from_frame(frame)
            if msg.msg_type == "input_request":
                found.append(msg)
    return found


def test_a_session_resumed_past_its_prompt_is_sent_the_prompt_again(server):
    """What a reloaded page does at the protocol level: the same session,
    with a cursor at or after the waiting input_request. The replay does not
    hold the prompt then, so the server sends it after the replay, once."""
    client = server.client()
    model = client.create_kernel()
    try:
        seen: list = []
        with client.connect(model.id, session="reloaded-page", listener=seen.append) as kernel:
            kernel.send(
                "execute_request",
                {"code": "print('got', input('who? '))", "silent": False, "allow_stdin": True},
            )
            wait_for(lambda: _input_requests(seen))
            prompt = _input_requests(seen)[0]
            cursor = kernel.last_seq
        assert cursor >= prompt.seq
        again: list = []
        with client.connect(
            model.id, session="reloaded-page", cursor=cursor, listener=again.append
        ) as kernel:
            wait_for(lambda: _input_requests(again))
            (resent,) = _input_requests(again)
            assert resent.msg_id == prompt.msg_id
            kernel.send("input_reply", {"value": "Ada"}, parent=resent.header)
            wait_for(
                lambda: any(
                    f.channel == 2 and b"got Ada" in b"".join(f.parts[3:4]) for f in list(again)
                )
            )
    finally:
        client.delete_kernel(model.id)
        client.close()


def test_a_session_resumed_before_its_prompt_gets_it_once(server):
    client = server.client()
    model = client.create_kernel()
    try:
        seen: list = []
        with client.connect(model.id, session="early", listener=seen.append) as kernel:
            start = kernel.last_seq
            kernel.send(
                "execute_request",
                {"code": "input('again? ')", "silent": False, "allow_stdin": True},
            )
            wait_for(lambda: _input_requests(seen))
        again: list = []
        with client.connect(model.id, session="early", cursor=start, listener=again.append):
            wait_for(lambda: _input_requests(again))
            time.sleep(0.5)  # a second copy would arrive right after the replay
            assert len(_input_requests(again)) == 1
    finally:
        client.delete_kernel(model.id)
        client.close()
