"""Transparent huge pages for PyTorch's large CPU tensors.

On CPU, a large share of an adaptation step is not arithmetic but the kernel mapping fresh 4 KiB pages: glibc
hands every tensor above 32 MiB out as a new `mmap` and returns it to the system when it is freed, so each of the
step's many large activations and gradients is page-faulted in again, 4 KiB at a time (about 0.7 ns per byte
on the machine of docs/performance.md, more than a copy costs). PyTorch's allocator can ask the kernel for 2 MiB
pages instead (`madvise(MADV_HUGEPAGE)` on allocations of 2 MiB or more) when the environment variable
`THP_MEM_ALLOC_ENABLE` is 1. The memory is still returned on free, so the peak does not grow the way it does when
glibc is told to keep freed memory (`MALLOC_MMAP_MAX_=0`), which gave the same speed but a higher peak.

PyTorch reads the variable once, at its first CPU allocation, so it must be set before any tensor exists:
`import vocalign_hf` does it first thing (the recipes, the CLI tools and the demo import it before making any
tensor); a program that makes tensors before importing vocalign_hf should export the variable itself. An explicit
value, `THP_MEM_ALLOC_ENABLE=0` included, is left alone. It takes effect where the kernel's THP mode
(`/sys/kernel/mm/transparent_hugepage/enabled`) is `madvise` or `always`, and does nothing on GPU tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
_KERNEL_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def request_huge_page_tensors() -> None:
    """Set `THP_MEM_ALLOC_ENABLE=1` unless the environment already says otherwise (see the module docstring)."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def kernel_thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), or None where it cannot be read."""
    try:
        text = _KERNEL_THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None

