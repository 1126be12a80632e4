"""Encoding a vocabulary with CLIP's text tower: the padded batch against prompts cut after their EOT token.

`CATSegModel.get_text_embeddings` runs every prompt only up to the token CLIP pools (its EOT token), one pass per
prompt length. This script measures what that saves against encoding the whole batch padded to its longest prompt
(what the code did before, and what `CLIPModel.get_text_features` does), for a real class list and 1, 10 or 80
prompt templates: the share of tokens that were padding, FLOPs, seconds (best of `--repeats`) and the largest
difference between the two embeddings. The teacher re-encodes its vocabulary after every EMA update with
`teacher_text_ema`, so these are per-step costs of adaptation as well as a one-off cost of inference.

Example (from the repository root)::

    python benchmarks/text_encoding.py --templates 1 10 --threads 1
    python benchmarks/text_encoding.py --templates 1 --concepts     # the teacher's vocabulary: classes + concepts
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common
import torch
import torch.nn.functional as F

ADE150 = Path(__file__).resolve().parents[1] / "src/vocalign_hf/resources/concepts/ade20k_150.json"


def vocabulary(path: Path, concepts: bool) -> list[str]:
    """The class names of a concepts JSON (`{class: [concept, ...]}`), followed by every concept if asked."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return list(data) + ([c for items in data.values() for c in items] if concepts else [])


def best_seconds(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = _common.now()
        out = fn()
        best = min(best, _common.now() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts-json", type=Path, default=ADE150, help="class list as a concepts JSON (default ADE-150)")
    ap.add_argument("--concepts", action="store_true", help="also encode every concept (the teacher's vocabulary)")
    ap.add_argument("--templates", type=int, nargs="+", default=[1, 10], help="numbers of ImageNet prompt templates")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vocalign_hf import CATSegConfig, CATSegModel, CATSegProcessor
    from vocalign_hf.models.catseg.prompt_templates import IMAGENET

    _common.print_header("CLIP text tower: padded batch against prompts cut after their EOT token", "cpu")
    names = vocabulary(args.concepts_json, args.concepts)
    peak = _common.matmul_peak_gflops()
    print(f"# {len(names)} names from {args.concepts_json.name}, CAT-Seg-B text tower (random weights), "
          f"fp32 matmul peak {peak:.1f} GFLOP/s\n")
    print("| templates | prompts | padded length | mean length | padding share | GFLOP padded | GFLOP cut "
          "| s padded | s cut | **speed-up** | cut share of peak | max \\|diff\\| |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count in args.templates:
        templates = "single" if count == 1 else list(IMAGENET[:count])
        config = CATSegConfig(prompt_templates=templates)
        torch.manual_seed(0)
        model = CATSegModel(config).eval()
        ids = CATSegProcessor.from_config(config)(text=names)["input_ids"]
        flat = ids.flatten(0, 1)
        eos = config.clip_config.text_config.eos_token_id
        lengths = (flat == eos).int().argmax(dim=-1) + 1

        def padded():
            return F.normalize(model.clip.get_text_features(input_ids=flat).pooler_output, dim=-1)

        def cut():
            return model.get_text_embeddings(ids).flatten(0, 1)

        with torch.no_grad():
            flops_padded, _ = _common.count_flops(padded)
            flops_cut, _ = _common.count_flops(cut)
            s_padded, e_padded = best_seconds(padded, args.repeats)
            s_cut, e_cut = best_seconds(cut, args.repeats)
        share = 1 - float(lengths.float().mean()) / flat.shape[1]
        of_peak = _common.roofline(flops_cut, s_cut, peak)["of_peak"]
        print(f"| {count} | {flat.shape[0]} | {flat.shape[1]} | {float(lengths.float().mean()):.2f} | {share:.0%} "
              f"| {flops_padded / 1e9:.0f} | {flops_cut / 1e9:.0f} | {s_padded:.2f} | {s_cut:.2f} "
              f"| **{s_padded / s_cut:.2f}x** | {of_peak:.0%} | {float((e_cut - e_padded).abs().max()):.1e} |", flush=True)


if __name__ == "__main__":
    main()
