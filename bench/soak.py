"""Soak: many kernel create/delete cycles across server restarts and crashes.

    python bench/soak.py [--cycles N] [--restarts M] [--json PATH]

Runs N create/delete cycles spread over M + 1 server lifetimes with one
state and runtime directory; lifetimes end alternately with SIGTERM (a clean
stop) and SIGKILL (a crash the next start cleans up after). It samples the
server's and the nursery's open file descriptors, threads and resident
memory, and after the last stop counts what is left: kernel directories,
server records, temporary record files, processes of the kernels' sessions.
The numbers it prints are the ones to look at: FDs and threads should be
flat within a lifetime, and nothing should be left at the end.

tests/chaos/test_records_soak.py runs a short version in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["ProcessSample", "leftovers", "sample", "settled_sample", "soak"]

_URL_LINE = re.compile(r"cellmux is serving at (?P<url>\S+)\?token=")


def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise LookupError(name)


ProcessSample = dict[str, int]


def sample(pid: int) -> ProcessSample:
    """Open FDs, threads and resident KiB of one process."""
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": _status_field(pid, "Threads"),
        "rss_kib": _status_field(pid, "VmRSS"),
    }


def settled_sample(pid: int, looks: int = 8, apart: float = 0.15) -> ProcessSample:
    """The sample with the fewest FDs of several taken C{apart} seconds
    apart. Right after a cycle, connections and sockets on their way out
    (an HTTP client's, a deleted kernel's link) may still be open for a
    moment, more so on a loaded machine; a leak is in every look, so the
    fewest still shows it."""
    samples = []
    for n in range(looks):
        if n:
            time.sleep(apart)
        samples.append(sample(pid))
    return min(samples, key=lambda s: (s["fds"], s["threads"]))


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _nursery(server: int) -> int:
    for pid in _children(server):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"cellmux.kernel.nursery" in f.read():
                    return pid
        except OSError:
            continue
    raise LookupError("no nursery")


class _Server:
    def __init__(self, base: Path, pool_size: int) -> None:
        self.token = secrets.token_hex(16)
        self.log = open(base / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        # The pool stays at its size: grown by the soak's quick creates (it
        # follows demand, by more when a loaded machine slows the refill),
        # its extra kernels' links would pass for leaked descriptors.
        config = base / "soak.toml"
        config.write_text(f"[cellmux]\npool_max = {pool_size}\n")
        argv = [
            sys.executable,
            "-m",
            "cellmux",
            "serve",
            "--port",
            "0",
            "--token",
            self.token,
            "--runtime-dir",
            str(base / "rt"),
            "--state-dir",
            str(base / "state"),
            "--pool-size",
            str(pool_size),
            "--config",
            str(config),
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        found = threading.Event()
        self.url = ""

        def read() -> None:
            for line in self.process.stdout:
                match = _URL_LINE.search(line)
                if match and not found.is_set():
                    self.url = match.group("url")
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(60):
            self.process.kill()
            raise RuntimeError("the server did not start; see server.log")
        self.nursery = _nursery(self.process.pid)

    def call(self, method: str, path: str) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path.lstrip("/"),
            method=method,
            data=b"{}" if method == "POST" else None,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None

    def stop(self, crash: bool) -> None:
        self.process.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
        self.process.wait(30)
        self.log.close()


def _link_listeners(pid: int, links: Path) -> int:
    """How many kernel link endpoints (listening unix sockets under
    C{links}, their files removed or not) the process C{pid} has open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    with open(f"/proc/{pid}/net/unix") as table:
        next(table)  # Num RefCount Protocol Flags Type St Inode Path
        for line in table:
            fields = line.split()
            listening = int(fields[3], 16) & 0x10000  # __SO_ACCEPTCON
            if listening and fields[6] in inodes and len(fields) > 7:
                count += fields[7].startswith(str(links))
    return count


