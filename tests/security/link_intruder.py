"""An intruder on the kernel link: connects to a starting kernel's endpoint
before that kernel's pump does, with a routing id of its own making.

Used by the link tests, in the test process or as a flooding process::

    python link_intruder.py LINKS_DIR SECONDS    # prints the messages it sent

It runs as root outside any sandbox, so it gets further than a kernel (or
another local user) could: the endpoint's directory does not stop it. Even
so, it can only reach an endpoint in the moment between the server binding
it and the kernel's pump saying hello.
"""

from __future__ import annotations

import os
import secrets
import sys
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

#: A data frame from a link id nobody expects (tag: stdout, iopub).
JUNK = [b"\x00\x02\x02\x00", b"{}", b"{}", b"{}", b"{}"]


def connect_early(
    ctx: zmq.Context, links_dir: str, timeout: float = 30.0, routing_id: bytes | None = None
) -> zmq.Socket | None:
    """A DEALER connected to some kernel's endpoint before its pump; None
    if no endpoint was caught within C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    tried: set[str] = set()
    while time.monotonic() < deadline:
        try:
            names = os.listdir(links_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            path = os.path.join(links_dir, name, "link.sock")
            if name in tried or not os.path.exists(path):
                continue
            tried.add(name)
            sock = ctx.socket(zmq.DEALER)
            sock.routing_id = routing_id or secrets.token_bytes(16)
            sock.linger = 0
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)
            sock.connect("ipc://" + path)
            connected = False
            if monitor.poll(2000):
                connected = recv_monitor_message(monitor)["event"] == zmq.EVENT_CONNECTED
            sock.disable_monitor()
            monitor.close()
            if connected:
                return sock
            sock.close()
        time.sleep(0.0005)
    return None


def flood(sock: zmq.Socket, seconds: float) -> int:
    """Send junk as fast as the link takes it; how many messages were sent."""
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock.send_multipart(JUNK, zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            sock.poll(10, zmq.POLLOUT)
    return sent


def main() -> None:
    links_dir, seconds = sys.argv[1], float(sys.argv[2])
    ctx = zmq.Context()
    print("watching", flush=True)
    sock = connect_early(ctx, links_dir)
    if sock is None:
        print("no endpoint", flush=True)
        raise SystemExit(1)
    print("connected", flush=True)
    print(flood(sock, seconds), flush=True)
    sock.close()
    ctx.term()


if __name__ == "__main__":
    main()
