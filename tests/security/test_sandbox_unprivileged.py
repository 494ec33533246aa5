"""A server that does not run as root: kernels run as its user with
rlimits only, and the server says at start that they are not isolated.

The test runs the server as ``nobody``. The interpreter may live where
nobody cannot read (here /root/.pyenv, under a mode 0700 /root), so a small
root wrapper first gives itself a private mount namespace in which the
interpreter is reachable (the same L{expose_to_kernels} the nursery uses for
kernels), then drops to nobody and execs ``cellmux serve``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import sys

import pytest

from cellmux.client import KernelDied
from conftest import start_server

WRAPPER = """
import os, sys
from cellmux.kernel import sandbox
uid, gid = int(os.environ.pop("RUN_AS_UID")), int(os.environ.pop("RUN_AS_GID"))
base = os.path.dirname(sys.argv[sys.argv.index("--runtime-dir") + 1])
os.chown(base, uid, gid)
config = os.path.dirname(sys.argv[sys.argv.index("--config") + 1])
paths = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), base,
         config, os.getcwd(), *[p for p in sys.path if os.path.isabs(p)]]
sandbox.expose_to_kernels(paths)
os.environ["HOME"] = base
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
os.execv(sys.executable, [sys.executable, "-m", "cellmux", "serve", *sys.argv[1:]])
"""


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory):
    nobody = pwd.getpwnam("nobody")
    config = tmp_path_factory.mktemp("unprivileged") / "cellmux.toml"
    config.write_text("limit_cpu_seconds = 2\n")
    os.chmod(config.parent, 0o755)
    os.environ["RUN_AS_UID"] = str(nobody.pw_uid)
    os.environ["RUN_AS_GID"] = str(nobody.pw_gid)
    try:
        running = start_server(
            "--config", str(config), "--pool-size", "1", command=[sys.executable, "-c", WRAPPER]
        )
    finally:
        del os.environ["RUN_AS_UID"], os.environ["RUN_AS_GID"]
    yield running, nobody.pw_uid
    running.stop()


def test_server_warns_that_kernels_are_not_isolated(unprivileged):
    running, uid = unprivileged
    with open(f"/proc/{running.process.pid}/status") as f:
        assert f"\nUid:\t{uid}\t" in f.read()
    assert "kernels run as its own user" in running.log()
    assert "NOT isolated from each other" in running.log()


def test_kernels_run_as_the_servers_user_with_rlimits(unprivileged):
    running, uid = unprivileged
    with running.client() as c:
        model = c.create_kernel()
        try:
            with c.connect(model.id) as k:
                result = k.execute(
                    "import json, os, resource\nprint(json.dumps([os.getuid(), "
                    "[resource.getrlimit(getattr(resource, 'RLIMIT_' + n)) for n in "
                    "('CPU', 'AS', 'NOFILE', 'FSIZE', 'CORE')]]))"
                )
                assert result.error is None, result.error
                kernel_uid, limits = json.loads(result.stdout)
                assert kernel_uid == uid
                assert limits == [
                    [2, 4],
                    # the backstop behind the resident-memory watch: 2 x 4096 MiB
                    [2 * 4096 * 2**20] * 2,
                    [1024, 1024],
                    [1024 * 2**20] * 2,
                    [0, 0],
                ]
                with pytest.raises(KernelDied) as info:
                    k.execute("while True: pass", timeout=60)
                assert info.value.cause == "cpu time limit (SIGXCPU)"
        finally:
            with contextlib.suppress(Exception):
                c.delete_kernel(model.id)
    assert running.alive()
