"""Time and peak memory of one VocAlign adaptation step at CAT-Seg-B size, swept over Top-K, templates, LoRA and
gradient checkpointing.

What one step is: exactly `VocAlignTrainer`'s optimiser step, run by `trainer.train()` on a synthetic in-memory
dataset of random images: teacher forward (no grad) over the whole vocabulary, Top-K selection, block-masked student
forward with only the K selected classes in its cost volume (its text tower encodes every class prompt, with
grad, then keeps the K selected), weighted cross-entropy, backward, gradient clipping, AdamW, scheduler, and the
teacher's EMA update. It is timed from the trainer's `on_step_begin` to `on_step_end` callbacks (after the EMA
callback), after `--warmup` untimed steps. Random weights: the cost does not depend on their values.

Each configuration runs in a fresh Python process (`--worker`), so that peak memory is that configuration's own:

* CPU: resident set size. The baseline is the RSS once the model, its teacher and the trainer are built; the
  kernel's peak-RSS mark is reset there and read after the last step, so `peak` covers warm-up and timed steps,
  including the optimiser state created by the first step (large only without LoRA).
* CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` at the same point.

Variants: `lora=on` is the paper's setting (peft LoRA rank 2 on q/k/v of CLIP layers 0-3, both towers; only those
train; the teacher is a second LoRA adapter on the same model). `lora=off` trains every parameter (both CLIP towers
and the aggregator) through the same trainer; the teacher is then a full deep copy and the EMA has nothing to average (it follows LoRA weights only), so that variant measures
the student's forward/backward/AdamW cost of full fine-tuning plus the teacher forward. `gc=on` sets
`activation_checkpointing=True` (CLIP encoder layers of both towers and the aggregator layers are checkpointed).

Examples (from the repository root)::

    python benchmarks/adaptation_step.py --tiny                        # seconds: smoke run of every code path
    python benchmarks/adaptation_step.py --sweep topk                  # K = 10, 35, 50, 150 (1 template, LoRA)
    python benchmarks/adaptation_step.py --sweep all --device cuda --bf16 --steps 10 --warmup 3
    python benchmarks/adaptation_step.py --top-k 35 --templates 1 10 --lora on off --grad-ckpt off on

Prints one markdown row per configuration (plus a JSON line per run with `--json`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SWEEPS = {
    # Top-K memory curve (the paper's ADE-150 setting uses K = 35 or 50).
    "topk": dict(top_k=[10, 35, 50, 150], templates=[1], lora=[True], grad_ckpt=[False]),
    "templates": dict(top_k=[35], templates=[1, 10, 80], lora=[True], grad_ckpt=[False]),
    "lora": dict(top_k=[35], templates=[1], lora=[True, False], grad_ckpt=[False]),
    "gc": dict(top_k=[35, 150], templates=[1], lora=[True], grad_ckpt=[False, True]),
}


# ------------------------------------------------------------------------------------------------ worker
def build_config(size: str, templates: int):
    from vocalign_hf import CATSegConfig
    from vocalign_hf.models.catseg.prompt_templates import IMAGENET

    if templates == 1:
        prompt_templates = "single"
    elif templates == len(IMAGENET):
        prompt_templates = "imagenet"
    elif 1 < templates < len(IMAGENET):
        prompt_templates = list(IMAGENET[:templates])
    else:
        raise SystemExit(f"--templates must be between 1 and {len(IMAGENET)}, got {templates}")
    if size == "b16":  # CVPR'24 CAT-Seg-B: CLIP ViT-B/16 at 384, configs/vitb_384.yaml (the config defaults)
        return CATSegConfig(prompt_templates=prompt_templates)
    # tiny: a few-layer CLIP at 64x64, for smoke runs of the code paths
    clip = dict(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2,
                           image_size=64, patch_size=8),
        projection_dim=32,
    )
    return CATSegConfig(
        clip_config=clip, clip_resolution=64, guidance_layers=[1, 2], text_guidance_proj_dim=16,
        appearance_guidance_proj_dim=16, decoder_dims=[16, 16], decoder_guidance_dims=[16, 8],
        decoder_guidance_proj_dims=[8, 4], hidden_dim=16, num_heads=2, window_size=4, prompt_templates=prompt_templates,
    )


def worker(cfg: dict) -> dict:
    _common.limit_process_memory(cfg.get("mem_limit_gb"))
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    from torch.utils.data import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    from vocalign_hf.adaptation import VocAlignArguments, VocAlignTrainer, add_lora
    from vocalign_hf.adaptation.lora import count_trainable

    hf_logging.set_verbosity_error()
    device = cfg["device"]
    torch.manual_seed(cfg["seed"])
    config = build_config(cfg["size"], cfg["templates"])
    size = cfg.get("image_size") or config.clip_resolution
    batch, warmup, steps = cfg["batch"], cfg["warmup"], cfg["steps"]
    class_names = [f"class {i}" for i in range(cfg["num_classes"])]
    concepts = {name: [f"{name} part {j}" for j in range(cfg["concepts"])] for name in class_names} if cfg["concepts"] else None

    class RandomImages(Dataset):
        def __len__(self):
            return (warmup + steps) * batch

        def __getitem__(self, index):
            g = torch.Generator().manual_seed(index)
            return {"pixel_values": torch.rand(3, size, size, generator=g)}

    model = CATSegForSemanticSegmentation(config)
    processor = CATSegProcessor.from_config(config)
    out_dir = tempfile.mkdtemp(prefix="vocalign_bench_")
    args = VocAlignArguments(
        output_dir=out_dir, max_steps=warmup + steps, per_device_train_batch_size=batch, top_k=cfg["top_k"],
        use_cpu=device == "cpu", bf16=cfg["bf16"], activation_checkpointing=cfg["grad_ckpt"],
        learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0, logging_strategy="no",
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=cfg["seed"],
    )
    if cfg["lora"]:
        model = add_lora(model, args)
    else:
        model.requires_grad_(True)  # full fine-tuning of both CLIP towers and the aggregator
    trainable = count_trainable(model)
    trainer = VocAlignTrainer(model=model, args=args, class_names=class_names, concepts=concepts,
                              processor=processor, train_dataset=RandomImages())

    times: dict[str, list[float]] = {"step": [], "fwd_bwd": [], "teacher": []}
    meter = _common.MemoryMeter(device)
    state = {"step": 0}

    def timed(name, fn):
        def wrapper(*a, **k):
            _common.synchronize(device)
            t0 = _common.now()
            out = fn(*a, **k)
            _common.synchronize(device)
            if state["step"] >= warmup:
                times[name].append(_common.now() - t0)
            return out
        return wrapper

    flops: dict[str, int] = {}
    plain_step = trainer.training_step

    def counted_step(*a, **k):  # FLOPs of the first warm-up step (the counter slows it; it is not timed)
        if warmup and not flops:
            flops["step"], out = _common.count_flops(plain_step, *a, **k)
            return out
        return plain_step(*a, **k)

    trainer.training_step = timed("fwd_bwd", counted_step)
    trainer.teacher_class_probs = timed("teacher", trainer.teacher_class_probs)
    profiler = None

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            nonlocal profiler
            state["step"] = st.global_step
            if cfg["profile"] and st.global_step == warmup:
                profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if device.startswith("cuda") else []),
                    profile_memory=True,
                )
                profiler.start()
            _common.synchronize(device)
            self.t0 = _common.now()

        def on_step_end(self, args, st, control, **kwargs):
            _common.synchronize(device)
            if state["step"] >= warmup:
                times["step"].append(_common.now() - self.t0)
            if profiler is not None and state["step"] == warmup:
                profiler.stop()

    trainer.add_callback(StepTimer())  # after the EMA callback: the EMA update is inside the timed step
    _common.trim_memory()
    meter.start()
    trainer.train()
    meter.stop()
    shutil.rmtree(out_dir, ignore_errors=True)

    result = {k: v for k, v in cfg.items() if k not in ("profile",)}
    result.update(meter.as_dict())
    for name, values in times.items():
        if values:
            result[f"{name}_s"] = round(statistics.median(values), 3)
    result["step_s_all"] = [round(t, 3) for t in times["step"]]
    result["trainable_params"] = trainable
    result["student_prompts"] = cfg["num_classes"] * config.num_templates
    result["teacher_entries"] = len(trainer.vocabulary.entries)
    result["info"] = _common.machine_info(device)
    import vocalign_hf

    result["code"] = os.path.dirname(vocalign_hf.__file__)
    if flops and "step_s" in result:
        peak = _common.matmul_peak_gflops(device, torch.bfloat16 if cfg["bf16"] else torch.float32)
        result.update(_common.roofline(flops["step"], result["fwd_bwd_s"], peak))
    if profiler is not None:
        sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=cfg["profile"]))
        trace = os.environ.get("BENCH_PROFILE_TRACE")
        if trace:
            profiler.export_chrome_trace(trace)
    return result


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--sweep", choices=sorted(SWEEPS) + ["all"],
                    help="a preset sweep (overrides --top-k/--templates/--lora/--grad-ckpt)")
    ap.add_argument("--top-k", type=int, nargs="+", default=[10, 35, 50, 150], help="K values (default: 10 35 50 150)")
    ap.add_argument("--templates", type=int, nargs="+", default=[1],
                    help="numbers of prompt templates: 1 = 'single', 80 = 'imagenet', else the first N of it")
    ap.add_argument("--lora", nargs="+", choices=["on", "off"], default=["on"])
    ap.add_argument("--grad-ckpt", nargs="+", choices=["on", "off"], default=["off"])
    ap.add_argument("--num-classes", type=int, default=150, help="target vocabulary size (150 = ADE-150)")
    ap.add_argument("--concepts", type=int, default=0, help="synthetic concepts per class in the teacher vocabulary")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=None, help="training crop side (default: clip_resolution, 384)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    ap.add_argument("--tiny", action="store_true", help="tiny model, few classes: a quick smoke run")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="cap each worker's memory (CPU); a configuration over it is reported as out of memory")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--nice", type=int, default=0, help="run the workers under `nice -n`")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="profile the first timed step of each configuration and print the top ROWS operators")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-src", metavar="SRC",
                    help="also run every configuration with the package from SRC (another checkout's src/ folder, "
                         "e.g. a `git worktree` of an older commit), alternating with this tree's, and print "
                         "old/new ratios: old code against new code in one invocation")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def configurations(args) -> list[dict]:
    if args.sweep:
        names = sorted(SWEEPS) if args.sweep == "all" else [args.sweep]
        grids = [SWEEPS[n] for n in names]
    else:
        grids = [dict(top_k=args.top_k, templates=args.templates, lora=[v == "on" for v in args.lora],
                      grad_ckpt=[v == "on" for v in args.grad_ckpt])]
    seen, configs = set(), []
    for grid in grids:
        for k, p, lora, gc in itertools.product(grid["top_k"], grid["templates"], grid["lora"], grid["grad_ckpt"]):
            if args.tiny:
                k = min(k, args.num_classes)
            key = (k, p, lora, gc)
            if key in seen:
                continue
            seen.add(key)
            configs.append(dict(
                size="tiny" if args.tiny else "b16", top_k=k, templates=p, lora=lora, grad_ckpt=gc,
                batch=args.batch_size, num_classes=args.num_classes, concepts=args.concepts, steps=args.steps,
                warmup=args.warmup, device=args.device, bf16=args.bf16, threads=args.threads,
                image_size=args.image_size, mem_limit_gb=args.mem_limit_gb, profile=args.profile, seed=args.seed,
            ))
    return configs


COLUMNS = [
    ("top_k", "Top-K"), ("templates", "templates"), ("lora_s", "LoRA"), ("gc_s", "grad ckpt"),
    ("step_s", "step (s)"), ("fwd_bwd_s", "fwd+bwd (s)"), ("teacher_s", "teacher fwd (s)"),
    ("baseline_mib", "baseline (MiB)"), ("peak_mib", "peak (MiB)"), ("increment_mib", "peak - baseline (MiB)"),
    ("gflop", "GFLOP (fwd+bwd)"), ("gflops_s", "GFLOP/s"), ("of_peak", "of matmul peak"),
    ("huge_pages", "huge-page tensors"), ("error", "note"),
]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        import vocalign_hf  # noqa: F401 - first, as a program using it would: it sets up huge-page tensors

        result = worker(json.loads(args.worker))
        result["huge_pages"] = _common.huge_pages_state()
        _common.emit_result(result)
        return
    if args.tiny:
        if args.num_classes == 150:
            args.num_classes = 12
        if args.top_k == [10, 35, 50, 150]:
            args.top_k = [2, 6, 12]
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    _common.print_header("VocAlign adaptation step: time and peak memory", args.device)
    print(f"# vocabulary {args.num_classes} classes (+{args.concepts} concepts each for the teacher), batch "
          f"{args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, device {args.device}"
          f"{' bf16' if args.bf16 else ''}, worker torch threads {args.threads or 'default'}, model {'tiny' if args.tiny else 'CAT-Seg-B (ViT-B/16 @384)'}")
    columns = ([("code_s", "code")] + COLUMNS) if args.compare_src else COLUMNS
    rows, pairs = [], []
    for index, cfg in enumerate(configurations(args)):
        variants = [("new", None)]
        if args.compare_src:  # alternate which side runs first, so that drifting machine load hits both
            variants = [("old", args.compare_src), ("new", None)][:: 1 if index % 2 == 0 else -1]
        pair = {}
        for label, src in variants:
            res = _common.run_worker(os.path.abspath(__file__), cfg, timeout=args.timeout, nice=args.nice,
                                      echo=bool(args.profile), src=src)
            if "error" in res:
                res = dict(cfg, **res)
            res["lora_s"] = "on" if res["lora"] else "off"
            res["gc_s"] = "on" if res["grad_ckpt"] else "off"
            res["code_s"] = label
            rows.append(res)
            pair[label] = res
            if args.json:
                print(json.dumps({k: v for k, v in res.items() if k != "info"}))
            print(_common.markdown_table([res], columns).splitlines()[-1], flush=True)
        pairs.append(pair)
    print()
    print(_common.markdown_table(rows, columns))
    if args.compare_src:
        print("\n# old/new (time: > 1 means the new code is faster; memory: < 1 means it uses less)")
        for pair in pairs:
            old, new = pair["old"], pair["new"]
            ratios = {key: old[key] / new[key] for key in ("step_s", "fwd_bwd_s", "teacher_s", "increment_mib")
                      if isinstance(old.get(key), (int, float)) and isinstance(new.get(key), (int, float)) and new[key]}
            print(f"# K={new['top_k']} templates={new['templates']} lora={new['lora_s']} gc={new['gc_s']}: "
                  + ", ".join(f"{k} old/new {'%.2f' % v}" for k, v in ratios.items())
                  + (f", new/old memory {1 / ratios['increment_mib']:.2f}" if ratios.get("increment_mib") else ""))
    mem = [r for r in rows if "peak_mib" in r and r["templates"] == rows[0]["templates"] and r["lora"] == rows[0]["lora"]
           and r["grad_ckpt"] == rows[0]["grad_ckpt"]]
    if len({r["top_k"] for r in mem}) > 1:
        curve = sorted(mem, key=lambda r: r["top_k"])
        print("\n# Top-K memory curve (peak - baseline, MiB): "
              + ", ".join(f"K={r['top_k']}: {r['increment_mib']:.0f}" for r in curve))


if __name__ == "__main__":
    main()
