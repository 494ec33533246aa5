"""Debian packages the tests need, installed with apt-get when missing.

CI starts from a bare machine, so a fixture that needs Chromium, PostgreSQL,
HAProxy, R or ``ip`` installs it the first time; one lock keeps two fixtures
from running apt-get at once (dpkg's own lock would fail the second): a
thread lock within a process, and a file lock in the run's directory
(conftest.py sets it for its workers) between the run's workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import threading
from collections.abc import Callable, Iterator

from conftest import APT_LOCK_FILE, RUN_DIR_VARIABLE

_LOCK = threading.Lock()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    run_dir = os.environ.get(RUN_DIR_VARIABLE)
    with _LOCK:
        if run_dir is None:
            yield
            return
        with open(os.path.join(run_dir, APT_LOCK_FILE), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield


def ensure(package: str, find: Callable[[], str | None]) -> str:
    """What C{find} finds, after installing C{package} if it found nothing."""
    with _locked():
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
