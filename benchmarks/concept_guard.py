"""Which label-free statistic tells a concept that steals a class from one that finds it (issue 40, part 3).

For each world seed, with that seed's cached source model (`benchmarks/ablation.py --source_models`), one forward
over the aligned vocabulary's entries (names + concepts) on

* the **unlabeled** target training images (the audit's images, `--audit_images`): the label-free statistics of
  every concept, the ones a gate may use;
* the **labelled** target evaluation images: what dropping that one concept does to the training-free baseline
  (zero-shot with concepts, Eq. 7), mIoU and the largest per-class change. This is the judge, used only to *choose*
  a gate on validation seeds, never by the gate itself.

Label-free statistics per concept C of class A (names-only reading = softmax over the class names' entries alone;
"confident" = names-only top probability >= 0.5):

* `stolen`: share of C's pixels the names give confidently to another class (the current gate's statistic);
* `victim`: the largest share, over the other classes B, of B's confident names-only pixels that C wins
  (a concept that takes most of what the names confidently call B is taking B, not finding A);
* `name_share`: share of all pixels the names give A.

Every seed's rows are written to `<output_dir>/seed<s>.json` as it finishes (a rerun skips done seeds).

    OMP_NUM_THREADS=1 python benchmarks/concept_guard.py --seeds 100 101 102 103 104 \
        --source_models /work/sweeps/gate_val/source_models/default --output_dir benchmarks/results/concept_guard_val/unseen
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
from vocalign_hf.atomic import atomic_write_json
from vocalign_hf.metrics import StreamingMeanIoU
from vocalign_hf.models.catseg.vocabulary_catseg import aligned_entries
from vocalign_hf.recipes import parse_recipe_args, world_config
from vocalign_hf.world import build_world

ROOT = Path(__file__).resolve().parents[1]
CONFIDENT = 0.5


@torch.no_grad()
def entry_logits(model, processor, images, text, batch_size: int = 50) -> torch.Tensor:
    """(N, E, h, w) logits of every entry of the aligned vocabulary, one per entry (no Eq. 7)."""
    ids = torch.arange(text.shape[0])
    out = []
    for start in range(0, len(images), batch_size):
        pixel_values = processor(images=[im.convert("RGB") for im in images[start : start + batch_size]])["pixel_values"]
        out.append(model(pixel_values=pixel_values, text_embeds=text, entry_class_ids=ids).logits.float())
    return torch.cat(out)


OFFSETS = [0.0, -0.25, -0.5, -1.0, -1.5, -2.0, -3.0, float("-inf")]


def class_scores(logits: torch.Tensor, owner: torch.Tensor, offset: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 7 in log space with a log-weight per entry: log sum_{e of c} exp(logit_e + offset_e), (N, C, h, w)
    (an offset of -inf drops the entry, log 0.5 halves its probability before the classes are summed)."""
    shifted = logits + offset.view(1, -1, 1, 1)
    return torch.stack([shifted[:, owner == c].logsumexp(dim=1) for c in range(num_classes)], dim=1)


def judge(logits, owner, offset, labels, names) -> dict:
    metric = StreamingMeanIoU(len(names), ignore_index=255)
    metric.update_from_scores(class_scores(logits, owner, offset, len(names)), labels)
    result = metric.compute()
    return {"miou": 100 * float(result["mean_iou"]),
            "iou": {n: 100 * float(v) for n, v in zip(names, result["per_category_iou"])}}


def audit(logits, owner, names_entries, num_classes, offset=None) -> dict:
    """Label-free statistics of every entry on the audit images (with `offset` added to the entries' logits)."""
    winner = (logits if offset is None else logits + offset.view(1, -1, 1, 1)).argmax(dim=1).flatten()
    names_prob = logits[:, names_entries].softmax(dim=1)
    confidence, names_class = (t.flatten() for t in names_prob.max(dim=1))
    confident = confidence >= CONFIDENT
    rows = {}
    for entry in range(logits.shape[1]):
        won = winner == entry
        count = max(int(won.sum()), 1)
        cls = int(owner[entry])
        victims = {}
        for b in range(num_classes):
            if b == cls:
                continue
            territory = confident & (names_class == b)
            victims[b] = float((territory & won).sum()) / max(int(territory.sum()), 1)
        rows[entry] = {
            "pixels": float(won.float().mean()),
            "stolen": float((won & confident & (names_class != cls)).sum()) / count,
            "victim": max(victims.values()),
            "victim_class": max(victims, key=victims.get),
            "name_share": float((names_class == cls).float().mean()),
        }
    return rows


