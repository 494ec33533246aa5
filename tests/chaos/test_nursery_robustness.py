"""Nothing sent on the pipe ends the nursery: each bad command is an error
event, and the nursery goes on serving."""

from __future__ import annotations

import os
import secrets

from cellmux.protocol import nursery as wire

from .nursery_driver import NurseryDriver


def test_bad_commands_are_errors_and_the_nursery_goes_on(tmp_path):
    nursery = NurseryDriver(str(tmp_path))
    try:
        taken = secrets.token_hex(8)
        os.makedirs(os.path.join(str(tmp_path), "kernels", taken))  # in the way
        bad = [
            b"not json\n",
            b"[1, 2]\n",
            b'{"cmd": "spawn", "link": "zz", "secret": "00"}\n',
            b'{"cmd": "reboot"}\n',
            b'{"cmd": "signal", "link": "00", "signal": "SIGINT"}\n',
            wire.encode(wire.Spawn(taken, "00")),
        ]
        for line in bad:
            nursery.send_line(line)
            error = nursery.next_event()
            assert isinstance(error, wire.Error), (line, error)
        assert "cannot prepare a kernel" in error.message and error.link == taken
        # A line longer than the protocol allows is dropped, not buffered.
        nursery.send_line(b"x" * (wire.MAX_LINE + 10) + b"\n")
        link = nursery.spawn()
        spawned = nursery.next_event()
        assert spawned == wire.Spawned(link, spawned.pid)
        nursery.send(wire.Signal(link, "SIGNOPE"))
        assert "unknown signal" in nursery.next_event().message
        nursery.send(wire.Kill(link))
        exited = nursery.expect(wire.Exited, link=link)
        assert exited.info["cause"] == "SIGTERM"
        assert nursery.process.poll() is None
    finally:
        assert nursery.stop() == 0
