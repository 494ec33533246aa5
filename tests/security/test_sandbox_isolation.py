"""Attacks from inside real kernels on the shared server: each one fails,
and the server and the other kernels keep working.

The server runs as root here and in CI, so kernels have their own uids,
network namespaces and mount namespaces (docs/security.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from urllib.parse import urlsplit

import pytest

from conftest import start_server, wait_for

DEFAULT_UID_RANGE = (200000, 299999)


def _real_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{name}/status") as f:
                    status = f.read()
                if f"\nUid:\t{uid}\t" in status and "State:\tZ" not in status:
                    pids.append(int(name))
    return pids


def _value(kernel, code: str, timeout: float = 30):
    """Run code whose last line prints one JSON value; return that value."""
    result = kernel.execute(code, timeout=timeout)
    assert result.error is None, result.error
    return json.loads(result.stdout.strip().splitlines()[-1])


def _still_works(kernel) -> None:
    assert kernel.execute("6 * 7", timeout=30).result_text == "42"


@pytest.fixture
def other(client):
    """A second kernel, the victim."""
    model = client.create_kernel()
    with client.connect(model.id) as k:
        yield k
    with contextlib.suppress(Exception):
        client.delete_kernel(model.id)


def test_each_kernel_has_its_own_uid_and_private_directory(client, kernel, other):
    mine = _value(
        kernel,
        "import os, json; s = os.stat('.'); print(json.dumps([os.getuid(), os.getgid(), "
        "os.getgroups(), s.st_uid, oct(s.st_mode & 0o777), os.getcwd()]))",
    )
    theirs = _value(other, "import os, json; print(json.dumps([os.getuid(), os.getcwd()]))")
    uid, gid, groups, owner, mode, _cwd = mine
    assert DEFAULT_UID_RANGE[0] <= uid <= DEFAULT_UID_RANGE[1]
    assert gid == uid and groups == [] and owner == uid and mode == "0o700"
    assert theirs[0] != uid
    # the process the server reports is the one running as that uid
    assert _real_uid(client.get_kernel(kernel.kernel_id).pid) == uid


def test_cannot_read_or_write_another_kernels_directory(kernel, other):
    victim_dir = _value(
        other,
        "import os, json; open('secret.txt', 'w').write('victim data'); "
        "print(json.dumps(os.getcwd()))",
    )
    attempts = _value(
        kernel,
        f"""
import json, os
d = {victim_dir!r}
outcome = {{}}
for name, attack in [
    ("list", lambda: os.listdir(d)),
    ("read", lambda: open(os.path.join(d, "secret.txt")).read()),
    ("write", lambda: open(os.path.join(d, "planted.txt"), "w").write("x")),
    ("list parent", lambda: os.listdir(os.path.dirname(d))),
    ("chmod", lambda: os.chmod(d, 0o777)),
]:
    try:
        attack()
        outcome[name] = "succeeded"
    except OSError as e:
        outcome[name] = type(e).__name__
print(json.dumps(outcome))
""",
    )
    assert attempts == {
        "list": "PermissionError",
        "read": "PermissionError",
        "write": "PermissionError",
        "list parent": "PermissionError",
        "chmod": "PermissionError",
    }
    files = _value(other, "import os, json; print(json.dumps(os.listdir('.')))")
    assert "planted.txt" not in files
    assert _value(other, "import json; print(json.dumps(open('secret.txt').read()))") == (
        "victim data"
    )


def test_cannot_signal_another_kernel_the_server_or_the_nursery(client, server, kernel, other):
    victim = client.get_kernel(other.kernel_id).pid
    nursery = server.nursery_pid()
    assert nursery, "the server has no nursery"
    outcome = _value(
        kernel,
        f"""
import json, os, signal
outcome = {{}}
for name, pid in [("kernel", {victim}), ("server", {server.process.pid}),
                  ("nursery", {nursery}), ("group", -{victim})]:
    try:
        os.kill(pid, signal.SIGKILL)
        outcome[name] = "succeeded"
    except OSError as e:
        outcome[name] = type(e).__name__
print(json.dumps(outcome))
""",
    )
    assert outcome == {
        "kernel": "PermissionError",
        "server": "PermissionError",
        "nursery": "PermissionError",
        "group": "PermissionError",
    }
    assert server.alive()
    _still_works(other)


def test_no_network_but_loopback(server, kernel):
    port = urlsplit(server.url).port
    outcome = _value(
        kernel,
        f"""
import json, socket
outcome = {{"interfaces": [name for _, name in socket.if_nameindex()]}}
# 192.0.2.1 (TEST-NET-1) is never routed; without routes this fails at once
for name, address in [("server", ("127.0.0.1", {port})), ("outside", ("192.0.2.1", 80))]:
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(address)
        outcome[name] = "connected"
    except OSError as e:
        outcome[name] = type(e).__name__ + ": " + (e.strerror or "")
    finally:
        s.close()
