"""How far a bfloat16 teacher's pseudo-labels are from a float32 teacher's (issue 26): the share of pixels whose
pseudo-label agrees, on the world's unlabeled target images, through the trainer's own `teacher_targets` (aligned
vocabulary, Top-K, confidence weight q), with the teacher's forward under `--teacher_dtype bfloat16` and `float32`.

    OMP_NUM_THREADS=1 python benchmarks/teacher_precision.py                 # the main job's shipped source model
    OMP_NUM_THREADS=1 python benchmarks/teacher_precision.py --images 64 --base_model runs/world/source_model

On a CPU without AVX512-BF16 or AMX, bfloat16 is emulated (slower than float32), but its rounding, and so the
agreement, is the same on every device. Say which machine a timing comes from; the agreement does not depend on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def teacher_targets(trainer, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels over the full class list `(N, H, W)` (255: ignored) and the weights q `(batches,)`."""
    labels, weights = [], []
    for start in range(0, len(images), batch_size):
        indices, positions, weight = trainer.teacher_targets(images[start : start + batch_size])
        flat = positions.flatten(1).clamp(max=indices.shape[1] - 1)  # positions among the kept classes -> class ids
        labels.append(indices.gather(1, flat).view_as(positions).masked_fill(positions == 255, 255))
        weights.append(weight.float().reshape(-1).mean())
    return torch.cat(labels), torch.stack(weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="target training images to label")
    parser.add_argument("--base_model", default=None, help="default: the main job's shipped source model")
    parser.add_argument("--batch_size", type=int, default=16)
    options = parser.parse_args(argv)
    _common.print_header("Pseudo-labels of a bfloat16 teacher against a float32 teacher", "cpu")

    from dataclasses import replace

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    from vocalign_hf.adaptation import SegmentationCollator, VocAlignTrainer, add_lora
    from vocalign_hf.recipes import load_target_data, parse_recipe_args

    with tempfile.TemporaryDirectory() as tmp:
        recipe, args = parse_recipe_args(["--config", str(ROOT / "recipes" / "configs" / "world.yaml"),
                                          "--output_dir", tmp, "--disable_tqdm", "true"])
        if options.base_model:
            recipe = replace(recipe, base_model=options.base_model)
        data = load_target_data(recipe, tmp, progress=False)
        processor = CATSegProcessor.from_pretrained(data.base_model)
        collate = SegmentationCollator(processor.image_processor.image_mean, processor.image_processor.image_std)
        images = collate([data.train[i] for i in range(min(options.images, len(data.train)))])["pixel_values"]
        results = {}
        for dtype in ("float32", "bfloat16"):
            model = add_lora(CATSegForSemanticSegmentation.from_pretrained(data.base_model), args)
            trainer = VocAlignTrainer(model=model, args=replace(args, teacher_dtype=dtype), class_names=data.class_names,
                                      concepts=data.concepts, processor=processor)
            results[dtype] = teacher_targets(trainer, images, options.batch_size)
    (labels32, q32), (labels16, q16) = results["float32"], results["bfloat16"]
    valid = (labels32 != 255) | (labels16 != 255)
    from vocalign_hf.adaptation.teacher import has_native_bf16

    native = "native (AVX512-BF16 or AMX)" if has_native_bf16(torch.device("cpu")) else "emulated (no AVX512-BF16/AMX)"
    print(f"{len(images)} target images, {labels32.numel()} pixels, {torch.get_num_threads()} thread(s), bf16 {native}")
    print(f"pseudo-label agreement, all pixels: {100 * (labels32 == labels16).float().mean():.3f} %")
    print(f"pseudo-label agreement, pixels labelled by either: {100 * (labels32 == labels16)[valid].float().mean():.3f} %")
    print(f"confidence weight q: float32 {q32.mean():.4f}, bfloat16 {q16.mean():.4f}, "
          f"largest batch difference {(q32 - q16).abs().max():.4f}")


if __name__ == "__main__":
    main()
