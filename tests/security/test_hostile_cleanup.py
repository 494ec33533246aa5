"""What a hostile kernel leaves, or finds, never takes the nursery down.

- A tree thousands of levels deep (shutil.rmtree raised RecursionError,
  which ended the nursery and every kernel) and a wide one: the nursery
  lives, other kernels keep working, the trees go, and the server stops
  and starts again cleanly.
- The server's working directory: the nursery runs isolated in /, so a
  module planted there is not imported by root's nursery, and kernels do
  not see the directory (it was on sys.path, so bound into their /tmp or
  exposed through a 0700 home).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

import pytest

from cellmux.cleanup import remove_tree
from cellmux.client import Client
from conftest import URL_LINE, start_server, wait_for

DEPTH = 1600
WIDTH = 5000

HOSTILE_TREE = f"""
import json, os
top = os.getcwd()
os.mkdir("wide")
for i in range({WIDTH}):
    open(f"wide/{{i}}", "w").close()
for _ in range({DEPTH}):
    os.mkdir("d")
    os.chdir("d")
open("bottom", "w").write("x")
os.chdir(top)
print(json.dumps(top))
"""


def _value(kernel, code: str, timeout: float = 120):
    result = kernel.execute(code, timeout=timeout)
    assert result.error is None, result.error
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def no_deep_leftovers(tmp_path):
    """pytest removes old temporary directories with shutil.rmtree, which a
    deep tree breaks (for every later run): whatever happens, remove them."""
    yield
    for name in os.listdir(tmp_path):
        remove_tree(tmp_path / name)


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.stop()
        remove_tree(server.runtime_dir)


def test_a_deep_and_wide_tree_does_not_take_the_nursery_down(servers):
    server = start_server("--pool-size", "0")
    servers.append(server)
    runtime = os.path.join(server.runtime_dir, "rt")
    nursery = server.nursery_pid()
    assert nursery, "the server has no nursery"
    with server.client() as client:
        other = client.create_kernel()
        hostile = client.create_kernel()
        with client.connect(hostile.id) as k:
            workdir = _value(k, HOSTILE_TREE)
        client.delete_kernel(hostile.id)
        with client.connect(other.id) as k:
            assert k.execute("6 * 7", timeout=30).result_text == "42"
            # The tree goes while kernels keep working.
            wait_for(lambda: not os.path.exists(workdir), timeout=60, interval=0.2)
            assert k.execute("6 * 8", timeout=30).result_text == "48"
        assert client.get_kernel(other.id).execution_state != "dead"
        fresh = client.create_kernel()
        with client.connect(fresh.id) as k:
            assert k.execute("6 * 9", timeout=30).result_text == "54"
    assert server.nursery_pid() == nursery
    log = server.log()
    assert "nursery lost" not in log and "nursery ended" not in log, log[-3000:]
    # The server stops cleanly with a hostile tree left in a kernel's directory
    # (one made while it runs), and starts again on the same runtime directory.
    with server.client() as client:
        last = client.create_kernel()
        with client.connect(last.id) as k:
            _value(k, HOSTILE_TREE)
    assert server.stop() == 0
    again = start_server("--pool-size", "0", "--runtime-dir", runtime)
    servers.append(again)
    with again.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            assert k.execute("6 * 7", timeout=30).result_text == "42"


def test_a_server_that_made_its_runtime_directory_removes_it_with_a_deep_tree(tmp_path, request):
    # No --runtime-dir: the server makes one under TMPDIR and removes it when
    # it stops, after the nursery (which may stop before its helper is done).
    # Short: socket paths under it must fit in 108 bytes.
    temp = pathlib.Path(tempfile.mkdtemp(prefix="cmx-"))
    request.addfinalizer(lambda: remove_tree(temp))
    argv = [sys.executable, "-m", "cellmux", "serve", "--port", "0", "--pool-size", "0"]
    argv += ["--token", "t" * 32, "--state-dir", str(tmp_path / "state")]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "TMPDIR": str(temp)}
    )
    try:
        line = process.stdout.readline()
        started = URL_LINE.search(line)
        assert started, (tmp_path / "server.log").read_text(errors="replace")[-3000:]
        url = started.group("url")
        with Client(url, token="t" * 32) as client:
            model = client.create_kernel()
            with client.connect(model.id) as k:
                workdir = _value(k, HOSTILE_TREE)
        assert workdir.startswith(str(temp))
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        process.stdout.close()
    text = (tmp_path / "server.log").read_text(errors="replace")
    assert os.listdir(temp) == [], text[-3000:]
    # (server/files.py's scan of the kernel's files after each cell still
    # logs a RecursionError from os.walk on such a tree: not about removal)
    assert "rmtree" not in text and "could not remove" not in text, text[-3000:]


PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
raise ImportError("planted")
"""


@pytest.mark.parametrize("plant", [True, False], ids=["planted-module", "log-only"])
def test_the_servers_working_directory_is_neither_imported_nor_shown(servers, tmp_path, plant):
    # A 0700 home holding the server's working directory, as with /root.
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    cwd = home / "work"
    cwd.mkdir(mode=0o755)
    marker = tmp_path / "planted-module-ran"
    if plant:
        (cwd / "attrs.py").write_text(PLANTED.format(marker=str(marker)))
    (cwd / "server.log").write_text("token=secret")
    os.chmod(cwd / "server.log", 0o644)
    # The server itself is started with -P: what is tested is its nursery.
    server = start_server(
        "--pool-size", "1", command=[sys.executable, "-P", "-m", "cellmux", "serve"], cwd=cwd
    )
    servers.append(server)
    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            seen = _value(
                k,
                f"""
import json, os, sys
out = {{"path": [p for p in sys.path if p.startswith({str(tmp_path)!r})]}}
for name, probe in [("list", lambda: os.listdir({str(cwd)!r})),
                    ("read", lambda: open({str(cwd / "server.log")!r}).read())]:
    try:
        out[name] = probe()
    except OSError as e:
        out[name] = type(e).__name__
import attrs
out["attrs"] = attrs.__file__
print(json.dumps(out))
""",
            )
    assert seen["path"] == []
    assert seen["list"] in ("FileNotFoundError", "PermissionError")
    assert seen["read"] in ("FileNotFoundError", "PermissionError")
    assert not seen["attrs"].startswith(str(tmp_path))
    assert not marker.exists()


def test_a_server_run_from_a_source_tree_still_starts_kernels(servers, monkeypatch):
    # cellmux imported from PYTHONPATH, not from the interpreter: the nursery
    # (isolated, so PYTHONPATH unused) is told where the package is.
    import cellmux

    source = os.path.dirname(os.path.dirname(os.path.abspath(cellmux.__file__)))
    tree = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "src")
    tree = os.path.realpath(tree)
    assert source != tree  # the tests use the installed package
    monkeypatch.setenv("PYTHONPATH", tree)
    server = start_server("--pool-size", "0")
    servers.append(server)
    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            where = _value(k, "import cellmux, json; print(json.dumps(cellmux.__file__))")
    assert where.startswith(tree + os.sep)
