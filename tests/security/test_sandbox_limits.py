"""Each per-kernel limit, hit from inside a real kernel on a server with
small limits: the kernel is stopped and its client told which limit (or,
for the limits that make a call fail instead, the call fails and the
kernel lives); the server and the other kernels keep working."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from cellmux.client import KernelDied
from conftest import start_server

LIMITS = {
    # Above what the memory test's hog spends reaching 1 GiB on a fresh VM
    # (first-touch page faults cost more there: 2 s was hit first once).
    "limit_cpu_seconds": 4,
    "limit_memory_mb": 1024,
    "limit_processes": 64,
    "limit_open_files": 64,
    "limit_file_size_mb": 5,
    "limit_disk_mb": 20,
}
#: A variable of the server's own environment that must not reach kernels.
PROBE = "CELLMUX_TEST_SERVER_SECRET"
PROBE_VALUE = "probe-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    config = tmp_path_factory.mktemp("limits") / "cellmux.toml"
    config.write_text("".join(f"{k} = {v}\n" for k, v in LIMITS.items()))
    os.environ[PROBE] = PROBE_VALUE
    try:
        running = start_server("--config", str(config), "--pool-size", "2", "--preload", "numpy")
    finally:
        del os.environ[PROBE]
    yield running
    running.stop()


@pytest.fixture
def lclient(limited):
    with limited.client() as c:
        yield c


@contextlib.contextmanager
def _kernel(client):
    model = client.create_kernel()
    try:
        with client.connect(model.id) as k:
            yield k
    finally:
        with contextlib.suppress(Exception):
            client.delete_kernel(model.id)


@pytest.fixture
def bystander(lclient):
    with _kernel(lclient) as k:
        yield k


def _value(kernel, code: str, timeout: float = 30):
    result = kernel.execute(code, timeout=timeout)
    assert result.error is None, result.error
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fine(limited, bystander) -> None:
    assert limited.alive()
    assert bystander.execute("6 * 7", timeout=30).result_text == "42"


def _dies_of(lclient, kernel, code: str, limit: str, timeout: float = 60) -> str:
    statuses = []
    kernel.on_status = statuses.append
    with pytest.raises(KernelDied) as info:
        kernel.execute(code, timeout=timeout)
    assert info.value.cause.startswith(limit), info.value.cause
    assert kernel.dead_cause == info.value.cause
    assert "dead" in statuses
    model = lclient.get_kernel(kernel.kernel_id)
    assert model.execution_state == "dead"
    return info.value.cause


def test_cpu_time_limit_ends_the_kernel(limited, lclient, bystander):
    with _kernel(lclient) as k:
        cause = _dies_of(lclient, k, "while True: pass", "cpu time limit")
    assert cause == "cpu time limit (SIGXCPU)"
    _fine(limited, bystander)


def test_cpu_time_limit_holds_when_sigxcpu_is_ignored(limited, lclient, bystander):
    with _kernel(lclient) as k:
        code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
        cause = _dies_of(lclient, k, code, "cpu time limit")
    assert cause == "cpu time limit (SIGKILL)"
    _fine(limited, bystander)


def test_disk_limit_ends_the_kernel_that_fills_its_directories(limited, lclient, bystander):
    # 4 MiB files (under the 5 MiB file size limit) into its directory and
    # its /tmp; the loop stops by itself at 200 MiB should the limit fail.
    code = """
import os, time
block = os.urandom(4 * 2**20)
for i in range(50):
    for d in (".", "/tmp"):
        with open(os.path.join(d, f"fill{i}"), "wb") as f:
            f.write(block)
    time.sleep(0.1)
time.sleep(30)
"""
    with _kernel(lclient) as k:
        cause = _dies_of(lclient, k, code, "disk limit")
    assert cause.startswith("disk limit (")
    _fine(limited, bystander)


def test_file_size_limit_fails_the_write(limited, lclient, bystander):
    with _kernel(lclient) as k:
        outcome = _value(
            k,
            """
import errno, json
try:
    with open("big", "wb") as f:
        f.write(b"x" * (6 * 2**20))
    outcome = "written"
except OSError as e:
    outcome = errno.errorcode[e.errno]
print(json.dumps(outcome))
""",
        )
        assert outcome == "EFBIG"
        assert k.execute("1 + 1").result_text == "2"
    _fine(limited, bystander)


def test_open_files_limit_fails_the_open(limited, lclient, bystander):
    with _kernel(lclient) as k:
        opened, error = _value(
            k,
            """
import errno, json, os
files, error = [], None
try:
    for _ in range(10000):
        files.append(open(os.devnull))
except OSError as e:
    error = errno.errorcode[e.errno]
n = len(files)
for f in files:
    f.close()
print(json.dumps([n, error]))
""",
        )
        assert error == "EMFILE"
        assert 0 < opened < LIMITS["limit_open_files"]
        assert k.execute("1 + 1").result_text == "2"
    _fine(limited, bystander)


def test_process_limit_fails_the_fork(limited, lclient, bystander):
    with _kernel(lclient) as k:
        forked, error = _value(
            k,
            """
import errno, json, os, time
forked, error = 0, None
try:
    for _ in range(1000):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        forked += 1
except OSError as e:
    error = errno.errorcode[e.errno]
print(json.dumps([forked, error]))
""",
        )
        assert error == "EAGAIN"
        assert 0 < forked < LIMITS["limit_processes"]
    _fine(limited, bystander)


def test_memory_limit(limited, lclient, bystander):
    """A kernel whose memory grows past limit_memory_mb is ended and says why.

    Under cgroup v2 memory.max the kernel's cgroup enforces it; elsewhere
    (as here) the nursery watches the resident memory of the kernel's
    session. RLIMIT_AS stays as a backstop at twice the limit, so a single
    absurd allocation still fails at once with MemoryError.
    """
    with _kernel(lclient) as k:
        backstop = _value(
            k, "import json, resource; print(json.dumps(resource.getrlimit(resource.RLIMIT_AS)))"
        )
        limit = LIMITS["limit_memory_mb"] * 2**20
        assert backstop in ([2 * limit, 2 * limit], [-1, -1])
        # Grow steadily (touched pages count; untouched zeroed ones would
        # not), so the once-a-second watch sees it before the backstop.
        code = (
            "import time\nhog = []\n"
            "while True:\n    hog.append(b'x' * (16 * 2**20))\n    time.sleep(0.05)"
        )
        assert _dies_of(lclient, k, code, "memory limit")
    _fine(limited, bystander)


def test_kernel_environment_holds_nothing_of_the_servers(limited, lclient):
    with _kernel(lclient) as k:
        environ = _value(k, "import json, os; print(json.dumps(dict(os.environ)))")
    assert PROBE not in environ
    assert PROBE_VALUE not in json.dumps(environ)
    assert limited.token not in json.dumps(environ)


def test_numpy_and_matplotlib_work_under_the_limits(lclient):
    with _kernel(lclient) as k:
        # --preload still works: numpy was imported by the nursery, as root
        assert k.execute("import sys; 'numpy' in sys.modules").result_text == "True"
        result = k.execute(
            "import numpy, matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
            "plt.plot(numpy.arange(10)); plt.savefig('plot.png'); print(numpy.ones(3).sum())",
            timeout=120,
        )
    assert result.error is None, result.error
    assert result.stdout.strip() == "3.0"
