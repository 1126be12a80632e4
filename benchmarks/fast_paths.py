"""Does each fast path of the cost aggregator pay for its second code path? (issue 25, part 6)

For every fast path of `aggregation_catseg.py`, the aggregator runs once as committed and once with that one path
replaced by its plain form, written out below (the form the reference computes, or the unchunked / out-of-place
form). Both run in **one process**, each plain run next to a fast one (alternating which goes first), `--repeats`
pairs per path; the medians of the pair ratios are compared. Times are the process's CPU time
(`time.process_time`, one thread): on a shared machine it leaves out the time spent waiting for a core, which
wall-clock time does not. Reported per path: time and peak memory (RSS high-water mark over the baseline,
`_common.MemoryMeter`) relative to the all-fast aggregator, and the largest logit difference from the fast path.

The in-place guidance add without autograd (`add_per_group_`) was measured with this script at commit 6e5ec7a and
removed: it did not meet the threshold (docs/performance.md, "Issue 25, part 6").

Settings, at CAT-Seg-B size (`CATSegConfig()`: 24x24 feature grid, hidden 128, appearance guidance 512,
decoder guidance 256 / 128, pad_len 256), random weights and inputs:

* `inference`: no grad, batch 1, `--classes` classes (the teacher's and evaluation's forward);
* `training`: the adaptation student's case: a frozen aggregator whose inputs need gradients (CLIP's LoRA and the
  text tower sit below it), forward + backward, batch 2, `--train-classes` classes (Top-K).

    python benchmarks/fast_paths.py --classes 150 --train-classes 35 --repeats 3 --threads 1

A path is worth keeping (the threshold of docs/performance.md) if, in a setting it targets, its plain form takes
>= 5 % more aggregator time or >= 10 % more peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MemoryMeter, markdown_table, print_header, trim_memory  # noqa: E402

from vocalign_hf import CATSegConfig  # noqa: E402
from vocalign_hf.models.catseg import aggregation_catseg as agg  # noqa: E402


# ------------------------------------------------------------------------------------------- plain forms
def repeat_per_group(shared: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, ...) -> (rows, ...): each row of `shared` repeated for its group of rows (what the reference builds)."""
    return shared.repeat_interleave(rows // shared.shape[0], dim=0)


def plain_guided_linear(linear, x, guidance):
    if guidance is None:
        return linear(x)
    return linear(torch.cat([x, repeat_per_group(guidance, x.shape[0])], dim=-1))


def plain_swin_project_guidance(self, guidance):
    return guidance  # the raw (normalised) guidance, concatenated in `plain_swin_project`


def plain_swin_project(self, x, guidance):
    """q(cat[x, g]), k(cat[x, g]), v(x): three GEMMs over the concatenation, as the reference."""
    xg = x if guidance is None else torch.cat([x, repeat_per_group(guidance, x.shape[0])], dim=-1)
    return torch.cat([self.q(xg), self.k(xg), self.v(x)], dim=-1)


def plain_decoder_project_guidance(self, guidance):
    return guidance


def plain_decoder_forward(self, x, guidance):
    """conv(cat[up(x), g]) with the whole first-conv weight, g repeated for every class (the reference's `Up`)."""
    x = self.upsample(x.contiguous(memory_format=torch.channels_last))
    if guidance is not None:
        x = torch.cat([x, repeat_per_group(guidance, x.shape[0]).contiguous(memory_format=torch.channels_last)], 1)
    return self.conv(x)


def conv_transpose_upsample(self, x):
    return self.up(x)


def nchw_decoder_project_guidance(self, guidance):
    if guidance is None:
        return None
    first = self.conv.double_conv[0]
    return F.conv2d(guidance.contiguous(), first.weight[:, first.in_channels - guidance.shape[1]:], padding=1)


def nchw_decoder_forward(self, x, projected_guidance):
    """The committed decoder block, in contiguous (NCHW) layout instead of channels last."""
    x = self.upsample(x.contiguous()).contiguous()
    first, rest = self.conv.double_conv[0], self.conv.double_conv[1:]
    out = F.conv2d(x, first.weight[:, : x.shape[1]], padding=1)
    if projected_guidance is not None:
        out = agg.add_per_group(out, projected_guidance)
    return rest(out)


def padded_class_attention(self, x, guidance, pad_x=None, pad_guidance=None, num_pad=0):
    """The reference's form: `num_pad` padding tokens appended to the class axis, attended over, then dropped."""
    t = x.shape[1]
    if num_pad:
        x = torch.cat([x, pad_x.expand(x.shape[0], num_pad, -1)], dim=1)
        if guidance is not None:
            guidance = torch.cat([guidance, pad_guidance.expand(guidance.shape[0], num_pad, -1)], dim=1)
    q, k, v = self._project(x, guidance)
    if self.attention_type == "linear":
        q, k = agg._elu_feature_map(q), agg._elu_feature_map(k)
        kv = torch.einsum("nshd,nshv->nhdv", k, v)
        z = 1.0 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + self.eps)
        out = torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z)
    else:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return out[:, :t].flatten(-2)


