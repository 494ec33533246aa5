"""A server whose user cannot write its HOME leaves nothing in the
temporary directory.

IPython (imported for the installed kernelspecs, and by the nursery and its
kernels) falls back to ``tempfile.mkdtemp()`` for its directory when
``~/.ipython`` cannot be made, and never removes it: one empty ``tmpXXXX``
per start. The server gives it a directory under its runtime directory
instead (``IPYTHONDIR``), unless the user set one.

Root cannot be refused a write, so as root the server runs as ``nobody``
(a small root wrapper makes the interpreter reachable for it in a private
mount namespace, then drops to nobody); as another user it runs as that
user, with a read-only HOME.
"""

from __future__ import annotations

import os
import pwd
import sys

from conftest import start_server

DROP_TO_NOBODY = """
import os, sys
from cellmux.kernel import sandbox
uid, gid = int(os.environ.pop("DROP_UID")), int(os.environ.pop("DROP_GID"))
base = os.path.dirname(sys.argv[sys.argv.index("--runtime-dir") + 1])
os.chown(base, uid, gid)
paths = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), base,
         os.environ["HOME"], os.environ["TMPDIR"], *[p for p in sys.path if os.path.isabs(p)]]
sandbox.expose_to_kernels(paths)
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
os.execv(sys.executable, [sys.executable, "-m", "cellmux", "serve", *sys.argv[1:]])
"""


def test_a_server_that_cannot_write_its_home_leaves_no_temporary_directory(tmp_path) -> None:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    os.chmod(home, 0o555)  # nobody (and a non-root user) may not write it
    os.chmod(tmp, 0o1777)
    os.chmod(tmp_path, 0o755)
    env = {"HOME": str(home), "TMPDIR": str(tmp)}
    command = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        env.update(DROP_UID=str(nobody.pw_uid), DROP_GID=str(nobody.pw_gid))
        command = [sys.executable, "-c", DROP_TO_NOBODY]
    saved = os.environ.pop("IPYTHONDIR", None)
    try:
        server = start_server("--pool-size", "1", command=command, env=env)
    finally:
        if saved is not None:
            os.environ["IPYTHONDIR"] = saved
    try:
        with server.client() as client:
            # Kernelspecs are read again on demand: that too.
            assert "python3" in client.kernel_specs()
            kernel = client.create_kernel()
            with client.connect(kernel.id) as k:
                result = k.execute("import IPython; print(IPython.paths.get_ipython_dir())")
                assert result.error is None, result.error
                # The kernel's own, in its working directory (HOME there).
                assert result.stdout.strip().endswith("/.ipython"), result.stdout
            client.delete_kernel(kernel.id)
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert sorted(os.listdir(tmp)) == [], server.log()[-3000:]
    assert sorted(os.listdir(home)) == []
