"""What the chaos tests share: raw HTTP, finding the nursery, cleaning up."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from conftest import RunningServer, start_server


def http(server: RunningServer, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One request with the token; the status and the JSON body, even for errors."""
    request = urllib.request.Request(
        server.url + path.lstrip("/"),
        method=method,
        headers={"Authorization": f"token {server.token}"},
        data=b"{}" if method == "POST" else None,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_server(*args: str) -> Iterator[RunningServer]:
    """A server of its own, stopped and with its temporary files removed afterwards."""
    server = start_server(*args)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.runtime_dir, ignore_errors=True)
