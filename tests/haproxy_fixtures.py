"""A real HAProxy running docs/haproxy.cfg, for the several-fronts tests.

Debian's ``haproxy`` package is installed with apt-get when it is missing,
as db_fixtures installs PostgreSQL. The committed config is used as it is:
its addresses come from the environment (``CELLMUX_PROXY_BIND``,
``CELLMUX_FRONT_F1``, ``CELLMUX_FRONT_F2``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import attrs

import apt_packages

#: The committed config the tests run.
CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "haproxy.cfg")


def _haproxy_binary() -> str | None:
    found = shutil.which("haproxy")
    if found is None and os.path.exists("/usr/sbin/haproxy"):
        found = "/usr/sbin/haproxy"  # off a non-root user's PATH
    return found


def ensure_haproxy() -> str:
    """The haproxy binary, installing Debian's package if needed."""
    return apt_packages.ensure("haproxy", _haproxy_binary)


@attrs.define
class HAProxy:
    """One haproxy process in the foreground, listening on C{port}."""

    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, port: int, fronts: dict[str, str], config: str = CONFIG) -> HAProxy:
        """Run C{config} with C{fronts} (``{"F1": "127.0.0.1:PORT", …}``)."""
        binary = ensure_haproxy()
        env = {
            **os.environ,
            "CELLMUX_PROXY_BIND": f"127.0.0.1:{port}",
            **{f"CELLMUX_FRONT_{name}": address for name, address in fronts.items()},
        }
        # -db: stay in the foreground, no daemon; -W: master-worker (a clean
        # stop on SIGTERM ends the worker too).
        process = subprocess.Popen(
            [binary, "-db", "-W", "-f", config],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proxy = cls(process, port)
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proxy
            except OSError:
                if time.monotonic() > deadline:
                    proxy.stop()
                    raise RuntimeError("haproxy did not listen in time") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
