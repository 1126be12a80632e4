"""The explicit package list in setup.cfg must name every package in the source tree (a wheel would drop the rest)."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(init.parent.relative_to(ROOT / "src").parts)
        for init in (ROOT / "src").rglob("__init__.py")
    }
    found |= {"concept_generation"}
    assert found <= listed, f"add to setup.cfg [options] packages: {sorted(found - listed)}"
