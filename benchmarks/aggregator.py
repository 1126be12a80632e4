"""Time and peak memory of CAT-Seg's cost aggregator alone (forward + backward), at CAT-Seg-B size.

The aggregator is where the class count T multiplies the work (every layer runs on B * T cost slices), so changes to
it are measured here without the CLIP towers. Random weights and inputs; the cost does not depend on their values.

    python benchmarks/aggregator.py --classes 35 150 --repeats 3
    python benchmarks/aggregator.py --variant v1 --classes 19            # ResNet-guided v1 widths (1024 -> 128)
    python benchmarks/aggregator.py --device cuda --bf16 --classes 150 --batch-size 8

Each configuration runs in a fresh process (`_common.run_worker`), so that its peak memory is its own
(`_common.MemoryMeter`: peak over the baseline once the module and inputs exist, the untimed warm-up step
included). Prints one markdown row per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MemoryMeter, emit_result, markdown_table, now, print_header, run_worker, synchronize, trim_memory  # noqa: E402


def worker(config: dict) -> dict:
    from vocalign_hf import CATSegConfig
    from vocalign_hf.models.catseg.aggregation_catseg import CATSegAggregator

    torch.manual_seed(0)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = config["device"]
    model_config = CATSegConfig(variant=config["variant"], pad_len=0 if config["variant"] == "v1" else 256)
    model = CATSegAggregator(model_config).to(device)
    b, t = config["batch_size"], config["classes"]
    d, grid = model_config.clip_config.projection_dim, model_config.feature_resolution
    dense = torch.randn(b, d, grid, grid, device=device)
    text = torch.nn.functional.normalize(torch.randn(b, t, model_config.num_templates, d, device=device), dim=-1)
    channels = [model_config.appearance_guidance_dim, *model_config.decoder_guidance_dims]
    guidance = tuple(torch.randn(b, c, grid * s, grid * s, device=device) for c, s in zip(channels, (1, 2, 4)))

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=config["bf16"]):
            logits = model(dense, text, guidance)
        logits.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    trim_memory()
    meter = MemoryMeter(device)
    meter.start()  # peak covers the untimed warm-up step too
    step()
    times = []
    for _ in range(config["repeats"]):
        synchronize(device)
        start = now()
        step()
        synchronize(device)
        times.append(now() - start)
    meter.stop()
    return {"classes": t, "fwd_bwd_s": sorted(times)[len(times) // 2], **meter.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[35, 150])
    ap.add_argument("--variant", choices=["cvpr24", "v1"], default="cvpr24")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps (the median is printed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        emit_result(worker(json.loads(args.worker)))
        return
    print_header(f"CAT-Seg aggregator fwd+bwd ({args.variant}, batch {args.batch_size})", args.device)
    rows = []
    for classes in args.classes:
        config = {"classes": classes, "variant": args.variant, "batch_size": args.batch_size, "repeats": args.repeats,
                  "device": args.device, "bf16": args.bf16, "threads": args.threads}
        rows.append({"classes": classes, **run_worker(__file__, config)})
    print(markdown_table(rows, [("classes", "classes"), ("fwd_bwd_s", "fwd+bwd (s, median)"),
                                ("increment_mib", "peak - baseline (MiB)"), ("error", "error")]))


if __name__ == "__main__":
    main()
