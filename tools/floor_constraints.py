"""Print a pip constraints file that pins every install_requires entry of
setup.cfg to its declared minimum (``name >= X`` becomes ``name==X``).

pip has no "lowest versions" resolution, so ``tox -e floors`` installs
cellmux under these constraints: a floor that is too low then fails the
smoke tests instead of hiding behind a newer release.

Usage: python tools/floor_constraints.py SETUP_CFG OUTPUT
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

#: ``name[extras] >= version`` and nothing else: a requirement without a
#: floor, or with an upper bound, is a mistake this script refuses.
FLOOR = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)(?:\[[^\]]*\])?\s*>=\s*(?P<version>[0-9][^\s,;]*)$")


def floors(setup_cfg: Path) -> list[tuple[str, str]]:
    """The (name, minimum version) of every install_requires entry."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    result = []
    for line in config["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = FLOOR.match(line)
        if match is None:
            raise ValueError(f"install_requires entry without a plain '>=' floor: {line!r}")
        result.append((match["name"], match["version"]))
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    lines = [f"{name}=={version}\n" for name, version in floors(Path(argv[1]))]
    Path(argv[2]).write_text("".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
