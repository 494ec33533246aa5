"""The suite passes as a user who is not root (run here as root, as nobody).

A subset of the tests that need no root (``-m "not root"``) runs in a
pytest of its own as the user ``nobody``: servers started by it run in the
non-root mode for real (kernels as the server's user, rlimits only).

The interpreter may live where nobody cannot read (here /root/.pyenv, under
a mode 0700 /root), so a root wrapper first takes a private mount namespace
in which the interpreter, the installed packages and this tree are
reachable (L{expose_to_kernels}, as the nursery does for kernels), then
drops to nobody and runs pytest. Nobody cannot write into the tree, which
is the point: a test that writes there fails.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import _run

ROOT = Path(__file__).resolve().parent.parent

#: Representative and quick: the wire protocol, executing code, stdin,
#: files, the terminal client, the command line's errors and kernel hosts.
SUBSET = [
    "tests/test_protocol_framing.py",
    "tests/test_execute.py",
    "tests/test_stdin.py",
    "tests/test_files.py",
    "tests/test_terminal_run.py",
    "tests/test_terminal_quick.py",
    "tests/test_debugger.py",
    "tests/test_cli.py",
    "tests/test_hygiene.py",
    # A front and two kernel hosts, kernels as the hosts' user: placement,
    # labels, loss and return. (The rest of test_hosts.py is the front's
    # checks of keys and link ids, the same code whoever runs it: the root
    # run covers it; each test starts a cluster of its own, ~30 s here.)
    "tests/test_hosts.py::test_remote_kernels_placement_loss_and_return",
    # /files of kernels on a host, the host's file work as its own user, its
    # path checks included. (Streaming, the quota's count and a lost host
    # do not depend on the uid: the root run covers them.)
    "tests/test_hosts_files.py::test_upload_download_list_and_escapes_on_a_remote_kernel",
]
#: Seconds the subset may take (as a test, beyond pytest's 300 s default:
#: the inner run alone took 246 s in a CI run, and a loaded machine passed
#: 300, which pytest-timeout turned into a stack dump instead of the output).
SUBSET_TIMEOUT = 600

WRAPPER = """
import os, sys
from cellmux.kernel import sandbox
uid, gid, home = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
paths = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)),
         os.getcwd(), *[p for p in sys.path if os.path.isabs(p)]]
for warning in sandbox.expose_to_kernels(paths):
    print(warning, file=sys.stderr)
# expose_to_kernels mounts /proc with hidepid for kernels; the tests read
# their own (non-dumpable, so root-owned) server's /proc entries.
import subprocess
subprocess.run(["mount", "-t", "proc", "proc", "/proc"], check=True)
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
os.execv(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[4:]])
"""


@pytest.mark.timeout(SUBSET_TIMEOUT + 60)
def test_a_subset_of_the_suite_passes_as_nobody():
    nobody = pwd.getpwnam("nobody")
    # nobody's HOME: its own, inside this run's private TMPDIR. Its run makes
    # a private TMPDIR of its own in the system's, as any run does: one nested in
    # ours would make runtime directories too long for kernel link sockets.
    home = tempfile.mkdtemp(prefix="nonroot-")
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    env = {
        **os.environ,
        "HOME": home,
        "TMPDIR": str(_run["system_tmp"]),
        "XDG_STATE_HOME": os.path.join(home, "state"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    try:
        result = _run_as(nobody, home, env)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and " failed" not in output, output[-3000:]


def _run_as(user: pwd.struct_passwd, home: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            WRAPPER,
            str(user.pw_uid),
            str(user.pw_gid),
            home,
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not root",
            *SUBSET,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBSET_TIMEOUT,
    )