@contextlib.contextmanager
def patched(*changes):
    """Temporarily set (owner, attribute, value) triples."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    for owner, name, value in changes:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def unchunked_in(model, part: str):
    """No class-slice chunks in the Swin blocks (`part="swin"`) or in the decoder (`part="decoder"`) only."""
    big, handles = 1 << 30, []

    def setter(size):
        return lambda *args: setattr(agg, "INFERENCE_CHUNK_SLICES", size)

    default = agg.INFERENCE_CHUNK_SLICES
    inside, outside = (big, default) if part == "swin" else (default, big)
    if part == "decoder":
        handles.append(model.register_forward_pre_hook(setter(big)))
    for layer in model.layers:
        handles.append(layer.swin_block.register_forward_pre_hook(setter(inside)))
        handles.append(layer.swin_block.register_forward_hook(setter(outside)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        agg.INFERENCE_CHUNK_SLICES = default


# (name, what the fast path computes instead, settings it targets, patch)
VARIANTS = [
    ("swin split-weight q/k", "q(cat[x, g]), k(cat[x, g]), v(x)",
     ("inference", "training"),
     lambda m: patched((agg.CATSegWindowAttention, "project_guidance", plain_swin_project_guidance),
                       (agg.CATSegWindowAttention, "project_qkv", plain_swin_project))),
    ("class-attn split-weight q/k (guided_linear)", "q/k(cat[x, g per pixel])",
     ("inference", "training"), lambda m: patched((agg, "guided_linear", plain_guided_linear))),
    ("decoder split-weight conv", "conv(cat[up(x), g per class])",
     ("inference", "training"),
     lambda m: patched((agg.CATSegDecoderBlock, "project_guidance", plain_decoder_project_guidance),
                       (agg.CATSegDecoderBlock, "forward", plain_decoder_forward))),
    ("2x2 transposed conv as GEMM + pixel shuffle", "ConvTranspose2d", ("inference", "training"),
     lambda m: patched((agg.CATSegDecoderBlock, "upsample", conv_transpose_upsample))),
    ("decoder channels last", "NCHW decoder", ("inference", "training"),
     lambda m: patched((agg.CATSegDecoderBlock, "project_guidance", nchw_decoder_project_guidance),
                       (agg.CATSegDecoderBlock, "forward", nchw_decoder_forward))),
    ("closed-form padding tokens", "pad_len - T tokens appended", ("inference", "training"),
     lambda m: patched((agg.CATSegClassAttention, "forward", padded_class_attention))),
    ("feed-forward row chunks (no grad)", "whole feed-forward", ("inference",),
     lambda m: patched((agg, "FEED_FORWARD_CHUNK_ROWS", 1 << 62))),
    ("swin class-slice chunks (no grad)", "all slices at once", ("inference",), lambda m: unchunked_in(m, "swin")),
    ("decoder class-slice chunks (no grad)", "all slices at once", ("inference",),
     lambda m: unchunked_in(m, "decoder")),
]


# ----------------------------------------------------------------------------------------------- running
def make_inputs(config, batch: int, classes: int, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    d, grid = config.clip_config.projection_dim, config.feature_resolution
    dense = torch.randn(batch, d, grid, grid, generator=g)
    text = F.normalize(torch.randn(batch, classes, config.num_templates, d, generator=g), dim=-1)
    channels = [config.appearance_guidance_dim, *config.decoder_guidance_dims]
    guidance = tuple(torch.randn(batch, c, grid * s, grid * s, generator=g) for c, s in zip(channels, (1, 2, 4)))
    tensors = [dense, text, *guidance]
    for tensor in tensors:
        tensor.requires_grad_(requires_grad)
    return tensors[0], tensors[1], tuple(tensors[2:])


def run_once(model, inputs, training: bool):
    """One forward (no grad) or forward + backward; returns (seconds, peak - baseline MiB, logits)."""
    trim_memory()
    meter = MemoryMeter("cpu")
    meter.start()
    start = time.process_time()
    if training:
        logits = model(*inputs)
        logits.square().mean().backward()
    else:
        with torch.no_grad():
            logits = model(*inputs)
    seconds = time.process_time() - start
    meter.stop()
    for tensor in (inputs[0], inputs[1], *inputs[2]):
        tensor.grad = None
    return seconds, meter.peak_mib - meter.baseline_mib, logits.detach()


def measure(model, setting: str, batch: int, classes: int, repeats: int, only: list[str] | None) -> list[dict]:
    """Each plain variant runs next to an all-fast run (alternating which goes first), so that load drift between
    the two is small; the ratios are the medians over the `repeats` pairs."""
    training = setting == "training"
    inputs = make_inputs(model.config, batch, classes, training)
    variants = [(name, plain, patch) for name, plain, targets, patch in VARIANTS
                if setting in targets and (not only or any(word in name for word in only))]
    _, _, reference = run_once(model, inputs, training)  # warm-up, and the logits every variant is compared to
    rows = []
    for name, plain, patch in variants:
        time_ratios, mem_ratios, fast_times, fast_peaks, diff = [], [], [], [], 0.0
        for repeat in range(repeats):
            result = {}
            for side in (("fast", "plain") if repeat % 2 == 0 else ("plain", "fast")):
                with patch(model) if side == "plain" else contextlib.nullcontext():
                    result[side] = run_once(model, inputs, training)
            (tf, pf, _), (tp, pp, logits) = result["fast"], result["plain"]
            time_ratios.append(tp / tf)
            mem_ratios.append(pp / pf)
            fast_times.append(tf)
            fast_peaks.append(pf)
            diff = max(diff, float((logits - reference).abs().max()))
            print(f"  {setting} {name}: fast {tf:.2f} s {pf:.0f} MiB, plain {tp:.2f} s {pp:.0f} MiB",
                  file=sys.stderr, flush=True)
        time_ratio, mem_ratio = statistics.median(time_ratios), statistics.median(mem_ratios)
        rows.append({
            "setting": f"{setting} (B={batch}, T={classes})", "path": name, "plain": plain,
            "seconds": f"{statistics.median(fast_times):.2f}", "time_ratio": f"{time_ratio:.3f}",
            "time_ratios": " ".join(f"{r:.2f}" for r in time_ratios),
            "peak_mib": f"{statistics.median(fast_peaks):.0f}", "mem_ratio": f"{mem_ratio:.3f}",
            "max_diff": f"{diff:.1e}", "pays": "yes" if time_ratio >= 1.05 or mem_ratio >= 1.10 else "no",
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=150, help="classes of the inference setting")
    ap.add_argument("--train-classes", type=int, default=35, help="classes (Top-K) of the training setting")
    ap.add_argument("--settings", nargs="+", choices=["inference", "training"], default=["inference", "training"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="+", help="run only the paths whose name contains one of these words")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header("CAT-Seg aggregator: each fast path against its plain form (one process, interleaved)", "cpu")
    torch.manual_seed(0)
    model = agg.CATSegAggregator(CATSegConfig()).requires_grad_(False)
    for parameter in model.parameters():  # no zero-initialised layer hides a path from the logit comparison
        parameter.normal_(0, 0.2)
    model.config = CATSegConfig()
    rows = []
    for setting in args.settings:
        batch, classes = (1, args.classes) if setting == "inference" else (2, args.train_classes)
        rows += measure(model, setting, batch, classes, args.repeats, args.only)
    print(markdown_table(rows, [
        ("setting", "setting"), ("path", "fast path"), ("plain", "plain form"), ("seconds", "fast: median s"),
        ("time_ratio", "time plain/fast"), ("time_ratios", "per pair"), ("peak_mib", "fast: peak - baseline (MiB)"),
        ("mem_ratio", "memory plain/fast"),
        ("max_diff", "max |logit diff|"), ("pays", ">= 5 % time or >= 10 % memory"),
    ]))


if __name__ == "__main__":
    main()
