"""What bf16 autocast costs in accuracy: pixel argmax agreement with fp32 and both mIoUs on a labelled split.

The model (a base model, or a base model with a VocAlign adapter) predicts every evaluation image twice through the
evaluation path of `VocAlignTrainer` (the same text embeddings, direct or sliding-window prediction as the recipe
config says): once in fp32, once under `torch.autocast(<device>, dtype=torch.bfloat16)` (the text embeddings are
encoded under autocast too, as `recipes/evaluate.py --bf16 true` does). Prints the share of pixels whose argmax
class agrees (all pixels, and labelled pixels only), the largest per-pixel score difference, and the mIoU of each.

    # the built-in world, after its main job (`accelerate launch recipes/adapt.py`) wrote runs/world
    python benchmarks/bf16_accuracy.py --config recipes/configs/world.yaml --output_dir runs/world \
        --base_model runs/world/source_model --adapter runs/world/adapter

On a CPU without bf16 matrix instructions (no AVX512-BF16 or AMX) bf16 is much slower than fp32 (docs/performance.md);
the figures still hold, since the rounding is the same on every device.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor  # noqa: E402
from vocalign_hf.adaptation import VocAlignTrainer, load_adapted_model  # noqa: E402
from vocalign_hf.metrics import StreamingMeanIoU  # noqa: E402
from vocalign_hf.recipe_checks import resolve_adapter, resolve_base_model  # noqa: E402
from vocalign_hf.recipes import load_target_data, parse_recipe_args  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"


@torch.no_grad()
def encode_text(model, text_tokens: torch.Tensor, device: torch.device, bf16: bool) -> torch.Tensor:
    """The class embeddings, once per precision (the evaluation loop of `VocAlignTrainer` also encodes them once)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model.get_text_embeddings(text_tokens.to(device))


@torch.no_grad()
def predict(model, text: torch.Tensor, batch: dict, sliding_window: bool, bf16: bool) -> torch.Tensor:
    """Class scores (B, C, H, W) in fp32 at the labels' size for one evaluation batch, as `VocAlignTrainer.evaluate`
    computes them."""
    device = batch["pixel_values"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if sliding_window:
            scores = model.predict_sliding_window(
                batch["pixel_values"], text_embeds=text, output_size=batch["labels"].shape[-2:]
            )
        else:
            scores = model(pixel_values=batch["pixel_values"], text_embeds=text).logits
    scores = scores.float()
    if scores.shape[-2:] != batch["labels"].shape[-2:]:  # as `StreamingMeanIoU.update_from_scores` compares them
        scores = F.interpolate(scores, size=batch["labels"].shape[-2:], mode="bilinear", align_corners=False)
    return scores


def main(argv: list[str] | None = None) -> dict[str, float]:
    recipe, args = parse_recipe_args(argv, config_dir=CONFIG_DIR)
    args = replace(args, method="zero_shot", bf16=False)
    data = load_target_data(recipe, args.output_dir, progress=False)
    base_model = resolve_base_model(recipe.base_model or data.base_model)
    if recipe.adapter:
        model, _ = load_adapted_model(base_model, resolve_adapter(recipe.adapter))
    else:
        model = CATSegForSemanticSegmentation.from_pretrained(base_model)
    processor = CATSegProcessor.from_pretrained(base_model)
    trainer = VocAlignTrainer(
        model=model, args=args, class_names=data.class_names, processor=processor, eval_dataset=data.eval
    )
    model = trainer.model.eval()
    tokens = processor.tokenize_classes(data.class_names)["input_ids"]  # as the recipes tokenise them
    metrics = {name: StreamingMeanIoU(len(data.class_names), ignore_index=255) for name in ("fp32", "bf16")}
    agree = labelled_agree = pixels = labelled = 0
    max_diff = 0.0
    seconds = {"fp32": 0.0, "bf16": 0.0}
    text = {name: encode_text(model, tokens, args.device, bf16=name == "bf16") for name in ("fp32", "bf16")}
    for batch in trainer.get_eval_dataloader(data.eval):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        scores = {}
        for name in ("fp32", "bf16"):
            start = time.perf_counter()
            scores[name] = predict(model, text[name], batch, args.eval_sliding_window, bf16=name == "bf16")
            seconds[name] += time.perf_counter() - start
            metrics[name].update_from_scores(scores[name], batch["labels"])
        same = scores["fp32"].argmax(1) == scores["bf16"].argmax(1)
        valid = batch["labels"] != 255
        agree += int(same.sum())
        pixels += same.numel()
        labelled_agree += int((same & valid).sum())
        labelled += int(valid.sum())
        max_diff = max(max_diff, float((scores["fp32"] - scores["bf16"]).abs().max()))
    miou = {name: metric.compute()["mean_iou"] * 100 for name, metric in metrics.items()}
    result = {
        "images": len(data.eval),
        "argmax_agreement_pct": 100 * agree / pixels,
        "argmax_agreement_labelled_pct": 100 * labelled_agree / max(labelled, 1),
        "max_abs_score_diff": max_diff,
        "miou_fp32": miou["fp32"],
        "miou_bf16": miou["bf16"],
        "miou_bf16_minus_fp32": miou["bf16"] - miou["fp32"],
        "seconds_fp32": seconds["fp32"],
        "seconds_bf16": seconds["bf16"],
    }
    _common.print_header("bf16 autocast against fp32: argmax agreement and mIoU", str(args.device))
    shown = {key: f"{value:.4f}" if isinstance(value, float) else value for key, value in result.items()}
    print(_common.markdown_table([shown], [(key, key) for key in shown]))
    return result


if __name__ == "__main__":
    main()
