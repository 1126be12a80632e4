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


def test_model_names_load_lazily_and_register_on_first_use():
    """`import vocalign_hf.models.catseg` is free of torch; the first name used registers the Auto classes."""
    import subprocess
    import sys

    probe = (
        "import sys, vocalign_hf.models.catseg as catseg\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "assert set(catseg._EXPORTS) == set(catseg.__all__)\n"
        "from vocalign_hf import CATSegForSemanticSegmentation\n"
        "from transformers import AutoConfig\n"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING as M\n"
        "print(type(AutoConfig.for_model('catseg')).__name__, CATSegForSemanticSegmentation in M.values(),\n"
        "      CATSegForSemanticSegmentation._auto_class)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["CATSegConfig", "True", "AutoModelForSemanticSegmentation"]
