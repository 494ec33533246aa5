"""What the source tree promises about itself: every ``test-case-name``
header names tests that exist, no file cites a path outside the
repository, and the root-only lists of conftest.py name real tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parent.parent
#: Trees of our own text (not built bundles, caches or third-party files).
OWN = ["src", "plugins", "tests", "docs", "bench", "fuzz", "tools", "web/src", "README.md"]
SKIP_PARTS = {"__pycache__", "node_modules", "static", "corpus", "screenshots"}
HEADER = re.compile(r"-\*- test-case-name: *(?P<names>[\w.,]+) *-\*-")
#: A relative path that climbs out of the repository, or a machine's own paths.
OUTSIDE = re.compile(r"\.\./shared\b|(?<![\w.])shared/reference\b|(?<![\w/])/work/|\bbriefs?/")


def own_files(*suffixes: str) -> list[Path]:
    found = []
    for top in OWN:
        path = ROOT / top
        candidates = [path] if path.is_file() else path.rglob("*")
        for file in candidates:
            if file.is_file() and file.suffix in suffixes and not SKIP_PARTS & set(file.parts):
                found.append(file)
    return sorted(found)


def test_the_tree_is_here():
    # The checks below read the tree: make sure they read something.
    assert len(own_files(".py")) > 100 and len(own_files(".md")) > 10


def test_every_test_case_name_header_names_an_existing_test_module():
    missing = []
    for file in own_files(".py"):
        with open(file, encoding="utf-8") as f:
            match = HEADER.search(f.readline())
        for name in match["names"].split(",") if match else []:
            target = ROOT.joinpath(*name.split("."))
            if not (target.with_suffix(".py").is_file() or target.is_dir()):
                missing.append(f"{file.relative_to(ROOT)}: {name}")
    assert missing == []


def test_nothing_cites_a_file_outside_the_repository():
    cited = []
    for file in own_files(".py", ".md", ".js", ".cfg", ".toml", ".ini", ".txt"):
        if file == Path(__file__).resolve():
            continue
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                cited.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert cited == []


def test_the_root_only_lists_name_tests_that_exist():
    files = {path.name for path in (ROOT / "tests").rglob("test_*.py")}
    assert conftest.ROOT_ONLY - files == set()
    functions = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.add(node.name)
    assert conftest.ROOT_ONLY_TESTS - functions == set()
