"""The rows of the paper's Table 2 (left) on the built-in world, over several seeds.

    python benchmarks/ablation.py                       # 3 seeds, the default world (slow: ~1 h on 2 CPU cores)
    python benchmarks/ablation.py --seeds 0 --reduced   # one seed of the reduced CI world (minutes)

Each seed generates its own world, pretrains its own source model once, then runs every row with the same
adaptation budget. Prints mean and spread (std over seeds) of target mIoU per row, and the IoU of the renamed
target classes (the ones vocabulary alignment is meant to recover).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from vocalign_hf.adaptation import ABLATIONS
from vocalign_hf.recipes import parse_recipe_args, run_adaptation
from vocalign_hf.world.generator import CLASSES

ROOT = Path(__file__).resolve().parents[1]
REDUCED = [
    "--world_image_size", "32", "--world_num_source_train", "400", "--world_num_target_train", "120",
    "--world_num_target_eval", "40", "--world_pretrain_steps", "600", "--world_pretrain_batch_size", "8",
    "--max_steps", "100", "--per_device_train_batch_size", "8",
]
RENAMED = [c.target_name for c in CLASSES if c.kind not in ("same", "source-only")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--reduced", action="store_true", help="the small CI world (32x32, fewer images and steps)")
    parser.add_argument("--output_dir", default="runs/ablation")
    parser.add_argument("extra", nargs="*", help="more recipe flags, after --")
    options = parser.parse_args()

    table: dict[str, list[dict]] = {row: [] for row in options.rows}
    for seed in options.seeds:
        base_dir = Path(options.output_dir) / f"seed{seed}"
        flags = ["--config", str(ROOT / "recipes" / "configs" / "world.yaml"), "--world_seed", str(seed),
                 "--seed", str(seed), "--num_overlays", "0", "--disable_tqdm", "true", "--save_strategy", "no"]
        flags += (REDUCED if options.reduced else []) + options.extra
        for row in options.rows:
            recipe, args = parse_recipe_args(flags + ["--output_dir", str(base_dir / row)])
            recipe = replace(recipe, base_model=None if row == options.rows[0] else str(base_dir / options.rows[0] / "source_model"))
            args = replace(args, **ABLATIONS[row])
            if row == "zero_shot":
                recipe = replace(recipe, eval_zero_shot=True)
            else:
                recipe = replace(recipe, eval_zero_shot=False)
            results = run_adaptation(recipe, args)
            prefix = "zero_shot" if row == "zero_shot" else "adapted"
            table[row].append({"miou": results[f"{prefix}_miou"],
                               **{c: results.get(f"{prefix}_iou_{c}", float("nan")) for c in RENAMED}})
            print(f"[seed {seed}] {row}: mIoU {table[row][-1]['miou']:.2f}", flush=True)

    print(f"\nTarget mIoU over seeds {options.seeds} ({'reduced' if options.reduced else 'default'} world)")
    header = f"{'row':<18}{'mIoU mean':>10}{'std':>7}" + "".join(f"{c:>12}" for c in RENAMED)
    print(header + "\n" + "-" * len(header))
    for row, runs in table.items():
        values = [r["miou"] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        renamed = "".join(f"{statistics.mean(r[c] for r in runs):>12.2f}" for c in RENAMED)
        print(f"{row:<18}{statistics.mean(values):>10.2f}{spread:>7.2f}{renamed}")
    out = Path(options.output_dir) / "ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2))
    print(f"\nper-run numbers: {out}")


if __name__ == "__main__":
    main()
