"""Helpers shared by the benchmark scripts: machine/version info, peak-memory meters, one subprocess per run.

Not a test module and not part of the package: the scripts in this folder import it as a sibling file.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from typing import Any

# Huge pages for large CPU tensors (see vocalign_hf.cpu_memory), as the recipes: before the first tensor; the
# benchmarks import this module before transformers, and their worker processes inherit the setting.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

RESULT_PREFIX = "RESULT "
_MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------- environment
def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Machine, library versions and git commit, for the header of every printed table."""
    import peft
    import transformers

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError):
        pass
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": mem_gib,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "../src"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty-src" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except OSError:
        return None


def command_line() -> str:
    """The command that is running, relative to the repository root when possible (for reproducibility)."""
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def print_header(title: str, device: str) -> None:
    info = machine_info(device)
    print(f"# {title}")
    print(f"# command: python {command_line()}")
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()))


# -------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def limit_process_memory(gib: float | None) -> None:
    """Cap this process's data segment (private anonymous memory: every torch CPU tensor) so that a configuration
    that does not fit fails with an allocation error instead of taking the shared machine down."""
    if not gib:
        return
    limit = int(gib * 1024**3)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    except (ValueError, OSError):
        pass


class MemoryMeter:
    """Peak memory of a region of code.

    * CUDA: `torch.cuda.reset_peak_memory_stats()` at `start()`, `max_memory_allocated()` at `stop()`; the baseline is
      `memory_allocated()` at `start()` (weights, optimiser state already allocated).
    * CPU: resident set size of this process. `start()` resets the kernel's high-water mark (`VmHWM`, via
      `/proc/self/clear_refs`, Linux >= 4.0) to the current RSS, which is the baseline; `stop()` reads `VmHWM`.
      Where the reset is unavailable, `ru_maxrss` (peak over the whole process) is used and flagged.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.baseline_mib = 0.0
        self.peak_mib = 0.0
        self.method = ""

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mib = torch.cuda.memory_allocated() / _MIB
            self.method = "cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.method = "VmHWM (reset at start)"
        except OSError:
            self.method = "ru_maxrss (whole process)"
        self.baseline_mib = (_proc_status_kib("VmRSS") or 0) / 1024

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / _MIB
            return
        hwm = _proc_status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.peak_mib = hwm / 1024

    def as_dict(self) -> dict[str, Any]:
        return {
            "baseline_mib": round(self.baseline_mib, 1),
            "peak_mib": round(self.peak_mib, 1),
            "increment_mib": round(self.peak_mib - self.baseline_mib, 1),
            "memory_method": self.method,
        }


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`), so that a following RSS
    baseline does not include memory freed earlier."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------- roofline
def count_flops(fn, *args, **kwargs) -> tuple[int, Any]:
    """FLOPs of one call of `fn` as `torch.utils.flop_counter.FlopCounterMode` counts them (matmuls, convolutions,
    attention; elementwise operations are not counted), and the call's result."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out


def matmul_peak_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Measured matmul throughput (GFLOP/s) of this process (its thread count) for `dtype`: the best of `repeats`
    square `size` x `size` products, after one warm-up. The roofline denominator of the benchmarks."""
    # A dtype without hardware support (bf16 on a CPU without AVX512-BF16/AMX) can run 100x slower: shrink the
    # product until one takes under a second, so that the probe itself stays short.
    while size > 128:
        probe = torch.randn(128, 128, device=device).to(dtype)
        synchronize(device)
        start = now()
        torch.mm(probe, probe)
        synchronize(device)
        if (now() - start) * (size / 128) ** 3 < 1.0:
            break
        size //= 2
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(device)
        start = now()
        torch.mm(a, b)
        synchronize(device)
        if i:
            best = min(best, now() - start)
    return 2 * size**3 / best / 1e9


def roofline(flops: int, seconds: float, peak_gflops: float) -> dict[str, Any]:
    """GFLOP, achieved GFLOP/s and the share of the measured matmul peak."""
    achieved = flops / seconds / 1e9 if seconds > 0 else float("nan")
    return {"gflop": round(flops / 1e9, 2), "gflops_s": round(achieved, 1), "peak_gflops_s": round(peak_gflops, 1),
            "of_peak": round(achieved / peak_gflops, 3) if peak_gflops else float("nan")}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def now() -> float:
    return time.perf_counter()


def huge_pages_state() -> str:
    """`on` where this process's large CPU tensors get transparent huge pages (PyTorch's `THP_MEM_ALLOC_ENABLE=1`
    and a kernel in `madvise` or `always` mode), else `off` (the code before vocalign_hf.cpu_memory ran so)."""
    mode = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            text = handle.read()
        mode = text[text.find("[") + 1 : text.find("]")]
    except OSError:
        pass
    return "on" if os.environ.get("THP_MEM_ALLOC_ENABLE", "").strip() == "1" and mode in ("madvise", "always") else "off"


# ----------------------------------------------------------------------------------------- subprocesses
def run_worker(
    script: str, config: dict[str, Any], timeout: float | None = None, nice: int = 0, echo: bool = False,
    src: str | None = None,
) -> dict[str, Any]:
    """Run `python script --worker '<json>'` in a fresh interpreter and return the dict it prints after
    `RESULT `; on failure return `{"error": ...}` with the tail of its output. `echo` prints its other stdout.
    `src` puts another checkout's `src/` folder first on the worker's `PYTHONPATH` (old code against new code in
    one invocation)."""
    cmd = [sys.executable, script, "--worker", json.dumps(config)]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    env = None
    if src:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if echo:
        print("\n".join(l for l in proc.stdout.splitlines() if not l.startswith(RESULT_PREFIX)), flush=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    output = proc.stdout + proc.stderr
    limit = config.get("mem_limit_gb")
    if "can't allocate memory" in output or "Cannot allocate memory" in output or proc.returncode in (-9, 137):
        return {"error": "out of memory" + (f" (over the {limit:g} GB cap)" if limit else "")}
    tail = output.strip().splitlines()[-6:]
    return {"error": f"failed (exit {proc.returncode}): " + " | ".join(tail)[-600:]}


def emit_result(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """`columns` = [(key, header), ...]; missing values print as '-'."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "-")
            if isinstance(value, float):
                value = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
