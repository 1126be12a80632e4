"""How the concept guard was chosen (issue 40, part 3): label-free statistics against what they do, per world seed.

For each world seed, with that seed's cached source model (`benchmarks/ablation.py --source_models`), one forward
over the aligned vocabulary's entries (names + concepts) on

* the **unlabeled** target training images (the audit's 256 images): `adaptation.concept_audit.audit_entry_logits`,
  the statistics the guard reads (a concept's pixels, stolen share, victim and the share of the victim's confident
  pixels it takes, its class's share by name);
* the **labelled** target evaluation images: the judge. What weighing down one concept (log-weights -0.25 to -3, and
  dropping it) does to the training-free baseline (the source model scored with Eq. 7), mIoU and per class; and,
  for every rule of a grid, what `guard_concepts` with that rule does when it weighs down every concept it picks.
  Labels are used only here, to *choose* the rule on validation seeds, never by the guard.

The training-free baseline is a proxy: the guard acts on the teacher's pseudo-labels, whose first ones are exactly
this baseline's predictions; its effect on adaptation is measured by the `concept_guard` row of
`benchmarks/ablation.py`. One JSON per seed (`<output_dir>/seed<s>.json`, reused by a rerun); the rules' table over
all seeds done so far goes to `<output_dir>/rules.json`.

    OMP_NUM_THREADS=1 python benchmarks/concept_guard.py --seeds 100 101 102 103 104 \\
        --source_models <ablation's --source_models>/default --output_dir benchmarks/results/concept_guard_proxy/unseen
    # the world of known words: add  -- --world_source_synonyms true  (and its own source models)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
from vocalign_hf.adaptation.concept_audit import audit_entry_logits, guard_concepts
from vocalign_hf.adaptation.vocabulary import ConceptVocabulary
from vocalign_hf.atomic import atomic_write_json
from vocalign_hf.metrics import StreamingMeanIoU
from vocalign_hf.recipes import parse_recipe_args, world_config
from vocalign_hf.world import build_world

ROOT = Path(__file__).resolve().parents[1]
OFFSETS = [-0.25, -0.5, -1.0, -1.5, -2.0, -3.0, float("-inf")]
# The rules compared: (min_territory, max_victim_share, min_name_share, log_weight); the defaults of
# `audit_concepts` / `guard_concepts` are one of them.
RULES = list(itertools.product([0.02, 0.05], [0.2, 0.3, 0.4], [0.0, 0.02, 0.05], [-1.0, -1.5, -2.0, -3.0, float("-inf")]))


@torch.no_grad()
def entry_logits(model, processor, images, text, batch_size: int = 50) -> torch.Tensor:
    """(N, E, h, w) logits of every entry of the aligned vocabulary, one per entry (no Eq. 7)."""
    ids = torch.arange(text.shape[0])
    out = []
    for start in range(0, len(images), batch_size):
        pixel_values = processor(images=[im.convert("RGB") for im in images[start : start + batch_size]])["pixel_values"]
        out.append(model(pixel_values=pixel_values, text_embeds=text, entry_class_ids=ids).logits.float())
    return torch.cat(out)


def judge(logits: torch.Tensor, vocabulary: ConceptVocabulary, weights: dict, labels: torch.Tensor) -> dict:
    """mIoU and per-class IoU (0..100) of Eq. 7 with the concepts' log-weights (-inf: dropped)."""
    # Log-probabilities, resized as the model's Eq. 7 logits are before the argmax.
    shifted = vocabulary.with_log_weights(weights).aggregate(logits).clamp_min(1e-30).log()
    metric = StreamingMeanIoU(vocabulary.num_classes, ignore_index=255)
    metric.update_from_scores(shifted, labels)
    result = metric.compute()
    return {"miou": 100 * float(result["mean_iou"]),
            "iou": {n: 100 * float(v) for n, v in zip(vocabulary.class_names, result["per_category_iou"])}}


def change(after: dict, before: dict) -> dict:
    return {"miou": after["miou"] - before["miou"],
            "classes": {n: round(after["iou"][n] - v, 2) for n, v in before["iou"].items()
                        if not np.isnan(after["iou"][n] - v)}}


