"""Transparent huge pages for PyTorch's large CPU tensors.

On CPU, a large share of an adaptation step is not arithmetic but the kernel mapping fresh 4 KiB pages: glibc
hands every tensor above 32 MiB out as a new `mmap` and returns it to the system when it is freed, so each of the
step's many large activations and gradients is page-faulted in again, 4 KiB at a time (about 0.7 ns per byte
on the machine of docs/performance.md, more than a copy costs). PyTorch's allocator can ask the kernel for 2 MiB
pages instead (`madvise(MADV_HUGEPAGE)` on allocations of 2 MiB or more) when the environment variable
`THP_MEM_ALLOC_ENABLE` is 1. The memory is still returned on free, so the peak does not grow the way it does when
glibc is told to keep freed memory (`MALLOC_MMAP_MAX_=0`), which gave the same speed but a higher peak.

PyTorch reads the variable once, at its first CPU allocation, which importing transformers already makes, so it
must be set before that. Importing the library changes nothing (a library does not pick the allocator of the
program that imports it): the programs where it was measured to help set it first thing, before any import that
makes tensors, with `os.environ.setdefault(HUGE_PAGES_ENV, "1")`: `recipes/adapt.py`, `recipes/evaluate.py` and the
benchmarks (`benchmarks/_common.py`). Your own program can do the same, or export `THP_MEM_ALLOC_ENABLE=1`. An
explicit value, `THP_MEM_ALLOC_ENABLE=0` included, is left alone. It takes effect where the kernel's THP mode
(`/sys/kernel/mm/transparent_hugepage/enabled`) is `madvise` or `always`, and does nothing on GPU tensors.
"""

from __future__ import annotations

from pathlib import Path

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
_KERNEL_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def kernel_thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), or None where it cannot be read."""
    try:
        text = _KERNEL_THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None

