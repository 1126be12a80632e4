"""Peak of torch's CPU allocations during one CAT-Seg-B inference (150 classes), this checkout against another.

The RSS high-water mark of `inference_vs_reference.py` moves by about 20 MiB between identical runs (glibc's heap,
huge pages), too much to compare two versions of the code a few percent apart. This counts what torch itself
allocates: under `torch.profiler` with `profile_memory=True`, each op's own allocations minus frees (children
excluded), summed in the order the ops start; the peak of that sum is the same on every run of the same code.

Each checkout runs in its own process on its own `src/` (`--before`, e.g. a `git worktree` at an older commit), with
the same random CAT-Seg-B (`CATSegConfig()`, seed 0), a 384 x 384 input and 150 random class embeddings:

    python benchmarks/allocation_peak.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)


def measure() -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import vocalign_hf
    from vocalign_hf import CATSegConfig, CATSegForSemanticSegmentation

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(CATSegConfig()).eval()
    pixel_values = torch.randn(1, 3, 384, 384)
    text = torch.randn(150, model.config.num_templates, model.config.clip_config.projection_dim)
    with torch.no_grad():
        model(pixel_values=pixel_values, text_embeds=text)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(pixel_values=pixel_values, text_embeds=text)
    records = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in records:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return {"src": os.path.dirname(vocalign_hf.__file__), "peak_mib": peak / 2**20,
            "logits_sum": float(out.logits.double().sum())}


def run(checkout: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(checkout), "src"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="another checkout of this project")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure()))
        return
    rows = [("this checkout", run(REPO_ROOT))] + ([("--before", run(args.before))] if args.before else [])
    for name, row in rows:
        print(f"{name:<14} peak of torch's allocations {row['peak_mib']:.2f} MiB  (logits sum {row['logits_sum']:.6f}; "
              f"{row['src']})")
    if args.before:
        print(f"after / before: {rows[0][1]['peak_mib'] / rows[1][1]['peak_mib']:.4f}")


if __name__ == "__main__":
    main()
