"""Working directories: a notebook's kernel starts in the notebook's folder,
inside the configured shared root and never outside it."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.server.jupyter.workdirs import (
    WorkingDirError,
    notebook_folder,
    resolve_working_dir,
)
from conftest import start_server

# -- resolving, no server ------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    (tmp_path / "notebooks" / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "notebooks"


def test_without_a_shared_root_nothing_is_honoured(root):
    assert resolve_working_dir(None, {"KERNEL_WORKING_DIR": str(root)}, "sub") is None


def test_relative_and_absolute_paths_inside_the_root(root):
    assert resolve_working_dir(str(root), None, "sub/deeper") == str(root / "sub" / "deeper")
    env = {"KERNEL_WORKING_DIR": str(root / "sub")}
    assert resolve_working_dir(str(root), env, "ignored") == str(root / "sub")
    assert resolve_working_dir(str(root), None, "") is None
    assert resolve_working_dir(str(root), None, "/") == str(root)


def test_a_missing_folder_walks_up_to_one_that_exists_but_not_above_the_root(root):
    assert resolve_working_dir(str(root), None, "sub/not/yet") == str(root / "sub")
    assert resolve_working_dir(str(root), None, "nothing") == str(root)


@pytest.mark.parametrize("path", ["../elsewhere", "sub/../../elsewhere"])
def test_dot_dot_stays_inside_the_root(root, path):
    # As an API path, '..' cannot climb above the root: it ends at the root.
    assert resolve_working_dir(str(root), None, path).startswith(str(root))


def test_paths_outside_the_root_are_refused(root):
    with pytest.raises(WorkingDirError, match="outside the shared root"):
        resolve_working_dir(str(root), {"KERNEL_WORKING_DIR": str(root.parent / "elsewhere")})
    with pytest.raises(WorkingDirError):
        resolve_working_dir(str(root), {"KERNEL_WORKING_DIR": "/etc"})
    # a prefix of the name is not inside
    (root.parent / "notebooks-other").mkdir()
    with pytest.raises(WorkingDirError):
        resolve_working_dir(str(root), {"KERNEL_WORKING_DIR": str(root) + "-other"})


def test_a_symlink_out_of_the_root_is_refused(root):
    os.symlink(root.parent / "elsewhere", root / "escape")
    with pytest.raises(WorkingDirError):
        resolve_working_dir(str(root), None, "escape")


@pytest.fixture(scope="module")
def fixed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    (root / "a" / "b").mkdir(parents=True)
    os.symlink("/etc", root / "a" / "out")
    return str(root)


@given(st.text(alphabet="ab./\\~out-", max_size=30), st.booleans())
def test_whatever_is_asked_the_answer_is_inside_the_root_or_refused(fixed_root, path, as_env):
    env = {"KERNEL_WORKING_DIR": path} if as_env else None
    try:
        found = resolve_working_dir(fixed_root, env, None if as_env else path)
    except WorkingDirError:
        assert as_env or "out" in path  # API paths escape only through the symlink
        return
    assert found is None or found == fixed_root or found.startswith(fixed_root + os.sep)
    if found is not None:
        assert os.path.isdir(found)


def test_a_notebooks_folder():
    assert notebook_folder("sub/deeper/nb.ipynb") == "sub/deeper"
    assert notebook_folder("nb.ipynb") == ""


# -- on a real server -------------------------------------------------------------


def _api(server, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.url.rstrip("/") + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _shared_server(tmp_path, writable: bool):
    notebooks = tmp_path / "notebooks"
    (notebooks / "project").mkdir(parents=True)
    (notebooks / "project" / "data.txt").write_text("numbers: 1 2 3\n")
    (notebooks / "project" / "helper.py").write_text("GREETING = 'from the notebook folder'\n")
    # kernels run under their own uids: the folder is theirs to write in
    # when the server lets them
    os.chmod(notebooks / "project", 0o777)
    config = tmp_path / "cellmux.toml"
    config.write_text(
        f"shared_root = {str(notebooks)!r}\n"
        f"shared_root_writable = {'true' if writable else 'false'}\npool_size = 1\n"
    )
    return notebooks, start_server("--config", str(config))


CHECK = (
    "import os, helper\n"
    "print(os.getcwd()); print(open('data.txt').read().strip()); print(helper.GREETING)\n"
    "print(os.environ['HOME'] != os.getcwd())"
)


def test_kernel_working_dir_is_honoured_read_only_by_default(tmp_path):
    notebooks, server = _shared_server(tmp_path, writable=False)
    folder = str(notebooks / "project")
    try:
        # what a Jupyter Server with --gateway-url sends
        status, model = _api(
            server,
            "POST",
            "/api/kernels",
            {"name": "python3", "env": {"KERNEL_WORKING_DIR": folder}},
        )
        assert status == 201, model
        with server.client() as client, client.connect(model["id"]) as kernel:
            result = kernel.execute(CHECK)
            assert result.error is None, result.error
            out = result.stdout.splitlines()
            assert out == [folder, "numbers: 1 2 3", "from the notebook folder", "True"]
            result = kernel.execute("open('new.txt', 'w')")
            if os.geteuid() == 0:  # the read-only bind needs a mount namespace
                assert result.error is not None and "Read-only file system" in result.error.evalue
                assert not (notebooks / "project" / "new.txt").exists()
            # a restart starts in the same folder
            client.restart_kernel(model["id"])
            assert kernel.execute("import os; os.getcwd()").result_text == repr(folder)
            client.delete_kernel(model["id"])
        # a folder outside the shared root is refused, with the reason
        status, error = _api(
            server, "POST", "/api/kernels", {"env": {"KERNEL_WORKING_DIR": str(tmp_path)}}
        )
        assert status == 400
        assert "outside the shared root" in error["message"]
    finally:
        server.stop()


def test_a_sessions_notebook_folder_and_a_writable_root(tmp_path):
    notebooks, server = _shared_server(tmp_path, writable=True)
    try:
        status, session = _api(
            server,
            "POST",
            "/api/sessions",
            {"path": "project/analysis.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
        )
        assert status == 201, session
        kernel_id = session["kernel"]["id"]
        with server.client() as client, client.connect(kernel_id) as kernel:
            out = kernel.execute(CHECK).stdout.splitlines()
            assert out[:3] == [
                str(notebooks / "project"),
                "numbers: 1 2 3",
                "from the notebook folder",
            ]
            kernel.execute("open('result.txt', 'w').write('written by the kernel')")
        assert (notebooks / "project" / "result.txt").read_text() == "written by the kernel"
        assert _api(server, "DELETE", f"/api/sessions/{session['id']}")[0] == 204
    finally:
        server.stop()
