"""transformers' own common test mixins, from the source distribution of the installed transformers release.

The mixins (`tests/test_modeling_common.py`, `test_configuration_common.py`, `test_image_processing_common.py`,
`test_processing_common.py`) are not in transformers' wheel, only in its sdist on PyPI. `load_common_tests()` fetches
that sdist once with pip, unpacks the four files into a cache folder as the package `transformers_common_tests` and
imports it. Their code is never committed here.

The sdist leaves out four modules the mixins import; the cache gets these stand-ins instead:
- `exporters/test_export.py`: `ExportTesterMixin` without tests (transformers' torch.export tests are not run here);
- `generation/test_utils.py`: `GenerationTesterMixin`, only the marker class a non-generative model's tester must
  not inherit (CAT-Seg does not generate);
- `utils/test_configuration_utils.py`: `config_common_kwargs`, a non-default value for each attribute of
  `PreTrainedConfig` (used only by configs without sub-configs; CAT-Seg's has two);
- `utils/fetch_hub_objects_for_ci.py` (beside the package, where the mixins look for it): `url_to_local_path` keeps
  the URL, as the real one does for a file CI has not cached (the tests that download images cannot run offline).

Cache: `$VOCALIGN_TEST_CACHE` or `~/.cache/vocalign_hf`. Without a reachable package index the caller skips.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
MIXIN_FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_image_processing_common.py",
    "test_processing_common.py",
)
STAND_INS = {  # paths under the cache folder
    f"{PACKAGE}/__init__.py": "",
    f"{PACKAGE}/exporters/__init__.py": "",
    f"{PACKAGE}/exporters/test_export.py": (
        "class ExportTesterMixin:\n"
        '    """Stand-in: tests/exporters is not in the sdist, so its torch.export tests are not run."""\n'
    ),
    f"{PACKAGE}/generation/__init__.py": "",
    f"{PACKAGE}/generation/test_utils.py": (
        "class GenerationTesterMixin:\n"
        '    """Stand-in marker: a tester of a model that cannot generate must not inherit it."""\n'
    ),
    f"{PACKAGE}/utils/__init__.py": "",
    f"{PACKAGE}/utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        '    "return_dict": False, "output_hidden_states": True, "dtype": "float16", "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["CATSegModel"], "id2label": {0: "label"}, "label2id": {"label": 0},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
    "utils/fetch_hub_objects_for_ci.py": "def url_to_local_path(url, **kwargs):\n    return url\n",
}


class CommonTestsUnavailable(RuntimeError):
    """The sdist could not be fetched (no package index reachable)."""


def cache_root() -> Path:
    return Path(os.environ.get("VOCALIGN_TEST_CACHE", Path.home() / ".cache" / "vocalign_hf"))


def _fetch_sdist(version: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"transformers=={version}", "--dest", str(into)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise CommonTestsUnavailable(f"pip could not fetch the transformers {version} sdist: {detail.strip()[-300:]}")
    return next(into.glob("transformers-*.tar.gz"))


def _unpack(sdist: Path, root: Path) -> None:
    package = root / PACKAGE
    package.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2] in MIXIN_FILES:
                (package / parts[2]).write_bytes(archive.extractfile(member).read())
    missing = [name for name in MIXIN_FILES if not (package / name).is_file()]
    if missing:
        raise CommonTestsUnavailable(f"the transformers sdist {sdist.name} has no tests/{', '.join(missing)}")
    for name, text in STAND_INS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def load_common_tests():
    """The package `transformers_common_tests` of the installed transformers release, fetched on first use."""
    version = transformers.__version__
    home = cache_root() / f"transformers-{version}-common-tests"
    if not (home / PACKAGE / MIXIN_FILES[0]).is_file():
        home.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=home.parent) as scratch:
            root = Path(scratch) / "unpacked"
            _unpack(_fetch_sdist(version, Path(scratch)), root)
            try:  # whole or not at all: another test process may have won the race
                os.replace(root, home)
            except OSError:
                if not (home / PACKAGE / MIXIN_FILES[0]).is_file():
                    raise
    if str(home) not in sys.path:
        sys.path.insert(0, str(home))
    return importlib.import_module(PACKAGE)