print(json.dumps(outcome))
""",
    )
    assert outcome["interfaces"] == ["lo"]
    assert outcome["server"].startswith("ConnectionRefusedError")
    assert outcome["outside"] == "OSError: Network is unreachable"


def test_cannot_read_the_servers_environment_or_config(server, kernel):
    nursery = server.nursery_pid()
    assert nursery, "the server has no nursery"
    rt = os.path.join(server.runtime_dir, "rt")
    outcome = _value(
        kernel,
        f"""
import json, os
outcome = {{}}
for pid in ({server.process.pid}, {nursery}, 1):
    for what in ("environ", "cmdline", "status"):
        try:
            open(f"/proc/{{pid}}/{{what}}", "rb").read()
            outcome[f"{{pid}}/{{what}}"] = "read"
        except OSError as e:
            outcome[f"{{pid}}/{{what}}"] = type(e).__name__
mine = os.getuid()
outcome["visible pids of others"] = [
    p for p in os.listdir("/proc")
    if p.isdigit() and os.stat(f"/proc/{{p}}").st_uid not in (mine, 0)
]
for name, path in [("runtime dir", {rt!r}), ("server log", {server.log_path!r})]:
    try:
        os.listdir(path) if name == "runtime dir" else open(path).read()
        outcome[name] = "read"
    except OSError as e:
        outcome[name] = type(e).__name__
outcome["environ"] = dict(os.environ)
print(json.dumps(outcome))
""",
    )
    environ = outcome.pop("environ")
    assert server.token not in json.dumps(environ)
    with open(f"/proc/{server.process.pid}/environ", "rb") as f:
        server_env = dict(
            item.decode(errors="replace").split("=", 1) for item in f.read().split(b"\0") if item
        )
    passed_on = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "VIRTUAL_ENV", "PYTHONUNBUFFERED"}
    leaked = {k for k, v in environ.items() if k not in passed_on and server_env.get(k) == v}
    assert leaked == set(), leaked
    # other users' processes (the server, the nursery, init) are invisible
    for key, value in outcome.items():
        if "/" in key:
            assert value == "FileNotFoundError", (key, value)
    assert outcome["visible pids of others"] == []
    assert outcome["runtime dir"] == "PermissionError"
    assert outcome["server log"] == "FileNotFoundError"  # its /tmp is its own


def test_inherits_no_file_descriptors(kernel):
    targets = _value(
        kernel,
        "import os, json\nfds = {}\nfor fd in os.listdir('/proc/self/fd'):\n"
        "    try: fds[fd] = os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError: pass  # the directory listing's own fd\n"
        "print(json.dumps(fds))",
    )
    # /dev/null stdio (ipykernel pipes fds 1 and 2 to capture C output),
    # zmq's and ipykernel's own sockets, eventfds and pipes; no file.
    for target in targets.values():
        assert target == "/dev/null" or target.startswith(("socket:", "anon_inode:", "pipe:"))


def test_fork_bomb_hits_the_process_limit_and_dies_with_its_kernel(client, server, other):
    model = client.create_kernel()
    with client.connect(model.id) as bomber:
        uid = _real_uid(model.pid)
        outcome = _value(
            bomber,
            """
import errno, json, os, time
forked, failure = 0, None
for _ in range(5000):
    try:
        pid = os.fork()
    except OSError as e:
        failure = errno.errorcode[e.errno]
        break
    if pid == 0:  # every child leaves the group and forks again, then waits
        os.setsid()
        try:
            os.fork()
        except OSError:
            pass
        time.sleep(300)
        os._exit(0)
    forked += 1
print(json.dumps([forked, failure]))
""",
            timeout=60,
        )
        forked, failure = outcome
        assert failure == "EAGAIN"
        assert forked < 256  # limit_processes counts the bomb's children too
        assert len(_pids_of_uid(uid)) <= 256
        # the machine still forks for everyone else
        _still_works(other)
        assert server.alive()
    client.delete_kernel(model.id)
    # every process of that uid, even those that left the group, is gone
    wait_for(lambda: not _pids_of_uid(uid), timeout=20)
    _still_works(other)


def test_memory_bomb_fails_and_the_kernel_lives(kernel, other):
    outcome = _value(
        kernel,
        """
import json, mmap
outcome = {}
for name, bomb in [
    ("bytes", lambda: bytearray(64 * 2**30)),
    ("shared mmap", lambda: mmap.mmap(-1, 64 * 2**30)),
    ("list growth", lambda: [0] * (8 * 2**30)),
]:
    try:
        bomb()
        outcome[name] = "allocated"
    except (MemoryError, OSError) as e:
        outcome[name] = type(e).__name__
