"""Inference speed and peak memory of the port against the reference CAT-Seg, at equal weights and equal input.

The reference is the unmodified public code of cvlab-kaist/CAT-Seg (CVPR'24), imported from a local checkout given
by `--reference-path` (never copied into this repository), with the stand-ins for detectron2 / timm / open_clip /
torchvision of `tests/fixtures/catseg_reference/make_fixture.py` (reused here by path). Fetch it with::

    git clone https://github.com/cvlab-kaist/CAT-Seg /tmp/catseg_ref
    git -C /tmp/catseg_ref checkout 6d3a188af95165147fe2f34a8237fa7d2633e784

What runs:

1. `prepare`: the reference `CATSeg` is built at **CAT-Seg-B size** (CLIP ViT-B/16: vision width 768, 12 layers,
   12 heads, patch 16, native resolution 224; text width 512, 12 layers, 8 heads; embed 512; aggregator of
   `configs/vitb_384.yaml`; guidance layers [3, 7]; `upsample1/2` from 768 channels), every parameter is drawn from
   a seeded generator (`make_fixture.randomize_`, rounded to float16) and the state dict is written to a temporary
   folder, with a seeded random uint8 image.
2. `reference` and `port`, each in its own fresh process (so that the peak memory is its own), alternately for
   `--rounds` rounds: the reference loads the state dict strictly; the port converts it with
   `convert_catseg_checkpoint.convert_checkpoint` (the checkpoint converter users run). For every class count, the
   text embeddings are computed once and cached on both sides (the reference caches them itself in eval mode),
   then `--warmup` untimed and `--runs` timed inferences run on the same image, batch 1, `torch.no_grad()`:

   * `direct` (default): the reference's `CATSeg.forward` with `sliding_window=False` on
     `{"image": 0..255 float (3, S, S), "height": S, "width": S}` (normalisation, resize to 384, CLIP, head, sigmoid,
     resize to S x S); the port: CLIP normalisation, `model(pixel_values, text_embeds=cached)`, sigmoid, the same
     bilinear resize.
   * `sliding`: the evaluation path of the reference's `eval.sh` (`inference_sliding_window`: 4 windows of 384 on a
     640 canvas + a global view) against the port's `predict_sliding_window`. Use `--pooling 1 1` for eval.sh's
     `POOLING_SIZES [1,1]`.

   Peak memory: CPU resident set size (high-water mark reset after warm-up, see `_common.MemoryMeter`), or
   `torch.cuda.max_memory_allocated()` on a GPU.
3. The logits (direct) and probabilities of both sides are compared (max abs difference printed), and the
   images/second and the port / reference ratios are printed. A speed ratio >= 1 means the port is no slower.

4. With `--before CHECKOUT` (another checkout of this project, e.g. `git worktree add /tmp/before <commit>`), that
   checkout's own port worker runs in every round as well, on its own `src/`, and a table gives its time and peak
   memory beside this checkout's: old code against new code in one invocation, under the same load.

Example::

    python benchmarks/inference_vs_reference.py --reference-path /tmp/catseg_ref --classes 19 150 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

REPO_ROOT = os.path.dirname(HERE)
MAKE_FIXTURE = os.path.join(REPO_ROOT, "tests", "fixtures", "catseg_reference", "make_fixture.py")


# -------------------------------------------------------------------------------------------- reference
def load_make_fixture():
    spec = importlib.util.spec_from_file_location("catseg_make_fixture", MAKE_FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def b16_reference_config(mf, pooling: list[int]) -> dict:
    """make_fixture's CONFIG with the numbers of the released CAT-Seg-B (configs/vitb_384.yaml, CLIP ViT-B/16)."""
    cfg = json.loads(json.dumps(mf.CONFIG))
    cfg["clip"].update(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_heads=12,
        vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
        transformer_layers=12,
    )
    cfg["layer_indexes"] = [3, 7]
    cfg["upsample1"] = {"in_channels": 768, "out_channels": 256, "kernel_size": 2, "stride": 2}
    cfg["upsample2"] = {"in_channels": 768, "out_channels": 128, "kernel_size": 4, "stride": 4}
    cfg["num_classes"] = 171
    cfg["predictor"].update(
        prompt_ensemble_type="single", text_guidance_dim=512, text_guidance_proj_dim=128,
        appearance_guidance_dim=512, appearance_guidance_proj_dim=128, decoder_dims=[64, 32],
        decoder_guidance_dims=[256, 128], decoder_guidance_proj_dims=[32, 16], num_heads=4, num_layers=2,
        hidden_dims=128, pooling_sizes=list(pooling), feature_resolution=[24, 24], window_sizes=12,
        attention_type="linear",
    )
    return cfg


