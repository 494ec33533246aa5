"""The kernel link: a peer that cannot prove its secret gets nothing."""

from __future__ import annotations

import json
import os
import secrets

import zmq

from cellmux.protocol import link_control, link_mac


def test_forged_link_peers_are_ignored(server, kernel):
    endpoint = "ipc://" + os.path.join(server.runtime_dir, "rt", "link.sock")
    ctx = zmq.Context()
    try:
        # An unknown link id: no challenge, nothing relayed.
        intruder = ctx.socket(zmq.DEALER)
        intruder.routing_id = secrets.token_bytes(16)
        intruder.connect(endpoint)
        intruder.send_multipart(link_control("hello", version=1, pid=os.getpid()))
        intruder.send_multipart([b"\x00\x02\x02\x00", b"{}", b"{}", b"{}", b"{}"])
        assert intruder.poll(1000) == 0
        # Guessing a proof without the secret does not get in either.
        fake_mac = link_mac(b"guess", intruder.routing_id, b"nonce")
        intruder.send_multipart([b"\x00\x00\x00\x00", json.dumps({"mac": fake_mac}).encode()])
        assert intruder.poll(500) == 0
        intruder.close(0)
    finally:
        ctx.term()
    # The real kernel is untouched and the server logged the intruder.
    assert kernel.execute("'fine'").result_text == "'fine'"
    assert "dropping a message from unknown link" in server.log()
