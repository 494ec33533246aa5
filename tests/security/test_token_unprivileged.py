"""Without root, kernels share the server's uid: nothing of the token may
stay readable to them in /proc (the server's environ, cmdline, mem) or by
ptrace.

The server runs as ``nobody``, started by a small root wrapper (as in
test_sandbox_unprivileged.py) that makes the interpreter reachable, drops
to nobody and execs ``cellmux serve`` with the token either in
``$CELLMUX_TOKEN`` or on the command line (``--token``). Needs root to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import sys

import pytest

from conftest import start_server

WRAPPER = """
import os, sys
from cellmux.kernel import sandbox
uid, gid = int(os.environ.pop("RUN_AS_UID")), int(os.environ.pop("RUN_AS_GID"))
argv = sys.argv[1:]
if os.environ.pop("TOKEN_FROM") == "environment":
    at = argv.index("--token")
    os.environ["CELLMUX_TOKEN"] = argv[at + 1]
    del argv[at : at + 2]
base = os.path.dirname(argv[argv.index("--runtime-dir") + 1])
os.chown(base, uid, gid)
paths = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), base,
         os.getcwd(), *[p for p in sys.path if os.path.isabs(p)]]
sandbox.expose_to_kernels(paths)
# A /proc like the host's (expose_to_kernels hides other uids' processes):
# a server without root runs where processes of its uid see each other.
sandbox._mount("proc", "/proc", "proc", 0)
os.environ["HOME"] = base
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
os.execv(sys.executable, [sys.executable, "-m", "cellmux", "serve", *argv])
"""

#: Runs in a kernel: every way a process of the same uid could read the
#: server's token. Prints a JSON object: what each attempt got.
ATTEMPTS = """
import ctypes, errno, json, os
pid, token = {pid}, {token!r}.encode()
outcome = {{}}
for what in ("environ", "cmdline", "maps", "mem"):
    try:
        with open(f"/proc/{{pid}}/{{what}}", "rb") as f:
            if what != "mem":
                outcome[what] = "token" if token in f.read() else "read, no token"
                continue
            found = False
            for line in open(f"/proc/{{pid}}/maps"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                # unreadable guard pages, vsyscall above any file offset
                with contextlib.suppress(OSError, ValueError, OverflowError):
                    f.seek(start)
                    found = found or token in f.read(end - start)
            outcome[what] = "token" if found else "read, no token"
    except OSError as e:
        outcome[what] = errno.errorcode[e.errno]
libc = ctypes.CDLL(None, use_errno=True)
# PTRACE_ATTACH (16) and PTRACE_SEIZE (0x4206)
for name, request in (("ptrace attach", 16), ("ptrace seize", 0x4206)):
    result = libc.ptrace(ctypes.c_long(request), ctypes.c_long(pid), None, None)
    outcome[name] = "attached" if result == 0 else errno.errorcode[ctypes.get_errno()]
print(json.dumps(outcome))
"""


@pytest.fixture(scope="module", params=["environment", "command line"])
def unprivileged(request, tmp_path_factory):
    nobody = pwd.getpwnam("nobody")
    os.environ.update(
        RUN_AS_UID=str(nobody.pw_uid), RUN_AS_GID=str(nobody.pw_gid), TOKEN_FROM=request.param
    )
    try:
        running = start_server("--pool-size", "1", command=[sys.executable, "-c", WRAPPER])
    finally:
        for name in ("RUN_AS_UID", "RUN_AS_GID", "TOKEN_FROM"):
            del os.environ[name]
    yield running, nobody.pw_uid, request.param
    running.stop()
    shutil.rmtree(running.runtime_dir, ignore_errors=True)


def test_a_kernel_of_a_server_without_root_cannot_read_its_token(unprivileged):
    running, uid, token_from = unprivileged
    pid = running.process.pid
    with open(f"/proc/{pid}/status") as f:
        assert f"\nUid:\t{uid}\t" in f.read()
    # the token reached the server as told (the test reads as root)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read()
    if token_from == "command line":
        assert b"--token\0" + b"*" * len(running.token) + b"\0" in cmdline
    else:
        assert b"--token" not in cmdline
    with running.client() as c:
        model = c.create_kernel()
        try:
            with c.connect(model.id) as k:
                code = "import contextlib\n" + ATTEMPTS.format(pid=pid, token=running.token)
                result = k.execute(code, timeout=120)
                assert result.error is None, result.error
                outcome = json.loads(result.stdout.strip().splitlines()[-1])
                assert int(k.execute("import os; os.getuid()").result_text) == uid
        finally:
            with contextlib.suppress(Exception):
                c.delete_kernel(model.id)
    assert outcome == {
        # non-dumpable: these /proc files are root's now
        "environ": "EACCES",
        "maps": "EACCES",
        "mem": "EACCES",
        # readable by anyone, but the token there is asterisks
        "cmdline": "read, no token",
        # the syscall filter, and the server being non-dumpable behind it
        "ptrace attach": "EPERM",
        "ptrace seize": "EPERM",
    }


def test_the_server_forgets_the_token_variable(unprivileged):
    running, _uid, _token_from = unprivileged
    # as root, the test can still read it: the initial block holds no token
    with open(f"/proc/{running.process.pid}/environ", "rb") as f:
        environ = f.read()
    assert running.token.encode() not in environ