print(json.dumps(outcome))
""",
    )
    assert outcome == {
        "bytes": "MemoryError",
        "shared mmap": "OSError",
        "list growth": "MemoryError",
    }
    _still_works(kernel)
    _still_works(other)


def test_forged_frames_on_the_link_reach_no_one(client, server, kernel, other):
    marker = f"FORGED-{os.getpid()}-{time.monotonic_ns()}"
    seen = []

    def watch(frame) -> None:
        if any(marker.encode() in bytes(part) for part in frame.parts):
            seen.append((frame.channel, frame.parts))

    kernel.add_listener(watch)
    other.add_listener(watch)
    victim_dir = _value(other, "import os, json; print(json.dumps(os.getcwd()))")
    outcome = _value(
        kernel,
        f"""
import json, os, zmq
from cellmux.protocol import Channel, JupyterSocket, encode_tag
from cellmux.protocol.jupyter import jupyter_parts
victim = bytes.fromhex(os.path.basename({victim_dir!r}))
mine = bytes.fromhex(os.path.basename(os.getcwd()))
runtime = os.path.dirname(os.path.dirname(os.getcwd()))
# No shared socket; the kernel's own endpoint is gone once its pump connected.
sockets = [os.path.join(runtime, "link.sock")] + [
    os.path.join(runtime, "links", link.hex(), "link.sock") for link in (victim, mine)
]
outcome = {{"socket found": any(os.path.exists(p) for p in sockets)}}
try:
    os.listdir(os.path.join(runtime, "links"))
    outcome["links listed"] = True
except PermissionError:
    outcome["links listed"] = False
socket_path = os.path.join(runtime, "links", mine.hex(), "link.sock")
ctx = zmq.Context.instance()
from datetime import UTC, datetime
parts = jupyter_parts(
    "stream", {{"name": "stdout", "text": {marker[:6]!r} + {marker[6:]!r}}},
    now=datetime.now(UTC), session="x",
)
for name, routing_id in [("as victim", victim), ("as itself", mine), ("unknown", os.urandom(16))]:
    if not os.path.exists(socket_path):
        outcome[name] = "nowhere to connect"
        continue
    s = ctx.socket(zmq.DEALER)
    s.routing_id = routing_id
    s.linger = 0
    s.connect("ipc://" + socket_path)
    for channel in (Channel.STDOUT, Channel.CONTROL, Channel.STATUS):
        s.send_multipart([encode_tag(channel, JupyterSocket.IOPUB), *parts])
    s.send_multipart([b"hello", ({marker[:6]!r} + {marker[6:]!r}).encode()])
    outcome[name] = "sent"
    s.close()
print(json.dumps(outcome))
""",
    )
    assert not outcome["socket found"]
    assert not outcome["links listed"]
    assert outcome["as victim"] == outcome["unknown"] == "nowhere to connect"
    # the kernel's own, authenticated link: tag output as control (0) and
    # files (9), channels a kernel may never send on, both where the pump
    # classifies a message and where the kernel lays a stream message out
    # for the pump's bundle itself (tuning's `direct`)
    result = kernel.execute(
        f"""
import time
import cellmux.kernel.pump as pump
import cellmux.kernel.tuning as tuning
real, laid = pump.classify, tuning.StreamFrames.laid_out

def laid_out_as(channel):
    def laid_out(self, name, text, parent):
        if "FORGED" not in text:
            return laid(self, name, text, parent)
        if channel is None:  # not laid out: the pump classifies it
            return self(name, text, parent, None)
        kept, self._channels = self._channels, (channel, channel)
        try:
            return laid(self, name, text, parent)
        finally:
            self._channels = kept
    return laid_out

for channel in (0, 9):
    pump.classify = lambda header, content, c=channel: (
        c if b"FORGED" in bytes(content) else real(header, content)
    )
    for how in (None, channel):
        tuning.StreamFrames.laid_out = laid_out_as(how)
        print({marker[:6]!r} + {marker[6:]!r}, flush=True)
        time.sleep(0.3)
pump.classify, tuning.StreamFrames.laid_out = real, laid
""",
        timeout=30,
    )
    assert result.error is None
    time.sleep(1.0)
    assert seen == []
    assert server.alive()
    _still_works(kernel)
    _still_works(other)
    assert client.get_kernel(other.kernel_id).execution_state != "dead"


def test_a_server_started_in_tmp_still_gives_kernels_their_own_tmp():
    # `python -m cellmux serve` run from /tmp puts /tmp on sys.path; the
    # kernel's private /tmp must stay private, and a venv under /tmp usable.
    fd, probe = tempfile.mkstemp(dir="/tmp", prefix="cellmux-probe-")
    os.close(fd)
    server = start_server("--pool-size", "0", cwd="/tmp")
    try:
        with server.client() as client:
            model = client.create_kernel()
            with client.connect(model.id) as k:
                result = k.execute(f"import os\nos.path.exists({probe!r})")
                assert result.result_text == "False", result.error
    finally:
        server.stop()
        os.unlink(probe)
