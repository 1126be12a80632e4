"""Huge-page CPU tensors (vocalign_hf.cpu_memory): the recipes ask PyTorch for them, which cuts the page faults of
large fresh tensors; importing the library changes nothing; an explicit setting is respected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vocalign_hf.cpu_memory import HUGE_PAGES_ENV, kernel_thp_mode

ROOT = Path(__file__).resolve().parents[1]
# A fresh interpreter loads a recipe file without running it (or only imports the library), then writes one 64 MiB
# tensor once; prints the setting PyTorch saw and the page faults of that write.
PROBE = """
import os, resource, runpy, sys
if sys.argv[1] == "library":
    import vocalign_hf
else:
    runpy.run_path(sys.argv[1], run_name="probe")
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(64 * 1024 * 1024, dtype=torch.uint8)
x.fill_(1)
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 64 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")


def run_probe(what: str, setting: str | None = None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    if setting is not None:
        env[HUGE_PAGES_ENV] = setting
    out = subprocess.run([sys.executable, "-c", PROBE, what], env=env, capture_output=True, text=True, check=True,
                         timeout=180, cwd=ROOT)
    value, faults = out.stdout.split()[-2:]
    return value, int(faults)


def test_importing_the_library_leaves_the_allocator_alone():
    value, faults = run_probe("library")
    assert value == "None"
    if kernel_thp_mode() == "madvise":  # 4 KiB pages: one fault each
        assert faults > 0.9 * PAGES, faults


@pytest.mark.skipif(kernel_thp_mode() not in ("madvise", "always"), reason="the kernel gives no transparent huge pages")
@pytest.mark.parametrize("recipe", ["recipes/adapt.py", "recipes/evaluate.py"])
def test_the_recipes_cut_the_page_faults_of_a_large_fresh_tensor(recipe):
    value, faults = run_probe(recipe)
    assert value == "1"
    # 2 MiB pages: about 32 faults where the kernel has huge pages free; allow for some fallback to small pages.
    assert faults < 0.5 * PAGES, faults
    assert run_probe(recipe, setting="0")[0] == "0"  # an explicit setting is left alone