def _quiesce(base: Path, pool_size: int, server: int, timeout: float = 10.0) -> None:
    """Wait until only the pool's kernels have directories and link endpoints.

    Deleted kernels are still being reaped for a moment, and each holds a
    few descriptors in the nursery (its uid's lock, its cgroup) and one in
    the server (its link endpoint, which ZeroMQ's I/O thread unbinds a
    little after the server asked): a sample taken then would count them.
    """
    kernels = base / "rt" / "kernels"
    links = base / "rt" / "links"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(os.listdir(kernels)) == 2 * pool_size and (  # each has a .tmp too
            _link_listeners(server, links) == pool_size
        ):
            time.sleep(0.2)  # the pool kernel's fds settle after its start
            return
        time.sleep(0.05)


def leftovers(base: Path, sessions: set[int]) -> dict[str, int]:
    """What is left after the last stop: it should all be zero."""
    kernels = base / "rt" / "kernels"
    links = base / "rt" / "links"
    servers = base / "state" / "servers"
    alive = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[3]) not in sessions or fields[0] == "Z":
                    continue
                # A session number may be reused (other servers' kernels):
                # ours worked in this runtime directory.
                if os.readlink(f"/proc/{name}/cwd").startswith(str(base / "rt")):
                    alive += 1
            except (OSError, IndexError, ValueError):
                continue
    return {
        "kernel_dirs": len(os.listdir(kernels)) if kernels.is_dir() else 0,
        "link_endpoints": len(os.listdir(links)) if links.is_dir() else 0,
        "server_records": len(list(servers.glob("*.json"))) if servers.is_dir() else 0,
        "temporary_records": len(list(servers.glob(".tmp-*"))) if servers.is_dir() else 0,
        "kernel_session_processes": alive,
    }


def soak(cycles: int, restarts: int, base: Path, pool_size: int = 1) -> dict[str, Any]:
    """Run the soak in C{base}; return the samples and what was left."""
    lifetimes = restarts + 1
    per_lifetime = max(1, cycles // lifetimes)
    warmup = max(1, per_lifetime // 10)
    sessions: set[int] = set()
    runs = []
    for life in range(lifetimes):
        started = time.monotonic()
        server = _Server(base, pool_size)
        samples: dict[str, list[ProcessSample]] = {"server": [], "nursery": []}
        try:
            for i in range(per_lifetime):
                status, model = server.call("POST", "/api/kernels")
                assert status == 201, (status, model)
                sessions.add(int(model["pid"]))
                server.call("DELETE", f"/api/kernels/{model['id']}")
                if i + 1 == warmup or i + 1 == per_lifetime:
                    _quiesce(base, pool_size, server.process.pid)
                    samples["server"].append(settled_sample(server.process.pid))
                    samples["nursery"].append(settled_sample(server.nursery))
        finally:
            # Alternate clean stops and crashes; the last stop is clean.
            crash = life % 2 == 1 and life != lifetimes - 1
            server.stop(crash)
        runs.append(
            {
                "cycles": per_lifetime,
                "ended_by": "SIGKILL" if crash else "SIGTERM",
                "seconds": round(time.monotonic() - started, 2),
                "server": samples["server"],
                "nursery": samples["nursery"],
            }
        )
    return {"lifetimes": runs, "left": leftovers(base, sessions)}


def _print(result: dict[str, Any]) -> None:
    print(
        "life  ended    cycles  seconds  server fds/threads/rss KiB    nursery fds/threads/rss KiB"
    )
    for n, run in enumerate(result["lifetimes"]):
        s0, s1 = run["server"][0], run["server"][-1]
        n0, n1 = run["nursery"][0], run["nursery"][-1]

        def fmt(a: ProcessSample, b: ProcessSample) -> str:
            return (
                f"{a['fds']}->{b['fds']} / {a['threads']}->{b['threads']} / "
                f"{a['rss_kib']}->{b['rss_kib']}"
            )

        print(
            f"{n:>4}  {run['ended_by']:<7}  {run['cycles']:>6}  {run['seconds']:>7}  "
            f"{fmt(s0, s1):<30}  {fmt(n0, n1)}"
        )
    print("left after the last stop:", json.dumps(result["left"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--pool-size", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cellmux-soak-"))
    try:
        result = soak(args.cycles, args.restarts, base, args.pool_size)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if not any(result["left"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
