"""How good the teacher's first pseudo-labels are: each seed's source model with the aligned vocabulary (classes
plus concepts, a softmax over all entries, concepts summed back to their class: Eq. 7), before any adaptation,
scored against the target evaluation labels. Also which target classes its pixels go to, and each vocabulary
entry's share of the argmax.

    OMP_NUM_THREADS=2 python benchmarks/teacher_first_labels.py --seeds 100 101 102 \
        --source_models runs/val/source_models/default      # the source models benchmarks/ablation.py cached

Use it on validation seeds only (issue 24's protocol). What the adapted student reaches is in ablation.py's output;
the gap between the two is what adaptation keeps of the teacher.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
from vocalign_hf.adaptation import ConceptVocabulary
from vocalign_hf.world import WorldConfig, build_world


@torch.no_grad()
def teacher_confusion(seed: int, source_model: Path, batch_size: int = 25) -> tuple[list[str], np.ndarray, dict]:
    """Confusion matrix (rows: ground truth) of the aligned-vocabulary argmax, and each entry's argmax share."""
    world = build_world(WorldConfig(seed=seed))
    model = CATSegForSemanticSegmentation.from_pretrained(source_model).eval()
    processor = CATSegProcessor.from_pretrained(source_model)
    classes = list(world.target_class_names)
    vocabulary = ConceptVocabulary(classes, world.target_concepts)
    text = model.get_text_embeddings(processor(text=list(vocabulary.entries))["input_ids"])
    n = len(classes)
    confusion, entry_counts = np.zeros((n, n), dtype=np.int64), np.zeros(len(vocabulary.entries))
    for start in range(0, len(world.target_eval), batch_size):
        rows = world.target_eval[start : start + batch_size]
        pixel_values = processor(images=[image.convert("RGB") for image in rows["image"]])["pixel_values"]
        labels = torch.from_numpy(np.stack([np.asarray(label) for label in rows["label"]]).astype(np.int64))
        logits = model(pixel_values=pixel_values, text_embeds=text).logits
        logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        entry_counts += np.bincount(logits.argmax(1).flatten().numpy(), minlength=len(vocabulary.entries))
        predicted = vocabulary.aggregate(logits, from_logits=True).argmax(1)
        valid = labels != 255
        confusion += np.bincount(labels[valid] * n + predicted[valid], minlength=n * n).reshape(n, n)
    shares = {entry: 100 * count / entry_counts.sum() for entry, count in zip(vocabulary.entries, entry_counts)}
    return classes, confusion, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--source_models", required=True, help="folder of seed<s>/ source models")
    options = parser.parse_args()
    for seed in options.seeds:
        classes, confusion, shares = teacher_confusion(seed, Path(options.source_models) / f"seed{seed}")
        iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
        print(f"seed {seed}: teacher mIoU {100 * np.nanmean(iou):.2f}  "
              + "  ".join(f"{c} {100 * v:.1f}" for c, v in zip(classes, iou)))
        for index, name in enumerate(classes):
            row = confusion[index] / max(confusion[index].sum(), 1)
            spread = ", ".join(f"{classes[j]} {100 * row[j]:.1f}" for j in np.argsort(-row) if row[j] > 0.01)
            print(f"    {name} pixels -> {spread}")
        print("    argmax share per entry: " + ", ".join(f"{e} {s:.1f}" for e, s in shares.items()))


if __name__ == "__main__":
    main()