def build_reference(reference_path: str, pooling: list[int], device: str):
    mf = load_make_fixture()
    if not device.startswith("cuda"):
        torch.Tensor.cuda = lambda self, *a, **k: self  # the reference calls .cuda() on token ids
    mf.install_stubs()
    ref = mf.import_reference(reference_path)
    cfg = b16_reference_config(mf, pooling)
    folder = tempfile.mkdtemp(prefix="catseg_ref_classes_")
    class_json = os.path.join(folder, "classes.json")
    with open(class_json, "w") as f:
        json.dump(["thing", "stuff"], f)  # replaced at run time; short so that building is quick
    try:
        model = mf.build_model(ref, cfg, class_json)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return mf, model


def class_names(reference_path: str, count: int) -> list[str]:
    path = os.path.join(reference_path, "datasets", "ade150.json")
    names = [n.strip() for n in json.load(open(path))] if os.path.isfile(path) else []
    names += [f"object {i}" for i in range(max(count - len(names), 0))]
    return names[:count]


# ----------------------------------------------------------------------------------------------- workers
def prepare(cfg: dict) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(cfg["seed"])
    mf, model = build_reference(cfg["reference_path"], cfg["pooling"], "cpu")
    mf.randomize_(model, cfg["seed"])
    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, os.path.join(cfg["workdir"], "state.safetensors"))
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    s = cfg["image_size"]
    image = torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8)
    save_file({"image": image}, os.path.join(cfg["workdir"], "image.safetensors"))
    return {"params": sum(v.numel() for v in state.values()), "tensors": len(state)}


def measure(cfg: dict) -> dict:
    from safetensors.torch import load_file, save_file

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device, role, mode = cfg["device"], cfg["role"], cfg["mode"]
    info = _common.machine_info(device)  # before the reference's stand-in modules exist (transformers probes them)
    workdir = cfg["workdir"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(os.path.join(workdir, "state.safetensors")).items()}
    image_u8 = load_file(os.path.join(workdir, "image.safetensors"))["image"]
    raw = image_u8.float().to(device)  # (3, S, S), 0..255
    out_size = tuple(raw.shape[-2:])
    head_out: list[torch.Tensor] = []

    if role == "reference":
        _, model = build_reference(cfg["reference_path"], cfg["pooling"], device)
        model.load_state_dict(state, strict=True)
        model = model.to(device).eval()
        model.sliding_window = mode == "sliding"
        predictor = model.sem_seg_head.predictor
        model.sem_seg_head.register_forward_hook(lambda m, i, o: head_out.append(o))

        def set_classes(names):
            predictor.test_class_texts = list(names)
            predictor.tokens = None
            predictor.cache = None  # recomputed (and cached by the reference) at the first forward

        def infer():
            return model([{"image": raw, "height": out_size[0], "width": out_size[1]}])[0]["sem_seg"]
    else:
        from vocalign_hf import CATSegProcessor
        from vocalign_hf.models.catseg.pixel_normalization import normalize_pixels
        from vocalign_hf.models.catseg.convert_catseg_checkpoint import convert_checkpoint

        model = convert_checkpoint(state, guidance_layers=[3, 7], pooling_size=list(cfg["pooling"])).to(device).eval()
        processor = CATSegProcessor.from_config(model.config)
        text = {}

        def set_classes(names):
            ids = processor.tokenize_classes(names)["input_ids"].to(device)
            text["embeds"] = model.get_text_embeddings(ids)  # cached once per vocabulary, as the reference does

        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(cfg.get("bf16")))

        def infer():
            pixel_values = normalize_pixels(raw / 255.0).unsqueeze(0)
            with autocast:
                if mode == "sliding":
                    logits = model.predict_sliding_window(pixel_values, text_embeds=text["embeds"],
                                                          output_size=out_size)
                    return logits[0].float().sigmoid()  # the reference's averaged sigmoid probabilities
                logits = model(pixel_values=pixel_values, text_embeds=text["embeds"]).logits.float()
            head_out.append(logits)
            return F.interpolate(logits.sigmoid(), size=out_size, mode="bilinear", align_corners=False)[0]

    del state
    _common.trim_memory()
    result = {"role": role, "rss_after_build_mib": round((_common._proc_status_kib("VmRSS") or 0) / 1024, 1),
              "per_classes": {}}
    for count in cfg["classes"]:
        names = class_names(cfg["reference_path"], count)
        times = []
        with torch.no_grad():
            set_classes(names)
            for _ in range(cfg["warmup"]):
                infer()
            head_out.clear()
            _common.trim_memory()
            meter = _common.MemoryMeter(device)
            meter.start()
            for _ in range(cfg["runs"]):
                _common.synchronize(device)
                t0 = _common.now()
                probs = infer()
                _common.synchronize(device)
                times.append(_common.now() - t0)
            meter.stop()
        saved = {"probs": probs.float().cpu().contiguous()}
        if head_out:
            saved["logits"] = head_out[-1].float().cpu().contiguous()
        head_out.clear()
        save_file(saved, os.path.join(workdir, f"{role}_{count}_r{cfg['round']}.safetensors"))
        entry = {"times_s": [round(t, 4) for t in times], "median_s": statistics.median(times)}
        entry.update(meter.as_dict())
        with torch.no_grad():  # after timing: the counter slows the call it watches
            entry["flops"], _ = _common.count_flops(infer)
        result["per_classes"][str(count)] = entry
    result["info"] = info
    bf16 = role == "port" and cfg.get("bf16")  # the roofline of what ran: the bf16 matmul peak under autocast
    result["matmul_peak_gflops"] = _common.matmul_peak_gflops(device, torch.bfloat16 if bf16 else torch.float32)
    return result


