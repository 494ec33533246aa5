"""Fixtures that start real cellmux servers (real nursery, real kernels),
and the rules every run keeps.

What a run leaves behind: nothing. The whole run works in a private
temporary directory (``TMPDIR``, so servers, kernels and pytest's
``tmp_path`` use it too) that is removed at the end; an entry a test left
in it, a server still running, and, where ``CI`` is set (only there is no
one else's run at work), any new entry in the system temp dir (whatever
its name: IPython's ``tmpXXXX`` fallback made one per server start) or a
change to the source tree's ``git status`` fail the run. ``CELLMUX_TEST_KEEP_TMP=1`` keeps the
directory to look at.

Workers (tox runs the suite on pytest-xdist's workers, a file at a time):
each worker is a run of its own as above, with a private directory of its
own beside the main process's; the main process alone checks the system
temp dir and the tree, after every worker has ended, and its directory
holds what the workers share (the apt-get lock, tests/apt_packages.py).

Root: tests that need it (their own uids, namespaces, cgroups, apt-get
installs) are marked ``root`` (``ROOT_ONLY`` and ``ROOT_ONLY_TESTS`` name
those that need it in modules that do not say so) and fail at once without it; as another user run
``pytest -m "not root"``. tests/test_nonroot.py does that, as root, for a
subset, as the user nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import attrs
import pytest
from hypothesis import HealthCheck, settings

from cellmux.client import Client

#: Modules whose every test needs root (marked ``root`` at collection).
ROOT_ONLY = {
    "test_sandbox_isolation.py",  # kernels' own uids, namespaces
    "test_sandbox_limits.py",  # cgroups, RLIMIT_NPROC per uid
    "test_sandbox_unprivileged.py",  # drops from root to nobody
    "test_nonroot.py",  # likewise
    "test_browser.py",  # apt-get installs Chromium
    "test_tls_browser.py",  # likewise
    "test_browser_busy.py",  # likewise
    "test_jupyterlab.py",  # likewise (the browser fixture)
    "test_widgets_browser.py",  # likewise
    "test_browser_reload.py",  # likewise
    "test_public_browser.py",  # likewise
    "test_browser_kernel_picker.py",  # likewise
    "test_fronts_browser.py",  # likewise
    "test_store_postgres.py",  # apt-get installs PostgreSQL, runs it as postgres
    "test_other_kernels_r.py",  # apt-get installs R and IRkernel
    "test_link_isolation.py",  # kernels' own uids, setresuid
    "test_token_unprivileged.py",  # drops from root to nobody
    "test_seccomp.py",  # probes kernels sandboxed as root, setresuid
    "test_disk_full.py",  # mounts tmpfs
    "test_nursery_leftovers.py",  # sweeps kernel uids
    "test_records_nursery.py",  # escaped subprocesses found by kernel uid
    "test_records_restart.py",  # likewise
    "test_records_soak.py",  # likewise
    "test_hostile_cleanup.py",  # the sandbox hides the server's cwd
    "test_link_descriptors.py",  # reads the (non-dumpable) server's /proc/PID/fd
    "test_netns_harness.py",  # network namespaces, veths, setns
    "test_netns_fronts.py",  # likewise, and apt-get installs HAProxy
    "test_netns_scaling.py",  # likewise, and PostgreSQL
}
#: Single tests that need root in modules that otherwise do not.
ROOT_ONLY_TESTS = {
    "test_a_server_leading_its_session_runs_first_and_its_kernels_do_not",  # CAP_SYS_NICE
    "test_kill_all_of_reaches_processes_that_left_the_group",  # setresuid
    "test_a_tree_that_cannot_be_removed_is_moved_out_of_reach",  # chown, mounts
    "test_a_tree_that_can_neither_be_removed_nor_moved_says_so",  # likewise
    "test_as_root_what_escaped_a_kernels_session_is_found_by_its_uid",  # kernel uids
    "test_a_directory_of_another_user_is_left_out",  # chown
    "test_a_uid_held_here_cannot_be_held_from_another_network_namespace",  # unshare
    "test_fronts_and_hosts_work_with_exactly_the_manifests_privileges",  # setpriv, mounts
    "test_ksm_merges_what_kernels_have_alike_and_their_private_memory_falls",  # /sys/kernel/mm/ksm
}
#: The run's private temporary directory's name starts with this. Short:
#: runtime directories under it (tmp_path's too) must leave room for kernel
#: link sockets (107 bytes a path); with pytest's basetemp named "p" below
#: it, tmp_path is shorter than pytest's own /tmp/pytest-of-USER/pytest-N.
SUITE_TMP_PREFIX = "cmx-"

URL_LINE = re.compile(r"cellmux is serving at (?P<url>\S+)\?token=(?P<token>\S+)")
START_TIMEOUT = 60


@attrs.define
class RunningServer:
    """A cellmux server process started by a test."""

    process: subprocess.Popen
    url: str
    token: str
    runtime_dir: str
    log_path: str
    stdout_lines: list[str]

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token=self.token if token is None else token)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.process.poll() is None

    def nursery_pid(self) -> int | None:
        """The pid of this server's nursery (its child running the nursery), if any."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.process.pid and b"cellmux.kernel.nursery" in cmdline:
                return int(entry)
        return None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start_server(
    *args: str,
    command: list[str] | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> RunningServer:
    """Start ``cellmux serve --port 0`` and wait for its URL line; C{env}:
    variables to set for it beyond the test's own."""
    runtime_dir = tempfile.mkdtemp(prefix="cellmux-test-")
    _started.append(runtime_dir)
    token = secrets.token_hex(16)
    log_path = os.path.join(runtime_dir, "server.log")
    if command is None:
        command = [sys.executable, "-m", "cellmux", "serve"]
    argv = [
        *command,
        "--port",
        "0",
        "--token",
        token,
        "--runtime-dir",
        os.path.join(runtime_dir, "rt"),
        *([] if "--state-dir" in args else ["--state-dir", os.path.join(runtime_dir, "state")]),
        *args,
    ]
    log = open(log_path, "wb")  # noqa: SIM115 - the process owns it until it ends
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
    )
    log.close()  # the child has its own copy
    _processes.append(process)
    lines: list[str] = []
    found = threading.Event()
    result: dict[str, str] = {}

    def read_stdout() -> None:
        for line in process.stdout:
            lines.append(line)
            match = URL_LINE.search(line)
            if match and not found.is_set():
                result.update(match.groupdict())
                found.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while not found.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"server did not start: {f.read()[-3000:]}")
    return RunningServer(process, result["url"], result["token"], runtime_dir, log_path, lines)


