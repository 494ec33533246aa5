"""Kernels on an interpreter of their own (``kernel_python``): a second
virtual environment, with a package that only it has."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from conftest import start_server


def _write_config(tmp_path, text: str) -> str:
    path = tmp_path / "cellmux.toml"
    path.write_text(text)
    return str(path)


def test_kernels_run_on_the_configured_interpreter(tmp_path, kernel_venv):
    # the server's environment does not have the package, nor its venv
    assert importlib.util.find_spec("onlyinkernels") is None
    config = _write_config(tmp_path, f"kernel_python = {kernel_venv!r}\npool_size = 1\n")
    server = start_server("--config", config)
    try:
        with server.client() as client:
            model = client.create_kernel()
            with client.connect(model.id) as kernel:
                result = kernel.execute("import onlyinkernels; onlyinkernels.ANSWER")
                assert result.result_text == "'from the kernel venv'"
                result = kernel.execute("import sys; sys.executable")
                assert result.result_text == repr(kernel_venv)
                # the server's own dependencies are not in the kernels' way
                result = kernel.execute(
                    "import importlib.util as u; [m for m in ('twisted', 'autobahn', 'txzmq')"
                    " if u.find_spec(m)]"
                )
                assert result.result_text == "[]"
                # !pip and !python are the kernels' environment's
                result = kernel.execute("import shutil; shutil.which('python')")
                assert result.result_text == repr(kernel_venv)
    finally:
        server.stop()


def test_an_interpreter_without_ipykernel_stops_the_server_with_a_clear_message(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = os.path.join(venv, "bin", "python")
    config = _write_config(tmp_path, f"kernel_python = {python!r}\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellmux",
            "serve",
            "--port",
            "0",
            "--config",
            config,
            "--runtime-dir",
            str(tmp_path / "rt"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert f"kernel_python {python} cannot import ipykernel, attrs, zmq, pyseccomp" in run.stderr
    assert f"{python} -m pip install ipykernel attrs pyseccomp" in run.stderr
    assert "Traceback" not in run.stderr
