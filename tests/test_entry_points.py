"""Both ways of starting the server: ``cellmux serve`` and ``twistd -n cellmux``."""

from __future__ import annotations

import shutil
import sys

from conftest import start_server


def _run_something(server) -> None:
    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            assert k.execute("print('up')").stdout == "up\n"


def test_cellmux_serve_command():
    server = start_server("--pool-size", "1", command=[sys.executable, "-m", "cellmux", "serve"])
    try:
        _run_something(server)
    finally:
        assert server.stop() == 0


def test_twistd_plugin():
    twistd = shutil.which("twistd", path=sys.prefix + "/bin") or shutil.which("twistd")
    server = start_server("--pool-size", "1", command=[twistd, "-n", "--pidfile=", "cellmux"])
    try:
        _run_something(server)
        # twistd logs to stdout; the token may appear only in the URL line.
        lines_with_token = [line for line in server.stdout_lines if server.token in line]
        assert len(lines_with_token) == 1
        assert "cellmux is serving at" in lines_with_token[0]
    finally:
        server.stop()