def config_file(text: str) -> str:
    """A TOML config file holding C{text}, removed at the end of the run."""
    directory = tempfile.mkdtemp(prefix="cellmux-config-")
    _started.append(directory)
    path = os.path.join(directory, "cellmux.toml")
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until predicate() is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """One server shared by the tests that do not need their own."""
    running = start_server("--pool-size", "3", "--max-kernels", "120")
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def kernel(client: Client):
    """A fresh kernel, attached; shut down afterwards."""
    model = client.create_kernel()
    with client.connect(model.id) as k:
        yield k
    with contextlib.suppress(Exception):
        client.delete_kernel(model.id)


@pytest.fixture(scope="session")
def kernel_venv(tmp_path_factory) -> str:
    """A venv with what kernels need and a tiny local package, and no
    cellmux: its python (tests/test_kernel_python.py, test_jupyterlab.py;
    made once a run, it takes a pip install)."""
    from cellmux.server.kernelpython import INSTALL

    root = tmp_path_factory.mktemp("kernel-env")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    package = root / "onlyinkernels"
    (package / "onlyinkernels").mkdir(parents=True)
    (package / "onlyinkernels" / "__init__.py").write_text("ANSWER = 'from the kernel venv'\n")
    (package / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["setuptools"]\n'
        'build-backend = "setuptools.build_meta"\n'
        "[project]\n"
        'name = "onlyinkernels"\n'
        'version = "1.0"\n'
    )
    python = str(venv / "bin" / "python")
    # Not the server's PYTHONPATH (a dev tree): the kernel venv stands alone.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [python, "-m", "pip", "install", "-q", *INSTALL.split(), str(package)],
        check=True,
        capture_output=True,
        env=env,
    )
    return python


