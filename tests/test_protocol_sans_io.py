"""cellmux.protocol does no I/O: importing it pulls in no network, event loop or clock."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import cellmux.protocol

PACKAGE_DIR = Path(cellmux.protocol.__file__).parent
SRC_DIR = PACKAGE_DIR.parent.parent
SUBMODULES = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
MODULES = ["cellmux.protocol", *(f"cellmux.protocol.{stem}" for stem in SUBMODULES)]

#: Never acceptable, whatever the interpreter imported at start-up.
FRAMEWORKS = {"twisted", "zmq", "autobahn", "txzmq", "asyncio", "_asyncio"}
#: Stdlib I/O and clock modules: acceptable only if the bare interpreter had them already.
STDLIB_IO = {"socket", "_socket", "time"}
BANNED = FRAMEWORKS | STDLIB_IO

# Runs in a fresh interpreter: note what is loaded, import the package, report what is new.
# It imports nothing itself before taking the baseline.
PROBE = """
import sys
baseline = set(sys.modules)
for name in sys.argv[1:]:
    __import__(name)
print(sorted(baseline))
print(sorted(set(sys.modules) - baseline))
"""


def probe(modules: list[str], tmp_path: Path) -> tuple[set[str], set[str]]:
    """(modules loaded at interpreter start, modules the import added)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC_DIR), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *modules],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    baseline, added = result.stdout.splitlines()
    return set(ast.literal_eval(baseline)), set(ast.literal_eval(added))


def roots(names: set[str]) -> set[str]:
    return {name.partition(".")[0] for name in names}


def test_probe_sees_imports(tmp_path: Path) -> None:
    # The probe itself works: it reports the protocol modules as new.
    _, added = probe(MODULES, tmp_path)
    assert set(MODULES) <= added


def test_import_pulls_in_no_framework_or_io_module(tmp_path: Path) -> None:
    baseline, added = probe(MODULES, tmp_path)
    assert not roots(added) & BANNED
    assert not roots(baseline) & FRAMEWORKS


def test_import_package_alone(tmp_path: Path) -> None:
    _, added = probe(["cellmux.protocol"], tmp_path)
    assert not roots(added) & BANNED


def test_no_protocol_module_imports_io_directly() -> None:
    # Start-up may already have loaded time (zipimport does), which makes the
    # check above blind to it; the sources themselves must not ask for it.
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = {node.module}
            else:
                continue
            assert not roots(names) & BANNED, f"{path.name}:{node.lineno} imports {names}"
