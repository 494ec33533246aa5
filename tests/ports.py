"""A TCP port for a test to give a process it starts.

A port the system handed out (bind to port 0) is free only until someone
else takes it: any process that binds port 0 or connects out may get the
same one from the ephemeral range before the test's process binds it (and
two pytest workers start servers all the time). So the ports here come
from below that range, where neither ever picks, chosen at random and
checked free on 127.0.0.1.
"""

from __future__ import annotations

import random
import socket

#: The lowest port chosen (above the ports services usually claim).
LOWEST = 10_000


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, outside the ephemeral range."""
    high = _ephemeral_start() - 1
    for _ in range(200):
        port = random.randint(LOWEST, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {LOWEST} and {high}")
