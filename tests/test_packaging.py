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