# Kernel processes share these two cores with hypothesis: a slow draw is
# load, not a slow strategy, so neither the deadline nor that check apply.
settings.register_profile("cellmux", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cellmux")


def run_async(coro):
    """asyncio.run() in a thread of its own.

    The main thread may already hold an event loop that other tests started
    (Playwright's sync API keeps one for the whole session), and asyncio.run
    refuses to nest.
    """
    outcome: dict[str, object] = {}

    def main() -> None:
        try:
            outcome["value"] = asyncio.run(coro)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=main, name="run_async")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# -- the browser (tests/test_browser.py, test_jupyterlab.py, security/) ------
#
# One Chromium for the whole run, here so that every module shares it: a
# second sync_playwright() in the same thread refuses to start while the
# first one's loop runs.

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when it is missing."""
    # Imported here: test_hygiene runs this conftest.py alone, without the
    # helper modules beside it.
    import apt_packages

    return apt_packages.ensure("chromium", lambda: CHROMIUM if os.path.exists(CHROMIUM) else None)


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory):
    """Where the browser tests save their screenshots: a temporary directory,
    or docs/screenshots with CELLMUX_SCREENSHOTS=1 (tox -e screenshots)."""
    if os.environ.get("CELLMUX_SCREENSHOTS") == "1":
        docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
        target = os.path.join(docs, "screenshots")
        os.makedirs(target, exist_ok=True)
        from pathlib import Path

        return Path(target)
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="session")
def browser(chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


# --- What a run leaves behind -------------------------------------------------

#: Every start_server() base directory and process of this run.
_started: list[str] = []
_processes: list[subprocess.Popen] = []
_run: dict[str, object] = {}


#: Set by the main process for its workers: the system's temp dir, and the
#: main process's private directory (what the workers share).
SYSTEM_TMP_VARIABLE = "CELLMUX_TEST_SYSTEM_TMP"
RUN_DIR_VARIABLE = "CELLMUX_TEST_RUN_DIR"
#: The file in that directory the workers lock around apt-get
#: (tests/apt_packages.py).
APT_LOCK_FILE = "apt.lock"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "root: needs root (kernels' own uids, namespaces, cgroups, apt-get installs); "
        'as another user, deselect with -m "not root"',
    )
    worker = hasattr(config, "workerinput")  # a pytest-xdist worker
    # A worker inherits the main process's TMPDIR, its private directory.
    system_tmp = os.environ[SYSTEM_TMP_VARIABLE] if worker else tempfile.gettempdir()
    private = tempfile.mkdtemp(prefix=SUITE_TMP_PREFIX, dir=system_tmp)
    # Others may pass through (kernels' uids, the unprivileged server's
    # nobody), not list it.
    os.chmod(private, 0o711)
    _run.update(
        private=private,
        system_tmp=system_tmp,
        worker=worker,
        before=set(_entries(system_tmp)),
        started_at=time.time(),
        tree=_tree_status() if os.environ.get("CI") and not worker else None,
    )
    if not worker:
        os.environ[SYSTEM_TMP_VARIABLE] = system_tmp
        os.environ[RUN_DIR_VARIABLE] = private
    os.environ["TMPDIR"] = private
    tempfile.tempdir = None  # recomputed from TMPDIR
    if config.option.basetemp is None or worker:
        # Also keeps pytest from pruning "old" numbered dirs in the shared
        # /tmp/pytest-of-USER, which may be another run's, still in use. A
        # worker's too (xdist's default is one in the main process's).
        config.option.basetemp = os.path.join(private, "p")


def _tree_status() -> str | None:
    """``git status --porcelain`` of the source tree (None outside a checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(
            ["git", "-C", root, "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _entries(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _new_entries(directory: str, before: set[str], since: float, own: str) -> list[str]:
    """Entries of C{directory} this run made and left (with owner and
    kind, to say whose they are): not there C{before}, not the run's own
    C{own}, and not older than the run (an older entry that was moved or
    briefly missing is not ours)."""
    found = []
    for name in sorted(set(_entries(directory)) - before - {own}):
        try:
            st = os.lstat(os.path.join(directory, name))
        except OSError:
            continue  # gone by now: nothing left
        if st.st_mtime < since and st.st_ctime < since:
            continue
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        found.append(f"{name} ({kind}, uid {st.st_uid})")
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in ROOT_ONLY or item.originalname in ROOT_ONLY_TESTS:
            item.add_marker(pytest.mark.root)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail('needs root: run as root, or deselect it with -m "not root"', pytrace=False)


def _stop_leftover_servers() -> list[str]:
    """End every server a test left running; their names, for the report."""
    left = []
    for process in _processes:
        if process.poll() is None:
            left.append(" ".join(process.args[:6]) + " ...")
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return left


def _live_children() -> list[str]:
    """Processes (not zombies) whose parent is this one."""
    found = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[1] == me and fields[0] != "Z":
            found.append(f"{pid}: {cmdline[:120]}")
    return found


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """A worker ended: keep what it found left behind, for the report."""
    found = getattr(node, "workeroutput", {}).get("left_behind", [])
    _worker_problems.extend(f"{node.gateway.id}: {problem}" for problem in found)


#: What the workers found left behind (the main process reports it).
_worker_problems: list[str] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    private = _run.get("private")
    if not isinstance(private, str):
        return
    problems = list(_worker_problems)
    left = _stop_leftover_servers()
    if left:
        problems.append(f"servers still running (now stopped): {left}")
    for runtime_dir in _started:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    children = _live_children()
    if children:
        problems.append(f"processes still running: {children}")
    basetemp = session.config.option.basetemp
    ours = {str(basetemp), os.path.join(private, APT_LOCK_FILE)}
    leftovers = sorted(
        name for name in os.listdir(private) if os.path.join(private, name) not in ours
    )
    if leftovers:
        problems.append(f"left in the temporary directory {private}: {leftovers}")
    if os.environ.get("CI") and not _run["worker"]:
        # The whole listing, not only cellmux-* names: what a server's
        # libraries make there counts too (CI runs nothing else beside us).
        system_tmp = str(_run["system_tmp"])
        before, since = _run["before"], _run["started_at"]
        assert isinstance(before, set) and isinstance(since, float)
        new = _new_entries(system_tmp, before, since - 1.0, os.path.basename(private))
        if new:
            problems.append(f"left in {system_tmp}: {new}")
        if _run["tree"] is not None and _tree_status() != _run["tree"]:
            problems.append(f"changed the source tree (git status):\n{_tree_status()}")
    if os.environ.get("CELLMUX_TEST_KEEP_TMP"):
        print(f"\nthe run's temporary directory is kept: {private}")
    else:
        shutil.rmtree(private, ignore_errors=True)
    if problems and _run["worker"]:
        # A worker's exit status is not the run's: the main process reports.
        session.config.workeroutput["left_behind"] = problems  # type: ignore[attr-defined]
    elif problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            message = f"the test run left something behind: {problem}"
            if reporter is not None:
                reporter.write_line(message, red=True, bold=True)
            else:
                print(message, file=sys.stderr)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
