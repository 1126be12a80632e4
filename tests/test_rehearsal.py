"""benchmarks/rehearsal.py: the user's path (official checkpoints converted, Cityscapes layout, accelerate launch
killed and resumed, push, plain-peft load, merge, pipeline), here at --small shapes; the full size is documented in
docs/performance.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import rehearsal  # noqa: E402


@pytest.mark.parametrize("layout", ["v1", "cvpr24"])
def test_official_layout_converts_back_to_the_model(layout):
    """The checkpoint writer inverts the converter: the fixture's official keys (same layout, same key set at the
    fixtures' size), and convert_checkpoint gives the written model's weights back."""
    from vocalign_hf import CATSegForSemanticSegmentation
    from vocalign_hf.models.catseg.convert_catseg_checkpoint import convert_checkpoint

    config, template = rehearsal.model_configs(small=True)[layout]
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation(config).eval()
    state = rehearsal.official_state_dict(model, template)
    assert set(state) == set(template)
    assert all(state[k].shape == template[k].shape and state[k].dtype == template[k].dtype for k in state)
    back = convert_checkpoint(state, **({"guidance_layers": [1, 2]} if layout == "cvpr24" else {})).state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=1e-6, msg=key)


def test_layers_are_expanded_to_the_models_depth():
    """At real size the CLIP towers have 12 layers where the fixtures have 4 and 2: the official keys follow."""
    from vocalign_hf import CATSegConfig

    _, template = rehearsal.model_configs(small=True)["v1"]
    port_keys = {f"catseg.clip.{tower}.encoder.layers.{i}.layer_norm1.weight": None
                 for tower, n in (("vision_model", 6), ("text_model", 3)) for i in range(n)}
    keys = rehearsal._expand_layers(template, port_keys)
    assert "backbone.clip_model.visual.transformer.resblocks.5.attn.in_proj_weight" in keys
    assert "backbone.clip_model.visual.transformer.resblocks.6.attn.in_proj_weight" not in keys
    assert "backbone.clip_model.transformer.resblocks.2.mlp.c_fc.weight" in keys
    assert "backbone.clip_model.transformer.resblocks.3.mlp.c_fc.weight" not in keys
    assert CATSegConfig(variant="v1").clip_config.vision_config.num_hidden_layers == 12


def test_street_scene_has_ignored_ids_and_train_classes():
    image, labels = rehearsal.street_scene(256, 128, seed=0)
    assert image.shape == (128, 256, 3) and labels.shape == (128, 256)
    ids = set(labels.flatten().tolist())
    assert {1, 3, 4, 14} <= ids and {7, 8, 23} <= ids  # ego vehicle, out of roi, static, guard rail; road, sidewalk, sky


def test_small_rehearsal_runs_the_whole_path(tmp_path):
    """`--small` end to end, as a user's commands run it (about 2 minutes of CPU, most of it starting Python
    processes that import transformers)."""
    output = tmp_path / "rehearsal.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rehearsal.py"), "--small", "--workdir",
                           str(tmp_path / "work"), "--output", str(output)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(output.read_text())
    stages = report["stages"]
    assert list(stages) == rehearsal.STAGES and report["ok"]
    assert stages["adapt_killed"]["detail"] == {"checkpoints": ["checkpoint-1", "checkpoint-2"], "complete": ["checkpoint-1"]}
    resumed = stages["adapt_resumed"]["detail"]
    assert resumed["resumed_from"]["step"] == 1 and resumed["pushed"]
    assert {"zero_shot_miou", "zero_shot_concepts_miou", "adapted_miou"} <= set(resumed["miou"])
    assert stages["peft_load"]["detail"]["max_abs_diff"] == 0
    assert stages["pipeline"]["detail"]["segments"] >= 1
    assert all(row["peak_mib"] > 0 and row["seconds"] > 0 for row in stages.values())
    assert {"seconds_per_step", "paper_40k_steps_hours", "seconds_per_val_image", "val_500_images_hours"} <= set(report["projection"])
    assert "| adapt_resumed | ok |" in proc.stdout
