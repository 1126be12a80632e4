"""Packaging: the explicit package list in setup.cfg must name every package in the source tree (a wheel would drop
the rest), the model package loads lazily, and every command the docs and setup.cfg name answers `--help`."""

import configparser
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------------------------------------- the commands
def _console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


def _module_commands() -> list[str]:
    """Every `python -m` command of ours the README and docs give, and the `python -m` form of each console script
    whose module is a program (a package with a `__main__.py`): the tests run `vocalign_hf.adaptation.merge` so."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    documented = set(re.findall(r"python -m ((?:vocalign_hf|concept_generation)[\w.]*)", text))
    assert {"vocalign_hf.demo", "vocalign_hf.world.export", "concept_generation"} <= documented
    for target in _console_scripts().values():
        module = target.split(":")[0]
        if (ROOT / "src" / Path(*module.split(".")) / "__main__.py").is_file():
            documented.add(module)
    return sorted(documented)


def test_console_scripts_are_programs_named_as_installed(monkeypatch, capsys):
    """Each `name = module:function` of setup.cfg answers `--help` with `usage: name`, as its installed wrapper
    would (it exits with what the function returns)."""
    scripts = _console_scripts()
    assert set(scripts) == {"convert-catseg-checkpoint", "vocalign-concepts", "vocalign-merge"}
    for name, target in scripts.items():
        module, function = target.split(":")
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as done:
            getattr(importlib.import_module(module), function)()
        assert done.value.code in (0, None), name
        assert capsys.readouterr().out.startswith(f"usage: {name} "), name


def test_python_m_commands_answer_help():
    """`python -m X --help` of every documented module command (and each console script's module form): exit 0,
    a usage line, and no runpy warning (a module that its package's `__init__` imports, run as `__main__`, is
    executed twice)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(str(p) for p in (ROOT / "src", ROOT))}
    modules = _module_commands()
    assert {"vocalign_hf.adaptation.merge", "vocalign_hf.models.catseg.convert_catseg_checkpoint"} <= set(modules)
    for module in modules:
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                              timeout=300, cwd=ROOT)
        assert done.returncode == 0, f"python -m {module} --help: {done.stderr[-2000:]}"
        assert done.stdout.startswith("usage: "), f"python -m {module} --help printed {done.stdout[:200]!r}"
        assert "RuntimeWarning" not in done.stderr, f"python -m {module}: {done.stderr[-2000:]}"


def test_recipe_programs_answer_help(capsys):
    """`python recipes/adapt.py --help` and `recipes/evaluate.py --help` print every option's help: argparse
    %-formats each help text, so a bare % in one of them broke the whole page."""
    for script in ("adapt.py", "evaluate.py"):
        spec = importlib.util.spec_from_file_location(f"recipe_{script[:-3]}", ROOT / "recipes" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as done:
            module.main(["--help"])
        out = capsys.readouterr().out
        assert done.value.code in (0, None), f"{script} --help: {out[-500:]}"
        assert out.startswith("usage: ") and "--output_dir" in out, script


def test_importing_vocalign_hf_after_transformers_registers_the_pipeline(tmp_path):
    """The README's `from transformers import pipeline; import vocalign_hf; pipeline(..., model=folder)` on a saved
    model (its config has an `auto_map`, as every converted or pushed one) uses this package's code: before the fix,
    the lazy package registered nothing on `import vocalign_hf` and transformers asked for `trust_remote_code`."""
    from conftest import tiny_catseg_config

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor

    config = tiny_catseg_config()
    CATSegForSemanticSegmentation(config).save_pretrained(tmp_path / "model")
    CATSegProcessor.from_config(config).save_pretrained(tmp_path / "model")
    assert "auto_map" in (tmp_path / "model" / "config.json").read_text()
    probe = (
        "import sys\n"
        "from transformers import pipeline\n"
        "import vocalign_hf\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        f"segmenter = pipeline('zero-shot-image-segmentation', model={str(tmp_path / 'model')!r})\n"
        "image = Image.fromarray(np.zeros((40, 56, 3), np.uint8))\n"
        "segments = segmenter(image, candidate_labels=['road', 'sky'])\n"
        "print(type(segmenter.model).__module__, segments[0]['mask'].size)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["vocalign_hf.models.catseg.modeling_catseg", "(56,", "40)"]
