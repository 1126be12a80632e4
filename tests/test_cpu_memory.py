"""`import vocalign_hf` asks PyTorch for huge-page CPU tensors (vocalign_hf.cpu_memory), which cuts the page faults
of large fresh tensors; an explicit setting is respected."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vocalign_hf.cpu_memory import HUGE_PAGES_ENV, kernel_thp_mode, request_huge_page_tensors

# A fresh interpreter: torch first (as a user's program might), then optionally vocalign_hf, then one 64 MiB
# tensor written once; prints the setting PyTorch saw and the page faults of that write.
PROBE = """
import os, resource, sys, torch
if sys.argv[1] == "import":
    import vocalign_hf
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(64 * 1024 * 1024, dtype=torch.uint8)
x.fill_(1)
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_probe(import_vocalign: bool, setting: str | None = None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    if setting is not None:
        env[HUGE_PAGES_ENV] = setting
    mode = "import" if import_vocalign else "torch-only"
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True,
                         timeout=180)
    value, faults = out.stdout.split()[-2:]
    return value, int(faults)


def test_request_keeps_an_explicit_setting(monkeypatch):
    monkeypatch.delenv(HUGE_PAGES_ENV, raising=False)
    request_huge_page_tensors()
    assert os.environ[HUGE_PAGES_ENV] == "1"
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    request_huge_page_tensors()
    assert os.environ[HUGE_PAGES_ENV] == "0"


@pytest.mark.skipif(kernel_thp_mode() not in ("madvise", "always"), reason="the kernel gives no transparent huge pages")
def test_importing_vocalign_hf_cuts_the_page_faults_of_a_large_fresh_tensor():
    pages = 64 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    value, faults_huge = run_probe(import_vocalign=True)
    assert value == "1"
    # 2 MiB pages: about 32 faults where the kernel has huge pages free; allow for some fallback to small pages.
    assert faults_huge < 0.5 * pages, faults_huge
    if kernel_thp_mode() == "madvise":  # without the request: 4 KiB pages, one fault each
        _, faults_small = run_probe(import_vocalign=False, setting="0")
        assert faults_small > 0.9 * pages, faults_small
