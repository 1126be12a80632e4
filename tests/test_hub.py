"""Publishing and loading through a Hub on 127.0.0.1 (`hub_server.HubServer`) with the real clients:
`huggingface_hub`, `transformers` (remote code), `peft` and `datasets`.

Client code runs in fresh Python processes whose `HF_ENDPOINT` points at the loopback Hub, exactly as a user's
would; the remote-code check also makes `vocalign_hf` unimportable there. In-process calls that only need the
endpoint (the converter's and the recipe's push) patch `huggingface_hub.constants.ENDPOINT` / `HF_HUB_CACHE`,
which the client reads at call time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_server import DEFAULT_TOKEN, HubServer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "catseg_reference"
BLOCK_VOCALIGN = "import sys; sys.modules['vocalign_hf'] = None  # a plain transformers user\n"


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """Environment of a client process (and of this one's huggingface_hub) talking to the loopback Hub."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url, HF_TOKEN=DEFAULT_TOKEN, HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5",
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)]),
    )
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    return env


def run_client(
    code: str, env: dict, cwd: Path, expect_ok: bool = True, block_vocalign: bool = False
) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; its last stdout line is returned parsed as JSON in `.result`."""
    code = (BLOCK_VOCALIGN if block_vocalign else "") + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, f"client failed:\n{proc.stderr[-4000:]}"
        proc.result = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc


def tiny_pth(path: Path) -> Path:
    """The seeded tiny CAT-Seg of the parity fixture, saved as a detectron2-style `.pth` (`{"model": ...}`)."""
    state = load_file(str(FIXTURE / "state_dict.safetensors"))
    torch.save({"model": state, "iteration": 0}, path)
    return path


def _image_and_classes():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)), ["road", "sky", "car"]


# --- converted model: remote code, card, safe loading ---------------------------------------------------------------

CONVERT_FLAGS = ["--guidance-layers", "1", "2", "--clip-resolution", "64"]


def test_converted_model_round_trip_with_remote_code(hub, hub_env, tmp_path):
    from huggingface_hub import ModelCard

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    from vocalign_hf.models.catseg.convert_catseg_checkpoint import file_sha256, main

    checkpoint = tiny_pth(tmp_path / "model_tiny.pth")
    main([str(checkpoint), str(tmp_path / "out"), *CONVERT_FLAGS, "--push-to-hub", "org/catseg-tiny"])

    image, classes = _image_and_classes()
    local = CATSegForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    processor = CATSegProcessor.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        expected = local(**processor(images=image, text=classes)).logits
    torch.save(expected, tmp_path / "expected.pt")

    # One commit holds weights, processor, modeling code and card.
    repo = hub.repo("org/catseg-tiny")
    files = repo.commits[repo.branches["main"]].files
    assert {"config.json", "model.safetensors", "modeling_catseg.py", "configuration_catseg.py",
            "processing_catseg.py", "image_processing_catseg.py", "tokenizer.json", "README.md"} <= set(files)
    assert files["model.safetensors"].lfs and not files["config.json"].lfs
    assert len(repo.commits) == 2  # the repo's initial commit + one upload

    result = run_client(f"""
        import json, torch
        try:
            import vocalign_hf
            raise SystemExit("vocalign_hf should not be importable here")
        except ImportError:
            pass
        from PIL import Image
        import numpy as np
        from transformers import AutoModelForSemanticSegmentation, AutoProcessor
        model = AutoModelForSemanticSegmentation.from_pretrained("org/catseg-tiny", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("org/catseg-tiny", trust_remote_code=True)
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        with torch.no_grad():
            logits = model(**processor(images=image, text={classes!r})).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        print(json.dumps({{"diff": (logits - expected).abs().max().item(), "model": type(model).__module__,
                           "processor": type(processor).__module__}}))
    """, hub_env, tmp_path, block_vocalign=True).result
    assert result["diff"] == 0.0
    assert result["model"].startswith("transformers_modules.") and result["processor"].startswith("transformers_modules.")

    card = ModelCard(files["README.md"].content.decode())
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-segmentation" and data["library_name"] == "transformers"
    assert data["license"] == "mit" and "catseg" in data["tags"]
    assert file_sha256(checkpoint) in card.text and "model_tiny.pth" in card.text
    assert 'from_pretrained("org/catseg-tiny", trust_remote_code=True)' in card.text
    assert "@inproceedings{cho2024catseg" in card.text


def test_converted_card_names_the_clip_checkpoint():
    from conftest import tiny_catseg_config

    from vocalign_hf.models.catseg.convert_catseg_checkpoint import build_converted_model_card, clip_base_model

    base = tiny_catseg_config()
    for width, patch, expected in ((768, 16, "openai/clip-vit-base-patch16"),
                                   (1024, 14, "openai/clip-vit-large-patch14-336"), (32, 8, None)):
        base.clip_config.vision_config.hidden_size, base.clip_config.vision_config.patch_size = width, patch
        assert clip_base_model(base) == expected
        card = build_converted_model_card(base, "model_base.pth", "ab" * 32, "org/m")
        assert card.data.to_dict().get("base_model") == expected


def test_converter_refuses_arbitrary_pickles_unless_allowed(tmp_path):
    import collections

    from vocalign_hf.models.catseg.convert_catseg_checkpoint import CheckpointConversionError, load_reference_state_dict

    state = load_file(str(FIXTURE / "state_dict.safetensors"))
    path = tmp_path / "with_meta.pth"
    # An object that is not a tensor, container or plain value, as mmengine's `meta` holds.
    torch.save({"model": state, "meta": collections.Counter(a=1), "history": _Opaque()}, path)
    with pytest.raises(CheckpointConversionError, match="--allow-unsafe-pickle") as info:
        load_reference_state_dict(path)
    assert "_Opaque" in str(info.value) and str(path) in str(info.value)
    loaded = load_reference_state_dict(path, allow_unsafe_pickle=True)
    assert set(loaded) == set(state)
    # A plain detectron2-style file needs no flag.
    assert set(load_reference_state_dict(tiny_pth(tmp_path / "plain.pth"))) == set(state)


class _Opaque:
    """Stands for a training-framework object pickled into a checkpoint."""
