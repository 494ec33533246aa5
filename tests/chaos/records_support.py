"""What the crash-record and disk chaos tests share: servers with a fixed
runtime and state directory (so a second server takes over the first one's),
raw HTTP, processes and small disks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import RunningServer, start_server


def serve(base: Path, *args: str, database: str | None = None) -> RunningServer:
    """A server whose runtime dir is BASE/rt and state dir BASE/state."""
    extra = ["--database", database] if database is not None else []
    return start_server(
        "--runtime-dir", str(base / "rt"), "--state-dir", str(base / "state"), *extra, *args
    )


def discard(server: RunningServer) -> None:
    """Stop a server (if it runs) and remove the log dir start_server made."""
    server.stop()
    shutil.rmtree(server.runtime_dir, ignore_errors=True)


@contextlib.contextmanager
def serving(base: Path, *args: str, database: str | None = None) -> Iterator[RunningServer]:
    server = serve(base, *args, database=database)
    try:
        yield server
    finally:
        discard(server)


def crash(server: RunningServer) -> None:
    """SIGKILL the server, as a crash or the OOM killer would."""
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)


def http(
    server: RunningServer, method: str, path: str, body: Any = None, *, raw: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    """One request with the token: the status and the JSON body, errors too."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path.lstrip("/"),
        method=method,
        headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"},
        data=data,
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def session_members(sid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                    found.append(int(name))
    return found


def kill_all(pids) -> None:
    """Test cleanup: whatever of these still runs."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of C{size} mounted on path (we run as root), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)  # a process that just ended may still hold it
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill a small disk up to C{leave} bytes free with one ballast file."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while shutil.disk_usage(disk).free > leave + len(chunk):
                f.write(chunk)
                f.flush()
        with contextlib.suppress(OSError):
            while shutil.disk_usage(disk).free > leave:
                f.write(b"\0" * 4096)
                f.flush()
    return ballast