def run_role(role: str, round_: int, base: dict, script: str, args) -> dict:
    """One worker process. `before` is the port of `--before`, run by that checkout's own copy of this script on
    its own `src/`, in a sub-folder of the work folder (same weights and image, its outputs kept apart)."""
    if role != "before":
        return _common.run_worker(script, dict(base, role=role, round=round_), timeout=args.timeout, nice=args.nice)
    checkout = os.path.abspath(args.before)
    workdir = os.path.join(base["workdir"], "before")
    if not os.path.isdir(workdir):
        os.mkdir(workdir)
        for name in ("state.safetensors", "image.safetensors"):
            os.symlink(os.path.join(base["workdir"], name), os.path.join(workdir, name))
    return _common.run_worker(
        os.path.join(checkout, "benchmarks", os.path.basename(script)),
        dict(base, role="port", round=round_, workdir=workdir), timeout=args.timeout, nice=args.nice,
        src=os.path.join(checkout, "src"),
    )


def print_before_after(results: dict, classes: list[int], workdir: str) -> None:
    """This port against the `--before` port: median time, peak over baseline per round, output difference."""
    from safetensors.torch import load_file

    print("# this checkout's port (after) against --before's port (before), same weights, image and rounds\n")
    rows = []
    for count in classes:
        row = {"classes": count}
        for role in ("before", "port"):
            per = [res["per_classes"][str(count)] for res in results[role]]
            row[f"{role}_s"] = statistics.median(t for p in per for t in p["times_s"])
            row[f"{role}_incs"] = " / ".join(f"{p['increment_mib']:.0f}" for p in per)
            row[f"{role}_inc"] = statistics.median(p["increment_mib"] for p in per)
        row["speed"] = row["before_s"] / row["port_s"]
        row["mem"] = row["port_inc"] / row["before_inc"]
        after = load_file(os.path.join(workdir, f"port_{count}_r0.safetensors"))["probs"]
        before = load_file(os.path.join(workdir, "before", f"port_{count}_r0.safetensors"))["probs"]
        row["probs_diff"] = float((after - before).abs().max())
        rows.append(row)
    print(_common.markdown_table(rows, [
        ("classes", "classes"), ("before_s", "before s/img"), ("port_s", "after s/img"), ("speed", "speed after/before"),
        ("before_incs", "before peak - baseline per round (MiB)"), ("port_incs", "after peak - baseline per round (MiB)"),
        ("mem", "memory after/before (medians)"), ("probs_diff", "max |prob diff|"),
    ]))
    print()


def worker(cfg: dict) -> dict:
    return prepare(cfg) if cfg["role"] == "prepare" else measure(cfg)


