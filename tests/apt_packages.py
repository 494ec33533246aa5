"""Debian packages the tests need, installed with apt-get when missing.

CI starts from a bare machine, so a fixture that needs Chromium, PostgreSQL,
HAProxy, R or ``ip`` installs it the first time; one lock keeps two fixtures
from running apt-get at once (dpkg's own lock would fail the second).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable

_LOCK = threading.Lock()


def ensure(package: str, find: Callable[[], str | None]) -> str:
    """What C{find} finds, after installing C{package} if it found nothing."""
    with _LOCK:
        found = find()
        if found:
            return found
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # stderr is left to pytest: a failed install shows apt's reason.
        for command in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", package],
        ):
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        found = find()
        if not found:
            raise RuntimeError(f"apt-get installed {package}, but it is still not found")
        return found