def run_seed(seed: int, options) -> dict:
    recipe, _ = parse_recipe_args(["--config", str(ROOT / "recipes" / "configs" / "world.yaml"),
                                   "--world_seed", str(seed), *options.extra])
    world = build_world(world_config(recipe))
    source = Path(options.source_models) / f"seed{seed}"
    model = CATSegForSemanticSegmentation.from_pretrained(source).eval()
    processor = CATSegProcessor.from_pretrained(source)
    names = list(world.target_class_names)
    entries, owner = aligned_entries(names, dict(world.target_concepts))
    text = model.get_text_embeddings(processor.tokenize_classes(entries)["input_ids"])
    names_entries = torch.tensor([int((owner == c).nonzero()[0]) for c in range(len(names))])
    audit_rows = world.target_train.select(range(min(options.audit_images, len(world.target_train))))
    audit_logits = entry_logits(model, processor, audit_rows["image"], text)
    stats = audit(audit_logits, owner, names_entries, len(names))
    evaluation = world.target_eval
    eval_logits = entry_logits(model, processor, evaluation["image"], text)
    labels = torch.from_numpy(np.stack([np.asarray(l) for l in evaluation["label"]]).astype(np.int64))
    if options.keep_logits:
        cache = Path(options.output_dir) / "logits"
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"audit": audit_logits.half(), "eval": eval_logits.half(), "labels": labels.to(torch.uint8),
                    "owner": owner, "names_entries": names_entries, "entries": entries, "names": names},
                   cache / f"seed{seed}.pt")
    zero = torch.zeros(len(entries))
    full = judge(eval_logits, owner, zero, labels, names)
    names_only = judge(eval_logits, owner, torch.where(torch.isin(torch.arange(len(entries)), names_entries), 0.0,
                                                       float("-inf")), labels, names)
    concepts = []
    for entry in range(len(entries)):
        if entry in names_entries.tolist():
            continue
        sweep = []
        for value in OFFSETS[1:]:
            offset = zero.clone()
            offset[entry] = value
            shifted = judge(eval_logits, owner, offset, labels, names)
            free = audit(audit_logits, owner, names_entries, len(names), offset)[entry]
            sweep.append({"offset": value, "miou_gain": shifted["miou"] - full["miou"],
                          "class_change": {n: round(shifted["iou"][n] - full["iou"][n], 2) for n in names
                                           if not np.isnan(shifted["iou"][n] - full["iou"][n])},
                          "pixels": free["pixels"], "stolen": free["stolen"], "victim": free["victim"]})
        drop = sweep[-1]
        concepts.append({
            "concept": entries[entry], "class": names[int(owner[entry])], **stats[entry],
            "victim_class": names[stats[entry]["victim_class"]],
            "drop_gain": drop["miou_gain"], "drop_class_change": drop["class_change"], "offsets": sweep,
        })
    return {"seed": seed, "with_concepts": full, "names_only": names_only, "concepts": concepts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--source_models", required=True, help="folder of seed<s>/ source models")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--audit_images", type=int, default=256)
    parser.add_argument("--keep_logits", action="store_true", help="also save both forwards to <output_dir>/logits/")
    parser.add_argument("extra", nargs="*", help="recipe flags after --, e.g. -- --world_source_synonyms true")
    options = parser.parse_args()
    for seed in options.seeds:
        done = Path(options.output_dir) / f"seed{seed}.json"
        result = json.loads(done.read_text()) if done.is_file() else run_seed(seed, options)
        if not done.is_file():
            atomic_write_json(done, result)
        print(f"seed {seed}: names {result['names_only']['miou']:.2f}, with concepts {result['with_concepts']['miou']:.2f}")
        for row in result["concepts"]:
            worst = min(row["drop_class_change"].items(), key=lambda kv: kv[1], default=("-", 0.0))
            best = max(row["drop_class_change"].items(), key=lambda kv: kv[1], default=("-", 0.0))
            print(f"  {row['class']:<11} {row['concept']:<10} pixels {row['pixels']:6.1%} stolen {row['stolen']:6.1%} "
                  f"victim {row['victim']:6.1%} ({row['victim_class']:<10}) name {row['name_share']:6.1%} | "
                  f"drop: mIoU {row['drop_gain']:+6.2f}, {best[0]} {best[1]:+.1f}, {worst[0]} {worst[1]:+.1f}")
            print("      offset -> mIoU change (victim share): " + ", ".join(
                f"{o['offset']:g}: {o['miou_gain']:+.2f} ({o['victim']:.0%})" for o in row["offsets"][:-1]))


if __name__ == "__main__":
    main()