def plot_scaling(rows: list[dict], path: str, subtitle: str) -> None:
    """Seconds per image and peak memory over the baseline against the class count, port and reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [row["classes"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for role, style in (("reference", "o--"), ("port", "s-")):
        left.plot(classes, [row[f"{role}_s"] for row in rows], style, label=role)
        right.plot(classes, [row[f"{role}_inc"] for row in rows], style, label=role)
    for axis, label in ((left, "seconds per image"), (right, "peak - baseline memory (MiB)")):
        axis.set_xscale("log")
        axis.set_xticks(classes, [str(c) for c in classes])
        axis.set_xlabel("classes")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.suptitle(f"CAT-Seg-B inference, port vs reference ({subtitle})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--reference-path", default="/tmp/catseg_ref", help="checkout of cvlab-kaist/CAT-Seg")
    ap.add_argument("--classes", type=int, nargs="+", default=[19, 150], help="vocabulary sizes (default 19 150)")
    ap.add_argument("--mode", choices=["direct", "sliding"], default="direct")
    ap.add_argument("--pooling", type=int, nargs=2, default=[2, 2],
                    help="class-attention pooling (vitb_384.yaml: 2 2; eval.sh overrides it to 1 1)")
    ap.add_argument("--image-size", type=int, default=384, help="side of the square input image")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3, help="timed inferences per class count and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating reference/port process pairs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true",
                    help="run the port under bf16 autocast (the reference stays fp32): the speed and accuracy cost")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    ap.add_argument("--nice", type=int, default=0, help="run the workers under `nice -n`")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="PNG", help="write time and peak memory against the class count (matplotlib)")
    ap.add_argument("--before", metavar="CHECKOUT",
                    help="another checkout of this project (e.g. a `git worktree` at an older commit): its own port "
                         "worker runs in every round too, and its time and peak memory are printed beside this one's")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (weights, outputs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        if cfg["role"] == "port":
            import vocalign_hf  # noqa: F401 - first, as a program using it would: it sets up huge-page tensors
        result = worker(cfg)
        result["huge_pages"] = _common.huge_pages_state()
        _common.emit_result(result)
        return
    if not os.path.isfile(os.path.join(args.reference_path, "cat_seg", "cat_seg_model.py")):
        raise SystemExit(f"No CAT-Seg checkout at {args.reference_path!r}: see the module docstring (--help).")
    from safetensors.torch import load_file

    _common.print_header("CAT-Seg-B inference: port vs reference at equal weights", args.device)
    workdir = tempfile.mkdtemp(prefix="catseg_bench_")
    base = dict(reference_path=os.path.abspath(args.reference_path), workdir=workdir, seed=args.seed,
                pooling=args.pooling, image_size=args.image_size, device=args.device, threads=args.threads,
                mode=args.mode, classes=args.classes, warmup=args.warmup, runs=args.runs, bf16=args.bf16)
    script = os.path.abspath(__file__)
    try:
        prep = _common.run_worker(script, dict(base, role="prepare"), timeout=args.timeout, nice=args.nice)
        if "error" in prep:
            raise SystemExit(f"building the reference failed: {prep['error']}")
        print(f"# {args.mode} inference, batch 1, {args.image_size}x{args.image_size} input, pooling {args.pooling}, "
              f"{prep['params'] / 1e6:.1f}M parameters (random, seed {args.seed}), {args.warmup} warm-up + "
              f"{args.runs} timed runs x {args.rounds} rounds per side, device {args.device}, "
              f"worker torch threads {args.threads or 'default'}, port {'bf16 autocast' if args.bf16 else 'fp32'}")
        results = {"reference": [], "port": [], "before": []}
        roles = ("reference", "port") + (("before",) if args.before else ())
        for r in range(args.rounds):
            for role in roles if r % 2 == 0 else roles[::-1]:
                res = run_role(role, r, base, script, args)
                if "error" in res:
                    raise SystemExit(f"{role} run failed: {res['error']}")
                results[role].append(res)
                print(f"#   round {r} {role} (huge-page tensors {res.get('huge_pages', '?')}): " + ", ".join(
                    f"C={c}: {v['median_s']:.3f} s, peak +{v['increment_mib']:.0f} MiB" for c, v in res["per_classes"].items()),
                    flush=True)

        rows = []
        for count in args.classes:
            row = {"classes": count}
            for role in ("reference", "port"):
                times = [t for res in results[role] for t in res["per_classes"][str(count)]["times_s"]]
                per = [res["per_classes"][str(count)] for res in results[role]]
                row[f"{role}_s"] = statistics.median(times)
                row[f"{role}_ips"] = 1.0 / row[f"{role}_s"]
                row[f"{role}_peak"] = max(p["peak_mib"] for p in per)
                row[f"{role}_inc"] = max(p["increment_mib"] for p in per)
                row[f"{role}_base"] = max(p["baseline_mib"] for p in per)
            for role in ("reference", "port"):
                flops = results[role][0]["per_classes"][str(count)]["flops"]
                peak = statistics.median(res["matmul_peak_gflops"] for res in results[role])
                roof = _common.roofline(flops, row[f"{role}_s"], peak)
                row[f"{role}_gflop"], row[f"{role}_gflops"], row[f"{role}_of_peak"] = (
                    roof["gflop"], roof["gflops_s"], roof["of_peak"])
                row[f"{role}_peak_gflops"] = roof["peak_gflops_s"]
            row["speed_ratio"] = row["port_ips"] / row["reference_ips"]
            row["mem_ratio"] = row["port_inc"] / row["reference_inc"] if row["reference_inc"] > 0 else float("nan")
            ref_out = load_file(os.path.join(workdir, f"reference_{count}_r0.safetensors"))
            port_out = load_file(os.path.join(workdir, f"port_{count}_r0.safetensors"))
            row["probs_diff"] = float((ref_out["probs"] - port_out["probs"]).abs().max())
            if "logits" in ref_out and "logits" in port_out:
                row["logits_diff"] = float((ref_out["logits"] - port_out["logits"]).abs().max())
                row["logits_absmax"] = float(ref_out["logits"].abs().max())
                same = ref_out["logits"].argmax(1) == port_out["logits"].argmax(1)
                row["argmax_agree"] = float(same.float().mean())
            rows.append(row)
        columns = [
            ("classes", "classes"), ("reference_ips", "reference img/s"), ("port_ips", "port img/s"),
            ("speed_ratio", "speed port/ref"), ("reference_base", "ref baseline RSS (MiB)"),
            ("reference_inc", "ref peak - baseline (MiB)"), ("port_base", "port baseline RSS (MiB)"),
            ("port_inc", "port peak - baseline (MiB)"), ("mem_ratio", "memory port/ref"),
            ("logits_diff", "max |logit diff|"), ("logits_absmax", "max |logit|"), ("probs_diff", "max |prob diff|"),
            ("argmax_agree", "argmax agreement"),
        ]
        roof_columns = [
            ("classes", "classes"), ("reference_gflop", "ref GFLOP"), ("reference_gflops", "ref GFLOP/s"),
            ("reference_of_peak", "ref of peak"), ("port_gflop", "port GFLOP"), ("port_gflops", "port GFLOP/s"),
            ("port_of_peak", "port of peak"), ("reference_peak_gflops", "ref fp32 matmul peak (GFLOP/s)"),
            ("port_peak_gflops", "port matmul peak (GFLOP/s, bf16 under --bf16)"),
        ]
        if args.device.startswith("cuda"):
            columns = [(k, h.replace("RSS", "alloc")) for k, h in columns]
        print()
        print(_common.markdown_table(rows, columns))
        print("\n# roofline: FLOPs of one inference (torch.utils.flop_counter: matmuls, convolutions, attention), "
              "achieved GFLOP/s at the median time, and the share of the matmul peak measured in the workers\n")
        print(_common.markdown_table(rows, roof_columns))
        print()
        if args.plot:
            plot_scaling(rows, args.plot, f"{args.mode}, pooling {args.pooling}, threads {args.threads or 'default'}")
            print(f"# plot written to {args.plot}")
        if args.before:
            print_before_after(results, args.classes, workdir)
        for row in rows:
            verdict = "no slower" if row["speed_ratio"] >= 1.0 else "SLOWER"
            print(f"# C={row['classes']}: port/reference speed ratio {row['speed_ratio']:.2f} ({verdict}), "
                  f"memory ratio {row['mem_ratio']:.2f}, max |logit diff| {row.get('logits_diff', float('nan')):.2e}")
    finally:
        if args.keep:
            print(f"# kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