def forward_seed(seed: int, options) -> tuple[ConceptVocabulary, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vocabulary, the audit images' and evaluation images' entry logits and the evaluation labels (cached)."""
    cache = Path(options.output_dir) / "logits" / f"seed{seed}.pt"
    recipe, _ = parse_recipe_args(["--config", str(ROOT / "recipes" / "configs" / "world.yaml"),
                                   "--world_seed", str(seed), *options.extra])
    world = build_world(world_config(recipe))
    vocabulary = ConceptVocabulary(list(world.target_class_names), dict(world.target_concepts))
    if cache.is_file():
        saved = torch.load(cache)
        return vocabulary, saved["audit"].float(), saved["eval"].float(), saved["labels"].long()
    source = Path(options.source_models) / f"seed{seed}"
    model = CATSegForSemanticSegmentation.from_pretrained(source).eval()
    processor = CATSegProcessor.from_pretrained(source)
    text = model.get_text_embeddings(processor.tokenize_classes(vocabulary.entries)["input_ids"])
    audit_rows = world.target_train.select(range(min(options.audit_images, len(world.target_train))))
    audit = entry_logits(model, processor, audit_rows["image"], text)
    evaluation = entry_logits(model, processor, world.target_eval["image"], text)
    labels = torch.from_numpy(np.stack([np.asarray(l) for l in world.target_eval["label"]]).astype(np.int64))
    if options.keep_logits:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"audit": audit.half(), "eval": evaluation.half(), "labels": labels.to(torch.uint8)}, cache)
    return vocabulary, audit, evaluation, labels


def run_seed(seed: int, options) -> dict:
    vocabulary, audit_logits, eval_logits, labels = forward_seed(seed, options)
    full = judge(eval_logits, vocabulary, {}, labels)
    concepts = []
    for row in audit_entry_logits([audit_logits], vocabulary):
        sweep = [{"log_weight": w, **change(judge(eval_logits, vocabulary, {row.class_name: {row.concept: w}}, labels),
                                            full)} for w in OFFSETS]
        concepts.append({"class": row.class_name, "concept": row.concept, "pixels": row.pixel_share,
                         "stolen": row.stolen_share, "victim": row.victim, "victim_share": row.victim_share,
                         "name_share": row.class_name_share, "weighed_down": sweep})
    rules = []
    for territory, victim_share, name_share, log_weight in RULES:
        audit = audit_entry_logits([audit_logits], vocabulary, min_territory=territory)
        weights, _ = guard_concepts(audit, victim_share, name_share, log_weight)
        rules.append({"rule": [territory, victim_share, name_share, log_weight], "guarded": weights,
                      **change(judge(eval_logits, vocabulary, weights, labels), full)})
    return {"seed": seed, "with_concepts": full, "concepts": concepts, "rules": rules}


def summarize_rules(results: list[dict]) -> list[dict]:
    table = []
    for index, rule in enumerate(RULES):
        gains = [r["rules"][index]["miou"] for r in results]
        worst = min((v for r in results for v in r["rules"][index]["classes"].values()), default=0.0)
        table.append({"rule": list(rule), "mean": statistics.mean(gains), "min": min(gains), "worst_class": worst,
                      "per_seed": {r["seed"]: round(r["rules"][index]["miou"], 2) for r in results}})
    return sorted(table, key=lambda row: (-row["min"], -row["mean"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--source_models", required=True, help="folder of seed<s>/ source models")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--audit_images", type=int, default=256)
    parser.add_argument("--keep_logits", action="store_true", help="keep both forwards in <output_dir>/logits/")
    parser.add_argument("extra", nargs="*", help="recipe flags after --, e.g. -- --world_source_synonyms true")
    options = parser.parse_args()
    results = []
    for seed in options.seeds:
        done = Path(options.output_dir) / f"seed{seed}.json"
        if not done.is_file():
            atomic_write_json(done, run_seed(seed, options))
        results.append(json.loads(done.read_text()))
        print(f"seed {seed}: with concepts {results[-1]['with_concepts']['miou']:.2f}")
        for row in results[-1]["concepts"]:
            print(f"  {row['class']:<11} {row['concept']:<10} pixels {row['pixels']:6.1%} stolen {row['stolen']:6.1%} "
                  f"takes {row['victim_share']:6.1%} of {str(row['victim']):<10} name {row['name_share']:6.1%} | "
                  "log-weight -> mIoU: " + ", ".join(f"{o['log_weight']:g}: {o['miou']:+.2f}" for o in row["weighed_down"]))
    table = summarize_rules(results)
    atomic_write_json(Path(options.output_dir) / "rules.json", table)
    print("\nrules (min_territory, max_victim_share, min_name_share, log_weight), best worst seed first:")
    for row in table[:12]:
        print(f"  {row['rule']}: mean {row['mean']:+.2f}, worst seed {row['min']:+.2f}, worst class "
              f"{row['worst_class']:+.1f}  " + " ".join(f"{s}:{g:+.2f}" for s, g in row["per_seed"].items()))


if __name__ == "__main__":
    main()
