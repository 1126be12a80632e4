"""A rehearsal of the real user path at the paper's shapes, with no download: official-layout checkpoints and a
Cityscapes folder are generated, then the README's own commands run on them.

    python benchmarks/rehearsal.py --output rehearsal.json          # full size (see docs/performance.md)
    python benchmarks/rehearsal.py --small                          # tiny model, 256x128 images (tests/test_rehearsal.py)
    python benchmarks/rehearsal.py --stages write_cityscapes evaluate_one   # some stages alone (see STAGES)

Stages, each a function below, each timed (wall seconds) and measured (peak resident memory: of this process for the
stages that run here, of the command and every process it started for the others, from `wait4`):

1. `write_checkpoints`: random weights (seeded) in the official file layouts: the paper's CAT-Seg v1 (CLIP ViT-B/16 +
   ResNet-101, mmseg `catseg_vitb-r101_...-54194d72.pth`, `{"meta", "state_dict"}`) and CVPR'24 `model_base.pth`
   (detectron2, `{"model", "iteration"}`). The key names come from the reference-layout fixtures
   (tests/fixtures/catseg_*reference/state_dict.safetensors), layers expanded to the model's depth; the shapes and
   values are those of a port model of the real size, put into the official layout by inverting
   `convert_catseg_checkpoint`'s own mapping (`official_state_dict`).
2. `convert`: `convert-catseg-checkpoint <file> <folder> --push-to-hub <repo>` for both, as the README says, to a
   Hub on 127.0.0.1 (tests/hub_server.py).
3. `write_cityscapes`: the official folder layout (`leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`,
   `gtFine/{train,val}/<city>/*_gtFine_labelIds.png` with ignored ids too) of generated 2048x1024 street-like
   images: enough training images for the steps, two validation images.
4. `adapt_killed`: `accelerate launch recipes/adapt.py --dataset cityscapes --data_root ... --base_model <hub id>`
   with the shipped config (recipes/configs/cityscapes.yaml) and a few steps, through tests/kill_probe.py, which
   SIGKILLs the process while it writes its last checkpoint (after the adapter, before the optimiser).
5. `adapt_resumed`: the same command with `--resume_from_checkpoint true --push_adapter_to_hub <repo>`: resumes from
   the last complete checkpoint, finishes, evaluates the two validation images at full resolution with the sliding
   window (zero-shot, with concepts, adapted, adapted with the names alone), writes the adapter and pushes it.
6. `evaluate`: `python recipes/evaluate.py --dataset cityscapes ... --adapter <output>/adapter`: one sliding-window
   evaluation pass of the two validation images (the per-image rate below).
7. `peft_load`: in a fresh process, plain `PeftModel.from_pretrained(CATSeg..., "<adapter repo>")` from the loopback
   Hub; its logits must equal `load_adapted_model` on the local folders.
8. `merge`: `vocalign-merge <base> <output>/adapter <merged>`; the merged folder's logits must match peft's.
9. `pipeline`: `pipeline("zero-shot-image-segmentation", model=<CVPR'24 hub id>)` on one full-resolution image.

`evaluate_one` (not in the default list) is the sliding-window evaluation of one validation image by
`recipes/evaluate.py` on the converted v1 model without adapter (no training needed: a quick look at real shapes).

Prints a table (seconds, peak memory per stage), then what the paper's 40k iterations and the 500-image
validation would take at the measured rates on this machine; `--output` writes everything as JSON. Every command's
output is kept in `<workdir>/logs/`. The working folder is a new temporary folder (deleted at the end unless
`--keep`) or `--workdir`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT / "tests"))  # hub_server.py, kill_probe.py

from _common import MemoryMeter, markdown_table, print_header, trim_memory  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
V1_FILE = "catseg_vitb-r101_4xb1-warmcoslr2e-4-adamw-80k_ade20k-384x384-54194d72.pth"
CVPR24_FILE = "model_base.pth"
V1_REPO, CVPR24_REPO, ADAPTER_REPO = "rehearsal/catseg-v1-r101", "rehearsal/catseg-vitb-384", "rehearsal/vocalign-cityscapes"
PAPER_STEPS, PAPER_VAL_IMAGES = 40_000, 500

# Full size: the paper's model and Cityscapes' resolution; a few steps (batch 2 as the shipped config), killed while
# writing the checkpoint of the last step and resumed from the one before. --small: the fixtures' tiny models.
FULL = dict(image_size=(2048, 1024), train_images=8, max_steps=4, save_steps=2, kill_step=4, extra_flags=[],
            v1_convert_flags=[], cvpr24_convert_flags=[])
SMALL = dict(image_size=(256, 128), train_images=4, max_steps=2, save_steps=1, kill_step=2,
             extra_flags=["--crop_size", "64", "--concept_audit_images", "2", "--num_overlays", "1", "--lora_layers", "0", "1"],
             v1_convert_flags=["--clip-resolution", "64"],
             cvpr24_convert_flags=["--guidance-layers", "1", "2", "--clip-resolution", "64"])

# --small scores with these instead of the shipped Cityscapes concepts (the evaluation runs at 2048x1024 whatever
# the image size: the Cityscapes evaluation transform fits images to it, as the reference's test pipeline).
SMALL_CONCEPTS_FILE = "concepts_small.json"
SMALL_CONCEPTS = {"road": ["street"], "car": ["automobile"], "sky": ["clouds"]}

STAGES = ["write_checkpoints", "convert", "write_cityscapes", "adapt_killed", "adapt_resumed", "evaluate",
          "peft_load", "merge", "pipeline"]
EXTRA_STAGES = ["evaluate_one"]


# ------------------------------------------------------------------------------------------ official layouts
def _expand_layers(template: dict[str, torch.Tensor], port: dict[str, torch.Tensor]) -> list[str]:
    """The template's keys with each CLIP tower's `resblocks.<i>.` repeated for as many layers as the port has."""
    layers = {
        "visual.": sum(1 for k in port if k.startswith("catseg.clip.vision_model.encoder.layers.") and k.endswith(".layer_norm1.weight")),
        "": sum(1 for k in port if k.startswith("catseg.clip.text_model.encoder.layers.") and k.endswith(".layer_norm1.weight")),
    }
    keys: list[str] = []
    done: set[str] = set()
    for key in template:
        match = re.match(r"^(.*?clip_model\.(visual\.)?transformer\.resblocks\.)(\d+)\.(.*)$", key)
        if match is None:
            keys.append(key)
            continue
        prefix, tower, _, _ = match.groups()
        if prefix in done:
            continue
        done.add(prefix)
        suffixes = [k[len(prefix) + 2 :] for k in template if k.startswith(prefix + "0.")]
        keys += [f"{prefix}{i}.{suffix}" for i in range(layers[tower or ""]) for suffix in suffixes]
    return keys


def official_state_dict(model: torch.nn.Module, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model`'s weights under the key names and in the shapes of an official CAT-Seg checkpoint of the layout of
    `template` (a reference state dict of any size: the fixtures'), so that `convert_checkpoint` gives `model` back.

    The mapping is the converter's own, inverted: each official key (the template's, layers expanded to the model's
    depth) is sent through `convert_state_dict` as a (3, 1) tensor holding its index; where it lands says which port
    weight it is and how (as is, transposed: (1, 3), or a third of a fused q/k/v projection: (1, 1)). Buffers the
    converter drops (Swin masks, relative position indices) are the template's. The v1 cost embedding, which the
    converter folds from the checkpoint's template channels (80) to the model's templates (10), is tiled back, divided.
    """
    from vocalign_hf.models.catseg.convert_catseg_checkpoint import convert_state_dict

    port = model.state_dict()
    keys = _expand_layers(template, port)
    probe = {key: torch.full((3, 1), float(index)) for index, key in enumerate(keys)}
    landed: dict[int, list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
    for port_key, value in convert_state_dict(probe).items():  # no num_templates: no folding
        landed[int(value.flatten()[0])].append((port_key, tuple(value.shape)))
    out: dict[str, torch.Tensor] = {}
    for index, key in enumerate(keys):
        targets = landed.get(index)
        if not targets:
            out[key] = template[key].clone()
            continue
        shapes = {shape for _, shape in targets}
        if len(targets) == 1 and shapes == {(3, 1)}:
            value = port[targets[0][0]]
        elif len(targets) == 1 and shapes == {(1, 3)}:
            value = port[targets[0][0]].t().contiguous()
        elif len(targets) == 3 and shapes == {(1, 1)}:
            value = torch.cat([port[port_key] for port_key, _ in targets])
        else:
            raise ValueError(f"cannot invert the converter's mapping of {key}: {targets}")
        if targets[0][0] == "catseg.aggregator.conv1.weight" and template[key].shape[1] != value.shape[1]:
            repeats = template[key].shape[1] // value.shape[1]
            value = value.repeat(1, repeats, 1, 1) / repeats
        out[key] = value if value.dtype != torch.float32 else value.clone()
    return out


def model_configs(small: bool) -> dict[str, Any]:
    """The port configs the checkpoints are written for: the real sizes, or the fixtures' tiny ones (--small)."""
    from safetensors.torch import load_file

    from vocalign_hf import CATSegConfig
    from vocalign_hf.models.catseg.convert_catseg_checkpoint import infer_config

    templates = {name: load_file(str(FIXTURES / name / "state_dict.safetensors"))
                 for name in ("catseg_v1_reference", "catseg_reference")}
    templates = {name: {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
                 for name, state in templates.items()}
    if small:
        v1 = infer_config(templates["catseg_v1_reference"])
        cvpr24 = infer_config(templates["catseg_reference"], guidance_layers=[1, 2])
    else:
        # CAT-Seg v1 as VocAlign configures it (CLIP ViT-B/16, ResNet-101's first three stages, 10 templates folded
        # from 80 checkpoint channels, class pooling 1x1, mmcv FFN) and the CVPR'24 ViT-B/16 release (the defaults).
        v1 = CATSegConfig(variant="v1", prompt_templates="vocalign_select_clip", pooling_size=[1, 1], pad_len=0,
                          class_mlp_adds_input=True)
        cvpr24 = CATSegConfig()
    return {"v1": (v1, templates["catseg_v1_reference"]), "cvpr24": (cvpr24, templates["catseg_reference"])}


def write_official_checkpoint(config, template, path: Path, layout: str, seed: int = 0) -> int:
    """A seeded random model of `config` saved as the official file (`layout` "v1": mmengine, else detectron2);
    returns its number of tensors."""
    from vocalign_hf import CATSegForSemanticSegmentation

    torch.manual_seed(seed)
    model = CATSegForSemanticSegmentation(config).eval()
    state = official_state_dict(model, template)
    blob = ({"meta": {"mmseg_version": "1.2.2", "iter": 80000}, "state_dict": state} if layout == "v1"
            else {"model": state, "iteration": 79999})
    torch.save(blob, path)
    return len(state)


# -------------------------------------------------------------------------------------------- Cityscapes folder
# (labelId, trainId colour) of the regions the generated street scenes are made of; ignored ids among them.
_IGNORED_COLOUR = (81, 0, 81)


def _label_colours() -> dict[int, tuple[int, int, int]]:
    from vocalign_hf.data.dataset_info import CITYSCAPES_LABEL_ID_TO_TRAIN_ID, get_dataset_info

    palette = get_dataset_info("cityscapes").palette
    return {label: (tuple(palette[train]) if train != 255 else _IGNORED_COLOUR)
            for label, train in CITYSCAPES_LABEL_ID_TO_TRAIN_ID.items() if label >= 0}


def street_scene(width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB street-like image and its `labelIds` map: sky, buildings, vegetation, road and sidewalk bands, cars,
    people, poles and signs, plus ignored regions (ego vehicle, out of roi, static, guard rail, parking)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.uint8)  # 0: unlabeled
    horizon = int(height * rng.uniform(0.4, 0.5))
    labels[:horizon] = 23  # sky
    skyline = horizon - (rng.uniform(0.1, 0.35, size=width // 64 + 1) * height).astype(int)
    for i, top in enumerate(skyline):
        labels[max(top, 0):horizon, i * 64:(i + 1) * 64] = rng.choice([11, 11, 21, 12, 15])  # building, tree, wall, bridge
    labels[horizon:] = 7  # road
    sidewalk = horizon + int(height * 0.08)
    labels[horizon:sidewalk, : width // 3] = 8
    labels[horizon:sidewalk, -width // 4:] = rng.choice([8, 9, 22])  # sidewalk, parking or terrain
    labels[horizon:sidewalk, width // 3: width // 3 + width // 10] = 14  # guard rail
    for _ in range(int(rng.integers(3, 7))):  # cars, a truck or a bus
        w, h = int(width * rng.uniform(0.06, 0.15)), int(height * rng.uniform(0.06, 0.12))
        x, y = int(rng.integers(0, width - w)), int(horizon + rng.integers(0, max(height // 6, 1)))
        labels[y:y + h, x:x + w] = rng.choice([26, 26, 27, 28, 29])
    for _ in range(int(rng.integers(2, 6))):  # people, riders and poles with signs
        x = int(rng.integers(0, width - width // 80))
        h = int(height * rng.uniform(0.08, 0.2))
        labels[horizon - h // 2: horizon + h // 2, x: x + width // 80] = rng.choice([24, 25, 17])
        labels[horizon - h // 2 - height // 40: horizon - h // 2, x: x + width // 40] = rng.choice([19, 20])
    labels[-height // 10:, width // 5: -width // 5] = 1  # ego vehicle
    labels[:, : width // 100] = 3  # out of roi
    labels[horizon - height // 30: horizon, width // 2: width // 2 + width // 12] = 4  # static
    colours = _label_colours()
    lut = np.zeros((256, 3), np.uint8)
    for label, colour in colours.items():
        lut[label] = colour
    image = lut[labels].astype(np.int16)
    shade = np.linspace(-25, 25, height, dtype=np.float32)[:, None, None]
    noise = rng.normal(0, 12, size=(height // 4 + 1, width // 4 + 1, 3)).astype(np.float32)
    noise = noise.repeat(4, axis=0).repeat(4, axis=1)[:height, :width]
    image = np.clip(image + shade + noise, 0, 255).astype(np.uint8)
    return image, labels


def write_cityscapes_folder(root: Path, size: tuple[int, int], train_images: int, val_images: int = 2) -> dict:
    """The official layout under `root`, as unpacked from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip."""
    from PIL import Image

    width, height = size
    written = {}
    for split, city, count, first_seed in (("train", "aachen", train_images, 0), ("val", "frankfurt", val_images, 1000)):
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            image, labels = street_scene(width, height, first_seed + i)
            for folder, suffix, array in (("leftImg8bit", "_leftImg8bit.png", image),
                                          ("gtFine", "_gtFine_labelIds.png", labels)):
                path = root / folder / split / city / (stem + suffix)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, compress_level=1)
        written[split] = count
    return written


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class Rehearsal:
    work: Path
    small: bool
    sizes: dict[str, Any]
    hub_url: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    _children_peak_mib: float = 0.0
    _command_count: int = 0

    @property
    def data_root(self) -> Path:
        return self.work / "cityscapes"

    @property
    def output_dir(self) -> Path:
        return self.work / "runs" / "cityscapes"

    def env(self) -> dict[str, str]:
        """A user's environment: the loopback Hub as endpoint, a fresh Hugging Face home, this checkout first."""
        from hub_server import DEFAULT_TOKEN

        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=self.hub_url, HF_TOKEN=DEFAULT_TOKEN, HF_HOME=str(self.work / "hf_home"),
                   HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
        return env

    def command(self, stage: str, argv: list[str], expect: int | set[int] = 0, timeout: float | None = None) -> str:
        """Run `argv` (output to `<work>/logs/`), note its peak memory (its own and its children's: `wait4`), check
        its exit status and return its output."""
        self._command_count += 1
        log = self.work / "logs" / f"{self._command_count:02d}-{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            handle.write("$ " + " ".join(argv) + "\n")
            handle.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            start = time.monotonic()
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if timeout and time.monotonic() - start > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                time.sleep(0.05)
            proc.returncode = os.waitstatus_to_exitcode(status)
        self._children_peak_mib = max(self._children_peak_mib, usage.ru_maxrss / 1024)
        text = log.read_text()
        allowed = {expect} if isinstance(expect, int) else expect
        if proc.returncode not in allowed:
            tail = "\n".join(text.strip().splitlines()[-25:])
            raise RuntimeError(f"{' '.join(argv[:4])} ... exited with {proc.returncode} (log {log}):\n{tail}")
        return text

    def run_stage(self, name: str, function: Callable[["Rehearsal"], dict[str, Any] | None]) -> dict[str, Any]:
        trim_memory()
        meter = MemoryMeter("cpu")
        self._children_peak_mib = 0.0
        meter.start()
        start = time.perf_counter()
        row: dict[str, Any] = {"stage": name}
        try:
            row.update(function(self) or {})
            row["ok"] = True
        except Exception as error:  # noqa: BLE001 - reported in the table, and the run stops
            row["ok"] = False
            row["error"] = f"{type(error).__name__}: {error}"
        row["seconds"] = round(time.perf_counter() - start, 1)
        meter.stop()
        row["peak_mib_here"] = round(meter.peak_mib, 1)
        row["peak_mib_commands"] = round(self._children_peak_mib, 1)
        row["peak_mib"] = max(row["peak_mib_here"], row["peak_mib_commands"])
        self.results[name] = row
        status = "ok" if row["ok"] else "FAILED"
        print(f"[{name}] {status} in {row['seconds']:.1f} s, peak {row['peak_mib']:.0f} MiB", flush=True)
        if not row["ok"]:
            print(row["error"], flush=True)
        return row

    # --- paths and flags shared by the stages
    def base_model(self) -> str:
        return V1_REPO

    def adapt_flags(self) -> list[str]:
        s = self.sizes
        return ["--dataset", "cityscapes", "--data_root", str(self.data_root), "--base_model", self.base_model(),
                "--output_dir", str(self.output_dir), "--max_steps", str(s["max_steps"]),
                "--save_steps", str(s["save_steps"]), "--disable_tqdm", "true", *s["extra_flags"]] + (
                    ["--concepts", str(self.work / SMALL_CONCEPTS_FILE)] if self.small else [])


def _runtime_logs(text: str) -> dict[str, float]:
    """The run times the Trainer printed in its metric dicts (`{'train_runtime': '1.62', ...}`,
    `{'zero_shot_runtime': ...}`: `<prefix>_runtime` of each evaluation), by prefix; the last of each."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and "_runtime'" in line):
            continue
        try:
            logged = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            continue
        for key, value in logged.items():
            if key.endswith("_runtime") and not key.endswith("preparation_time"):
                found[key[: -len("_runtime")]] = float(value)
    return found


# ----------------------------------------------------------------------------------------------------- stages
def write_checkpoints(r: Rehearsal) -> dict[str, Any]:
    configs = model_configs(r.small)
    detail = {}
    for layout, filename in (("v1", V1_FILE), ("cvpr24", CVPR24_FILE)):
        config, template = configs[layout]
        path = r.work / "checkpoints" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = write_official_checkpoint(config, template, path, layout)
        detail[layout] = {"file": filename, "tensors": tensors, "mib": round(path.stat().st_size / 2**20, 1)}
        trim_memory()
    return {"detail": detail}


def convert(r: Rehearsal) -> dict[str, Any]:
    s = r.sizes
    for filename, folder, repo, flags in ((V1_FILE, "catseg-v1-r101", V1_REPO, s["v1_convert_flags"]),
                                          (CVPR24_FILE, "catseg-vitb-384", CVPR24_REPO, s["cvpr24_convert_flags"])):
        r.command("convert", ["convert-catseg-checkpoint", str(r.work / "checkpoints" / filename),
                              str(r.work / folder), "--push-to-hub", repo, *flags])
    return {}


def write_cityscapes(r: Rehearsal) -> dict[str, Any]:
    written = write_cityscapes_folder(r.data_root, r.sizes["image_size"], r.sizes["train_images"])
    if r.small:  # a few concepts: the shipped set's 115 entries cost seconds an image at 2048x1024 on any model
        (r.work / SMALL_CONCEPTS_FILE).write_text(json.dumps(SMALL_CONCEPTS))
    return {"detail": {"images": written, "size": list(r.sizes["image_size"])}}


def adapt_killed(r: Rehearsal) -> dict[str, Any]:
    # kill_probe runs recipes/adapt.py in its process and SIGKILLs it inside the save of checkpoint-<kill_step>.
    # --eval_zero_shot false: the killed run only has to reach its checkpoints (the resumed run evaluates).
    text = r.command("adapt_killed", ["accelerate", "launch", "--num_processes", "1", str(ROOT / "tests" / "kill_probe.py"),
                                      str(r.sizes["kill_step"]), *r.adapt_flags(), "--eval_zero_shot", "false"],
                     expect=set(range(1, 256)) | {-9})
    checkpoints = sorted(p.name for p in r.output_dir.glob("checkpoint-*"))
    complete = [p.name for p in r.output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if f"checkpoint-{r.sizes['kill_step']}" not in checkpoints:
        raise RuntimeError(f"the run was not killed in checkpoint-{r.sizes['kill_step']}: found {checkpoints}")
    return {"detail": {"checkpoints": checkpoints, "complete": sorted(complete)}, "runtimes_s": _runtime_logs(text)}


def adapt_resumed(r: Rehearsal) -> dict[str, Any]:
    text = r.command("adapt_resumed", ["accelerate", "launch", "--num_processes", "1", "recipes/adapt.py",
                                       *r.adapt_flags(), "--resume_from_checkpoint", "true",
                                       "--push_adapter_to_hub", ADAPTER_REPO])
    results = json.loads((r.output_dir / "results.json").read_text())
    info = json.loads((r.output_dir / "adapter" / "vocalign.json").read_text())
    logs = _runtime_logs(text)
    resumed_from = info.get("resumed_from") or info.get("settings", {}).get("resumed_from")
    return {"detail": {"miou": {k: v for k, v in results.items() if k.endswith("_miou")}, "resumed_from": resumed_from,
                       "pushed": f"adapter pushed to {ADAPTER_REPO}" in text},
            "runtimes_s": logs, "train_runtime_s": logs.get("train"),
            "steps_run": r.sizes["max_steps"] - r.sizes["save_steps"] * ((r.sizes["kill_step"] - 1) // r.sizes["save_steps"])}


def evaluate(r: Rehearsal, adapter: bool = True, max_eval_images: int | None = None) -> dict[str, Any]:
    argv = ["python", "recipes/evaluate.py", "--dataset", "cityscapes", "--data_root", str(r.data_root),
            "--base_model", r.base_model(), "--output_dir", str(r.work / "runs" / "evaluate"), "--disable_tqdm", "true"]
    if adapter:
        argv += ["--adapter", str(r.output_dir / "adapter")]
    if max_eval_images:
        argv += ["--max_eval_images", str(max_eval_images)]
    text = r.command("evaluate", argv)
    images = max_eval_images or 2
    miou = re.search(r"mIoU ([\d.]+)", text)
    return {"detail": {"miou": float(miou.group(1)) if miou else None, "images": images},
            "eval_runtime_s": _runtime_logs(text).get("eval"), "eval_images": images}


def evaluate_one(r: Rehearsal) -> dict[str, Any]:
    return evaluate(r, adapter=False, max_eval_images=1)


_CLIENT_PRELUDE = """
import json, sys, torch
from PIL import Image
from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor

def fixed_logits(model, processor, classes):
    # one 384x384 crop of the first validation image, the adapter's classes
    image = Image.open(sys.argv[1]).convert("RGB").crop((0, 0, 384, 384))
    inputs = processor(images=image, text=classes)
    with torch.no_grad():
        return model.eval()(**inputs).logits
"""


def _first_val_image(r: Rehearsal) -> Path:
    return sorted((r.data_root / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0]


def peft_load(r: Rehearsal) -> dict[str, Any]:
    code = _CLIENT_PRELUDE + textwrap.dedent(f"""
    from peft import PeftModel
    from vocalign_hf.adaptation import load_adapted_model
    processor = CATSegProcessor.from_pretrained({V1_REPO!r})
    plain = PeftModel.from_pretrained(CATSegForSemanticSegmentation.from_pretrained({V1_REPO!r}), {ADAPTER_REPO!r})
    local, info = load_adapted_model({str(r.work / "catseg-v1-r101")!r}, {str(r.output_dir / "adapter")!r})
    classes = info["class_names"]
    a, b = fixed_logits(plain, processor, classes), fixed_logits(local, processor, classes)
    torch.save(a, sys.argv[2])
    print(json.dumps({{"max_abs_diff": (a - b).abs().max().item(), "shape": list(a.shape)}}))
    """)
    text = r.command("peft_load", ["python", "-c", code, str(_first_val_image(r)), str(r.work / "peft_logits.pt")])
    result = json.loads(text.strip().splitlines()[-1])
    if result["max_abs_diff"] != 0:
        raise RuntimeError(f"plain peft from the Hub and the local adapter differ by {result['max_abs_diff']}")
    return {"detail": result}


def merge(r: Rehearsal) -> dict[str, Any]:
    """`vocalign-merge`, then (here: this process has transformers loaded already) the merged folder's logits on
    peft's input, which must match peft's up to the merge's rounding."""
    from PIL import Image

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor

    merged = r.work / "runs" / "merged"
    r.command("merge", ["vocalign-merge", V1_REPO, str(r.output_dir / "adapter"), str(merged)])
    model = CATSegForSemanticSegmentation.from_pretrained(merged).eval()
    processor = CATSegProcessor.from_pretrained(merged)
    classes = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    image = Image.open(_first_val_image(r)).convert("RGB").crop((0, 0, 384, 384))
    with torch.no_grad():
        logits = model(**processor(images=image, text=classes)).logits
    difference = (logits - torch.load(r.work / "peft_logits.pt")).abs().max().item()
    if not difference <= 1e-3:
        raise RuntimeError(f"the merged model's logits differ from peft's by {difference}")
    return {"detail": {"max_abs_diff": difference, "classes": len(classes)}}


def pipeline(r: Rehearsal) -> dict[str, Any]:
    code = textwrap.dedent(f"""
    import json, sys, time
    from PIL import Image
    from transformers import pipeline
    import vocalign_hf  # registers the task and the CAT-Seg classes (README)
    from vocalign_hf.data.dataset_info import get_dataset_info
    segmenter = pipeline("zero-shot-image-segmentation", model={CVPR24_REPO!r})
    image = Image.open(sys.argv[1])
    start = time.perf_counter()
    segments = segmenter(image, candidate_labels=list(get_dataset_info("cityscapes").class_names))
    seconds = time.perf_counter() - start
    assert all(s["mask"].size == image.size for s in segments)
    print(json.dumps({{"segments": len(segments), "call_s": round(seconds, 2), "image": list(image.size)}}))
    """)
    text = r.command("pipeline", ["python", "-c", code, str(_first_val_image(r))])
    return {"detail": json.loads(text.strip().splitlines()[-1])}


STAGE_FUNCTIONS: dict[str, Callable[[Rehearsal], dict[str, Any] | None]] = {
    "write_checkpoints": write_checkpoints, "convert": convert, "write_cityscapes": write_cityscapes,
    "adapt_killed": adapt_killed, "adapt_resumed": adapt_resumed, "evaluate": evaluate, "peft_load": peft_load,
    "merge": merge, "pipeline": pipeline, "evaluate_one": evaluate_one,
}


# ------------------------------------------------------------------------------------------------- summary
def extrapolate(results: dict[str, dict[str, Any]], sizes: dict[str, Any]) -> dict[str, Any]:
    """The paper's 40k iterations and a 500-image validation pass at the measured rates."""
    out: dict[str, Any] = {}
    resumed = results.get("adapt_resumed", {})
    if resumed.get("train_runtime_s") and resumed.get("steps_run"):
        step = resumed["train_runtime_s"] / resumed["steps_run"]
        out["seconds_per_step"] = round(step, 2)
        out["paper_40k_steps_hours"] = round(step * PAPER_STEPS / 3600, 1)
    for name in ("evaluate", "evaluate_one"):
        row = results.get(name, {})
        if row.get("eval_runtime_s") and row.get("eval_images"):
            image = row["eval_runtime_s"] / row["eval_images"]
            out["seconds_per_val_image"] = round(image, 2)
            out["val_500_images_hours"] = round(image * PAPER_VAL_IMAGES / 3600, 2)
            break
    return out


def print_summary(results: dict[str, dict[str, Any]], projection: dict[str, Any]) -> None:
    rows = [{**row, "ok": "ok" if row["ok"] else "FAILED"} for row in results.values()]
    print(markdown_table(rows, [("stage", "stage"), ("ok", "status"), ("seconds", "wall s"),
                                ("peak_mib", "peak MiB"), ("peak_mib_here", "here"),
                                ("peak_mib_commands", "commands")]))
    if "seconds_per_step" in projection:
        print(f"training: {projection['seconds_per_step']} s a step -> the paper's {PAPER_STEPS} iterations: "
              f"{projection['paper_40k_steps_hours']} h on this machine")
    if "seconds_per_val_image" in projection:
        print(f"evaluation: {projection['seconds_per_val_image']} s an image (sliding window, full resolution) -> "
              f"{PAPER_VAL_IMAGES} validation images: {projection['val_500_images_hours']} h a pass "
              "(adapt.py makes four: zero-shot, with concepts, adapted, adapted with the names alone)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny models, 256x128 images, 2 steps (the test)")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES + EXTRA_STAGES,
                        help="stages to run, in this order (later stages need the earlier ones' outputs)")
    parser.add_argument("--workdir", default=None, help="working folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    options = parser.parse_args(argv)

    from hub_server import HubServer

    sizes = SMALL if options.small else FULL
    print_header("rehearsal of the user path" + (" (--small)" if options.small else " (full size)"), "cpu")
    work = Path(options.workdir or tempfile.mkdtemp(prefix="vocalign-rehearsal-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"# working folder: {work}", flush=True)
    rehearsal = Rehearsal(work=work, small=options.small, sizes=sizes)
    try:
        with HubServer() as hub:
            rehearsal.hub_url = hub.url
            for name in options.stages:
                if not rehearsal.run_stage(name, STAGE_FUNCTIONS[name])["ok"]:
                    break
    finally:
        if not options.workdir and not options.keep:
            shutil.rmtree(work, ignore_errors=True)
    projection = extrapolate(rehearsal.results, sizes)
    print_summary(rehearsal.results, projection)
    report = {"small": options.small, "sizes": sizes, "stages": rehearsal.results, "projection": projection,
              "ok": all(row["ok"] for row in rehearsal.results.values())
                    and len(rehearsal.results) == len(options.stages)}
    if options.output:
        Path(options.output).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
