"""The rows of the paper's Table 2 (left) on the built-in world, over several world seeds.

    python benchmarks/ablation.py --seeds 200 201 202 203 204 205 206 207 208 209 \
        --rows zero_shot zero_shot_concepts topk adaptive_topk student_concepts    # the report seeds (~1 h, 2 cores)
    python benchmarks/ablation.py --seeds 100 101 102 103 104 105 106 107 108 109  # the validation seeds
    python benchmarks/ablation.py --seeds 0 --reduced --rows zero_shot topk   # the small CI world (minutes)

Protocol (docs/world.md, "Which seeds were looked at"): settings of the world job are chosen on the validation seeds
100-109 and reported on seeds 200-209, which played no part in any choice. Each seed generates its own world and
pretrains its own source model once (cached in `--source_models`, reused by later runs), then every row adapts it
with the same budget and the row's switches (`ABLATIONS`). Prints, per row, mean and standard deviation of target
mIoU over the seeds, every seed's value, the gain over zero-shot, and the worst per-class IoU change against
zero-shot; then each seed's source model on its own source domain, per class; writes everything to `ablation.json`.
Several processes may share one `--output_dir` (one per group of seeds); `--only_done` then summarises them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from vocalign_hf.adaptation import ABLATIONS
from vocalign_hf.atomic import atomic_write_json
from vocalign_hf.recipes import parse_recipe_args, run_adaptation
from vocalign_hf.world.generator import target_class_names

ROOT = Path(__file__).resolve().parents[1]
REDUCED = [
    "--world_image_size", "32", "--world_num_source_train", "400", "--world_num_target_train", "120",
    "--world_num_target_eval", "40", "--world_pretrain_steps", "600", "--world_pretrain_batch_size", "8",
    "--max_steps", "100", "--per_device_train_batch_size", "8",
]
CLASSES = target_class_names()
# The paper's Top-K rows keep a fixed K: 4 of the world's 7 classes (the world config's main job uses the adaptive
# K instead, which the `adaptive_topk` row sets itself).
PAPER_TOP_K = ["--top_k", "4"]


def run_row(seed: int, row: str, options, source_model: Path) -> dict[str, float]:
    """One row on one seed; its numbers are kept in `<output_dir>/seed<s>/<row>.json`, so an interrupted or extended
    benchmark reuses the runs it already has."""
    done = Path(options.output_dir) / f"seed{seed}" / f"{row}.json"
    if done.is_file():
        return json.loads(done.read_text())
    flags = ["--config", str(ROOT / "recipes" / "configs" / "world.yaml"), "--world_seed", str(seed),
             "--seed", str(seed), "--num_overlays", "0", "--disable_tqdm", "true", "--save_strategy", "no",
             "--output_dir", str(Path(options.output_dir) / f"seed{seed}" / row),
             # A row interrupted before its JSON was written is redone from scratch.
             "--overwrite_output_dir", "true"] + PAPER_TOP_K
    flags += (REDUCED if options.reduced else []) + options.extra
    recipe, args = parse_recipe_args(flags)
    # The first run of a seed pretrains its source model into the cache; later ones load it from there.
    base = str(source_model) if (source_model / "config.json").is_file() else None
    recipe = replace(recipe, base_model=base, eval_zero_shot=row == "zero_shot")
    if base is None:
        recipe = replace(recipe, world_source_model_dir=str(source_model))
    results = run_adaptation(recipe, replace(args, **ABLATIONS[row]))
    prefix = "zero_shot" if ABLATIONS[row]["method"] == "zero_shot" else "adapted"
    numbers = {"miou": results[f"{prefix}_miou"], **{c: results.get(f"{prefix}_iou_{c}", math.nan) for c in CLASSES}}
    if "adapted_names_miou" in results:  # a student scored with concepts: also the class names alone
        numbers["names_miou"] = results["adapted_names_miou"]
        numbers.update({f"names_{c}": results.get(f"adapted_names_iou_{c}", math.nan) for c in CLASSES})
    atomic_write_json(done, numbers)
    return numbers


def source_quality(seed: int, options, source_model: Path) -> dict[str, float]:
    """The source model's own per-class IoU on its **source** domain (source names, source evaluation split), kept in
    `<output_dir>/seed<s>/source.json`: a class the source never learnt is told apart from one adaptation lost."""
    done = Path(options.output_dir) / f"seed{seed}" / "source.json"
    if done.is_file():
        return json.loads(done.read_text())
    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    from vocalign_hf.recipes import world_config
    from vocalign_hf.world import build_world, evaluate_segmenter

    recipe, _ = parse_recipe_args(["--config", str(ROOT / "recipes" / "configs" / "world.yaml"), "--world_seed",
                                   str(seed), *(REDUCED if options.reduced else []), *options.extra])
    world = build_world(world_config(recipe))
    model = CATSegForSemanticSegmentation.from_pretrained(source_model)
    result = evaluate_segmenter(model, CATSegProcessor.from_pretrained(source_model), world.source_eval,
                                world.source_class_names)
    # Reported under the target names of the same classes, so that the rows line up with the target tables.
    by_source = {name: 100 * iou for name, iou in result["per_category_iou"].items()}
    numbers = {"miou": 100 * result["mean_iou"],
               **{t: by_source[world.source_class_names[s]] for t, s in zip(CLASSES, world.target_to_source)}}
    atomic_write_json(done, numbers)
    return numbers


def summarize(table: dict[str, dict[int, dict[str, float]]], seeds: list[int], baseline: str = "zero_shot") -> str:
    """Mean, std and per-seed mIoU of each row (over the seeds it ran on), its gain over the `baseline` row on those
    seeds, and the worst per-class IoU change against it."""
    zero = table.get(baseline, {})
    lines = [f"{'row':<20}{'n':>2}{'mean':>7}{'std':>6}  " + " ".join(f"{'s' + str(s):>6}" for s in seeds)
             + "   gain: mean    min   worst class change"]
    for row, runs in table.items():
        ran = [s for s in seeds if s in runs]
        if not ran:
            continue
        values = [runs[s]["miou"] for s in ran]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cells = " ".join(f"{runs[s]['miou']:>6.2f}" if s in runs else f"{'-':>6}" for s in seeds)
        line = f"{row:<20}{len(ran):>2}{statistics.mean(values):>7.2f}{spread:>6.2f}  {cells}"
        paired = [s for s in ran if s in zero]
        if row != baseline and paired:
            gains = [runs[s]["miou"] - zero[s]["miou"] for s in paired]
            worst = min((runs[s][c] - zero[s][c], c, s) for s in paired for c in CLASSES
                        if not (math.isnan(runs[s][c]) or math.isnan(zero[s][c])))
            line += f"   {statistics.mean(gains):+6.2f} {min(gains):+6.2f}   {worst[0]:+6.1f} ({worst[1]}, seed {worst[2]})"
        lines.append(line)
    return "\n".join(lines)


def per_seed_classes(table: dict[str, dict[int, dict[str, float]]], sources: dict[int, dict[str, float]],
                     seeds: list[int]) -> str:
    """Per seed and class: the source model on its own source domain next to every row on the target, so that a
    class the source never learnt is told apart from one that adaptation lost."""
    lines = [f"{'seed':<6}{'':<20}" + "".join(f"{c[:10]:>11}" for c in CLASSES)]
    for seed in seeds:
        named = ([("source model", sources[seed])] if seed in sources else []) + [
            (row, runs[seed]) for row, runs in table.items() if seed in runs]
        for index, (name, numbers) in enumerate(named):
            lines.append(f"{str(seed) if index == 0 else '':<6}{name:<20}"
                         + "".join(f"{numbers[c]:>11.1f}" for c in CLASSES))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(200, 210)), help="default: the report seeds")
    parser.add_argument("--rows", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--only_done", action="store_true", help="summarise the runs already done; start none")
    parser.add_argument("--reduced", action="store_true", help="the small CI world (32x32, fewer images and steps)")
    parser.add_argument("--output_dir", default="runs/ablation")
    parser.add_argument("--source_models", default=None, help="cache of source models (default <output_dir>/source_models)")
    parser.add_argument("extra", nargs="*", help="more recipe flags, after --")
    options = parser.parse_args()
    cache = Path(options.source_models or Path(options.output_dir) / "source_models")
    cache = cache / ("reduced" if options.reduced else "default")

    table: dict[str, dict[int, dict[str, float]]] = {row: {} for row in options.rows}
    sources: dict[int, dict[str, float]] = {}
    for seed in options.seeds:
        for row in options.rows:
            if options.only_done and not (Path(options.output_dir) / f"seed{seed}" / f"{row}.json").is_file():
                continue
            table[row][seed] = run_row(seed, row, options, cache / f"seed{seed}")
            print(f"[seed {seed}] {row}: mIoU {table[row][seed]['miou']:.2f}", flush=True)
        scored = (Path(options.output_dir) / f"seed{seed}" / "source.json").is_file()
        if scored or ((cache / f"seed{seed}" / "config.json").is_file() and not options.only_done):
            sources[seed] = source_quality(seed, options, cache / f"seed{seed}")

    world = "reduced" if options.reduced else "default"
    print(f"\nTarget mIoU over world seeds {options.seeds} ({world} world)\n{summarize(table, options.seeds)}")
    if table.get("zero_shot_concepts"):  # what adaptation adds to the concepts alone
        print(f"\nAgainst the source model with concepts (zero_shot_concepts)\n"
              f"{summarize(table, options.seeds, 'zero_shot_concepts')}")
    print("\nPer-class IoU, mean over seeds (source model = on its own source domain, under the target names):")
    print(f"{'row':<18}" + "".join(f"{c[:10]:>11}" for c in CLASSES))
    if sources:
        print(f"{'source model':<18}" + "".join(f"{statistics.mean(r[c] for r in sources.values()):>11.2f}"
                                              for c in CLASSES))
    for row, runs in table.items():
        if not runs:
            continue
        print(f"{row:<18}" + "".join(f"{statistics.mean(r[c] for r in runs.values()):>11.2f}" for c in CLASSES))
    print(f"\nPer seed and class (source model on its source domain; the rows on the target):\n"
          f"{per_seed_classes(table, sources, options.seeds)}")
    out = Path(options.output_dir) / "ablation.json"
    atomic_write_json(out, {"seeds": options.seeds, "world": world, "rows": table, "source_models": sources})
    print(f"\nper-run numbers: {out}")


if __name__ == "__main__":
    main()
