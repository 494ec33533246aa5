"""Everyday mistakes on the command line: one line on stderr and the
documented exit status (docs/operations.md), never a traceback.

Every test runs the real command in a subprocess.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import cellmux
from conftest import start_server

#: Exit statuses of `cellmux serve` (docs/operations.md, Exit status).
EXIT_START_FAILED = 1
EXIT_SETTINGS = 2


def cellmux_command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cellmux", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


#: A line of the server's log (a timestamp, then the [namespace#level]): a
#: server that got as far as starting logs what it did (the non-root mode's
#: warning, a raised open files limit) before a setting stops it.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def short_dir():
    """A directory for --runtime-dir and --state-dir whose link socket's path
    stays within the 107 bytes of a unix socket address (tmp_path may not)."""
    path = Path(tempfile.mkdtemp(prefix="cli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def taken_port():
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_port_in_use_is_one_line_and_exit_1(taken_port, short_dir):
    result = cellmux_command(
        "serve",
        "--port",
        str(taken_port),
        "--pool-size",
        "0",
        "--runtime-dir",
        str(short_dir / "rt"),
        "--state-dir",
        str(short_dir / "state"),
    )
    assert result.returncode == EXIT_START_FAILED
    line = one_line(result.stderr)
    assert line.startswith(f"cellmux serve: cannot listen on 127.0.0.1:{taken_port}: it is in use")
    assert result.stdout == ""


def test_a_postgres_database_without_psycopg_is_a_bad_setting(short_dir):
    # The postgres extra is not installed: psycopg cannot be imported.
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from cellmux.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [
            *(sys.executable, "-c", code, "serve", "--port", "0", "--pool-size", "0"),
            *("--runtime-dir", str(short_dir / "rt"), "--state-dir", str(short_dir / "state")),
            *("--database", "postgresql://cellmux@127.0.0.1/cellmux"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EXIT_SETTINGS
    line = one_line(result.stderr)
    assert "needs psycopg" in line and "pip install 'cellmux[postgres]'" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "abc"], "--port: 'abc' is not a port number"),
        (["--port", "70000"], "--port: '70000' is not a port number"),
        (["--pool-size", "-1"], "--pool-size: '-1' is not a whole number"),
        (["--service-timeout", "soon"], "--service-timeout: 'soon' is not a number of seconds"),
        (["--bogus"], "option --bogus not recognized"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args, message):
    result = cellmux_command("serve", *args)
    assert result.returncode == EXIT_SETTINGS
    line = one_line(result.stderr)
    assert line.startswith("cellmux serve: ") and message in line, line


def test_serve_help_has_a_usage_line_with_the_program_name():
    for flag in ("-h", "--help"):
        result = cellmux_command("serve", flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: cellmux serve [options]\n")
        assert "--port" in result.stdout


def test_version_is_cellmuxs_own():
    for args in (["--version"], ["serve", "--version"]):
        result = cellmux_command(*args)
        assert result.returncode == 0
        assert result.stdout.strip() == f"cellmux {cellmux.__version__}"


def test_no_command_prints_the_help_and_exits_2():
    result = cellmux_command()
    assert result.returncode == EXIT_SETTINGS
    assert "usage: cellmux" in result.stderr


def twistd() -> str:
    found = shutil.which("twistd", path=sys.prefix + "/bin") or shutil.which("twistd")
    assert found, "twistd is installed with Twisted"
    return found


def test_twistd_exits_non_zero_when_the_server_cannot_start(taken_port, short_dir):
    result = subprocess.run(
        [
            *(twistd(), "-n", "--pidfile=", "cellmux", "--port", str(taken_port)),
            *("--pool-size", "0", "--runtime-dir", str(short_dir / "rt")),
            *("--state-dir", str(short_dir / "state")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=short_dir,
    )
    assert result.returncode == EXIT_START_FAILED, result.stdout + result.stderr
    assert "cellmux could not start" in result.stdout + result.stderr


def test_twistd_cellmux_version_and_bad_port():
    result = subprocess.run(
        [twistd(), "cellmux", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == f"cellmux {cellmux.__version__}"
    result = subprocess.run(
        [twistd(), "-n", "cellmux", "--port", "abc"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_SETTINGS
    assert "--port: 'abc' is not a port number" in result.stderr


def test_a_stopped_server_still_exits_0():
    # The other side of the exit statuses: a clean stop is a success.
    server = start_server("--pool-size", "0")
    assert server.stop() == 0


def test_twistd_exits_non_zero_when_the_server_fails_before_its_reactor_runs(tmp_path):
    # twistd starts the service before its reactor runs; a failure that comes
    # at once (here: a link socket path longer than a unix socket address)
    # used to leave twistd running forever.
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    result = subprocess.run(
        [
            *(twistd(), "-n", "--pidfile=", "cellmux", "--port", "0", "--pool-size", "0"),
            *("--runtime-dir", str(deep / "rt"), "--state-dir", str(tmp_path / "state")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_START_FAILED, result.stdout + result.stderr
