"""The package list in setup.cfg covers the source tree."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_under_src_is_listed_in_setup_cfg():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    on_disk = {
        ".".join(init.parent.relative_to(ROOT / "src").parts)
        for init in (ROOT / "src").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to setup.cfg: {sorted(on_disk - listed)}"
    assert "twisted.plugins" in listed
    assert (ROOT / "plugins/twisted/plugins/cellmux_twistd.py").exists()


def test_every_dependency_has_a_floor_that_tox_floors_pins():
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from floor_constraints import floors
    finally:
        sys.path.remove(str(ROOT / "tools"))
    pinned = dict(floors(ROOT / "setup.cfg"))
    # The one floor known from the issue: the server cannot start before it.
    assert pinned["twisted"] == "25.5.0"
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    entries = [
        line.split("#")[0].strip()
        for line in config["options"]["install_requires"].splitlines()
        if line.split("#")[0].strip()
    ]
    assert len(pinned) == len(entries)


#: What a source tree may hold besides the source: builds, caches, environments.
NOT_SOURCE = [".*", "build", "dist", "*.egg-info", "__pycache__", "node_modules", "venv"]


def test_the_wheel_ships_the_license(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile

    # Built from a copy: a build writes build/ and *.egg-info into its tree.
    # Copied without git, which refuses a checkout another user owns (the
    # non-root run) and is absent from an unpacked source archive.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cellmux-*.whl")
    with zipfile.ZipFile(wheel) as z:
        licenses = [n for n in z.namelist() if n.endswith("/LICENSE")]
        assert licenses, z.namelist()
        assert b"BSD 3-Clause" in z.read(licenses[0])
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        assert "License-File: LICENSE" in z.read(metadata).decode()
