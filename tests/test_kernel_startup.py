"""Start-up code and environment: from the config, and from a create request
within the config's allow-list; what is refused gets a clear 400."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from cellmux.server.startup import allowed_env, limits_code, startup_code
from cellmux.server.webjson import HTTPError
from conftest import config_file, start_server


@pytest.fixture(scope="module")
def startup_server():
    path = config_file(
        """
kernel_env_allow = ["GREETING", "APP_*"]
allow_request_startup = true
kernel_startup = "SITE_ANSWER = 42"

[kernel_env]
FROM_CONFIG = "yes"
"""
    )
    server = start_server("--config", path, "--pool-size", "1")
    yield server
    server.stop()


def create(server, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        server.url + "api/kernels",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_first_cell_sees_the_environment_and_the_startup_code(startup_server):
    status, model = create(
        startup_server,
        {
            "env": {"GREETING": "hello", "APP_MODE": "test", "KERNEL_USERNAME": "gateway"},
            "startup": "import os\nGREETED = os.environ['GREETING'] + ', world'",
        },
    )
    assert status == 201, model
    client = startup_server.client()
    try:
        with client.connect(model["id"]) as kernel:
            result = kernel.execute(
                "import os\n"
                "print(os.environ['GREETING'], os.environ['APP_MODE'], os.environ['FROM_CONFIG'])\n"
                "print('KERNEL_USERNAME' in os.environ, SITE_ANSWER, GREETED)"
            )
            assert result.stdout == "hello test yes\nFalse 42 hello, world\n"
            # the start-up run was silent: this is the first numbered cell
            assert result.execution_count == 1
        # A restart's new process gets the same start-up run.
        client.restart_kernel(model["id"])
        with client.connect(model["id"]) as kernel:
            result = kernel.execute(
                "import os; print(os.environ['GREETING'], SITE_ANSWER, GREETED)"
            )
            assert result.stdout == "hello 42 hello, world\n"
    finally:
        client.delete_kernel(model["id"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"env": {"PATH": "/evil"}}, "env may not set PATH"),
        ({"env": {"GREETING": "x", "LD_PRELOAD": "x", "SECRET": "y"}}, "LD_PRELOAD, SECRET"),
        ({"env": {"1BAD": "x"}}, "not valid"),
        ({"startup": 7}, "startup must be a string"),
        ({"startup": "raise ValueError('no thanks')"}, "ValueError: no thanks"),
        ({"startup": "def broken(:"}, "SyntaxError"),
    ],
)
def test_refused_and_failing_requests_get_a_clear_400(startup_server, body, message):
    before = {k.id for k in startup_server.client().list_kernels()}
    status, answer = create(startup_server, body)
    assert status == 400 and message in answer["message"], answer
    # a kernel whose start-up failed is not left behind
    assert {k.id for k in startup_server.client().list_kernels()} == before


def test_request_startup_code_is_refused_unless_the_config_allows_it(server):
    status, answer = create(server, {"startup": "x = 1"})
    assert status == 400 and "allow_request_startup" in answer["message"]
    status, answer = create(server, {"env": {"ANYTHING": "1"}})
    assert status == 400 and "the server allows: none" in answer["message"]


def test_env_checks_and_the_startup_run_without_a_server():
    assert allowed_env({"APP_X": "1", "KERNEL_ID": "k"}, ["APP_*"]) == {"APP_X": "1"}
    with pytest.raises(HTTPError, match="NUL"):
        allowed_env({"APP_X": "a\0b"}, ["APP_*"])
    assert startup_code({}, "", "") == ""
    namespace: dict = {}
    code = startup_code({"CELLMUX_TEST_STARTUP": "1"}, "a = 1", "b = a + 1")
    try:
        exec(code, namespace)
        import os

        assert os.environ.pop("CELLMUX_TEST_STARTUP") == "1"
    finally:
        import os

        os.environ.pop("CELLMUX_TEST_STARTUP", None)
    assert namespace["b"] == 2 and "os" not in namespace
    limits = limits_code(
        {"cpu_seconds": 5, "memory_mb": 64, "file_size_mb": 1, "open_files": 64, "processes": 0}
    )
    assert "RLIMIT_NPROC" not in limits and '"RLIMIT_AS": 134217728' in limits
