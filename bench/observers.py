"""Many cheap observers of one cellmux kernel, in one process (for bench/run.py's fan-out).

    python bench/observers.py URL TOKEN KERNEL_ID COUNT MSG_ID LINES

Opens COUNT websocket connections to the kernel (the native protocol's
hello, nothing more), prints ``ready`` once all are welcome, then reads
every frame each connection gets until the idle status of request MSG_ID,
and prints one JSON line: frames received in all, how many observers saw
all LINES lines of stdout in order, and the wall-clock time (time.time())
of the last idle. Frames are looked at as bytes (no JSON decoding but the stream
texts of MSG_ID), so that several such processes can keep up with the
server: the fan-out stage measures the server's CPU, not its clients'.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time

from drivers import CellmuxConnection

from cellmux.protocol import Channel

_HEADER = struct.Struct(">HBBQI")
#: Connections opened at once (a burst of 1,000 overflows the listen backlog).
CONNECT_AT_ONCE = 50


async def _observe(ws, msg_id: bytes, expected: list[str]) -> tuple[int, bool, float]:
    frames = 0
    text: list[str] = []
    while True:
        raw = await ws.recv()
        frames += 1
        channel, _socket, _flags, _seq, nparts = _HEADER.unpack_from(raw, 0)
        if channel == Channel.CONTROL or nparts < 4 or msg_id not in raw:
            continue
        lengths = struct.unpack_from(f">{nparts}I", raw, 16)
        start = 16 + 4 * nparts + sum(lengths[:3])
        content = raw[start : start + lengths[3]]
        if channel == Channel.STDOUT:
            text.append(json.loads(content)["text"])
        elif channel == Channel.STATUS and b'"idle"' in content:
            return frames, "".join(text).splitlines() == expected, time.time()


async def main() -> None:
    url, token, kernel_id, count, msg_id, lines = sys.argv[1:7]
    connections = []
    for first in range(0, int(count), CONNECT_AT_ONCE):
        batch = range(first, min(int(count), first + CONNECT_AT_ONCE))
        opened = await asyncio.gather(
            *(CellmuxConnection.open(url, token, kernel_id) for _ in batch)
        )
        connections += [conn.ws for conn in opened]
    print("ready", flush=True)
    expected = [str(i) for i in range(int(lines))]
    needle = msg_id.encode()  # random: only the request's messages carry it
    seen = await asyncio.gather(*(_observe(ws, needle, expected) for ws in connections))
    await asyncio.gather(*(ws.close() for ws in connections))
    print(
        json.dumps(
            {
                "frames": sum(s[0] for s in seen),
                "complete": sum(s[1] for s in seen),
                "last_idle": max(s[2] for s in seen),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
