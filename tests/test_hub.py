"""Publishing and loading through a Hub on 127.0.0.1 (`hub_server.HubServer`) with the real clients:
`huggingface_hub`, `transformers` (remote code), `peft` and `datasets`.

The round trips end in fresh Python processes whose `HF_ENDPOINT` points at the loopback Hub, as a user's would;
the remote-code check also makes `vocalign_hf` unimportable there. Calls made in this process (the converter's and
the recipe's pushes, the revision and error checks) use the same Hub and cache by patching
`huggingface_hub.constants.ENDPOINT` / `HF_HUB_CACHE`, which the client reads at call time (the module-level values
were fixed when it was imported).
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


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_home")


def client_env(hub: HubServer, home: Path, **extra: str) -> dict:
    """Environment of a client process talking to the loopback Hub, with its own Hub cache under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url, HF_TOKEN=DEFAULT_TOKEN, HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5",
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)]),
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def hub_env(hub, hub_home):
    """A client environment, and this process's huggingface_hub pointed at the same Hub and cache (it reads these
    constants at call time; the module-level values were fixed when it was imported)."""
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api
    import transformers.utils.hub

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", hub.url)
        patch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)  # behind the module-level functions
        # transformers' shared HfApi keeps the endpoint it was made with: a fresh one is made on first use here.
        patch.setattr(transformers.utils.hub, "_hf_api", None)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setenv("HF_TOKEN", DEFAULT_TOKEN)
        yield client_env(hub, hub_home)


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
    assert result["model"].startswith("transformers_modules.")
    assert result["processor"].startswith("transformers_modules.")

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


# --- adapters: the recipe's push, loading with vocalign_hf and plain peft, revisions, cards --------------------------

WORLD_CONFIG = ROOT / "recipes" / "configs" / "world.yaml"
TINY_WORLD = [
    "--world_image_size", "32", "--world_num_source_train", "8", "--world_num_target_train", "8",
    "--world_num_target_eval", "4", "--max_steps", "2", "--per_device_train_batch_size", "2",
    "--num_overlays", "0", "--disable_tqdm", "true", "--save_steps", "1000",
]


def _upload(folder: Path, repo_id: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder)).oid


def _lora_weights(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def published(hub, hub_env, tmp_path_factory):
    """A tiny base model on the Hub (`org/base`), adapted by the recipe with `--push_adapter_to_hub org/adapter`,
    plus the Trainer's own flags naming the same repo (one push path: they must not push a second time)."""
    from conftest import tiny_catseg_config

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    from vocalign_hf.recipes import parse_recipe_args, run_adaptation

    work = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    config = tiny_catseg_config()
    CATSegForSemanticSegmentation(config).save_pretrained(work / "base")
    CATSegProcessor.from_config(config).save_pretrained(work / "base")
    base_sha = _upload(work / "base", "org/base")
    flags = ["--config", str(WORLD_CONFIG), "--output_dir", str(work / "run"), "--base_model", "org/base",
             "--push_adapter_to_hub", "org/adapter", "--push_to_hub", "true", "--hub_model_id", "org/adapter",
             *TINY_WORLD]
    results = run_adaptation(*parse_recipe_args(flags))
    return {"work": work, "base_sha": base_sha, "results": results, "adapter": work / "run" / "adapter"}


def _logits_script(base: str, adapter: str) -> str:
    """Client code printing, as JSON, the logits of `adapter` on `base` for a fixed input, loaded with
    `load_adapted_model` and with plain `PeftModel.from_pretrained`."""
    return f"""
import json, torch
from peft import PeftModel
from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.adaptation import load_adapted_model

def logits(model):
    torch.manual_seed(1)
    x, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 49406, (3, 1, 6))
    with torch.no_grad():
        return model(pixel_values=x, input_ids=ids).logits.flatten().tolist()

vocalign, info = load_adapted_model({base!r}, {adapter!r})
plain = PeftModel.from_pretrained(CATSegForSemanticSegmentation.from_pretrained({base!r}), {adapter!r}).eval()
print(json.dumps({{"vocalign": logits(vocalign), "peft": logits(plain), "classes": info["class_names"]}}))
"""


def _fixed_input_logits(model) -> torch.Tensor:
    """What `_logits_script` computes for a model, in this process, with the client's one thread (`client_env`): the
    thread count can change float sums, and the comparisons are bitwise."""
    torch.manual_seed(1)
    x, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 49406, (3, 1, 6))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(pixel_values=x, input_ids=ids).logits.flatten()
    finally:
        torch.set_num_threads(threads)


def _local_logits(base, adapter) -> torch.Tensor:
    from vocalign_hf.adaptation import load_adapted_model

    return _fixed_input_logits(load_adapted_model(base, adapter)[0])


def test_recipe_pushes_an_adapter_that_loads_with_vocalign_and_plain_peft(hub, hub_env, published, tmp_path):
    repo = hub.repo("org/adapter")
    files = repo.commits[repo.branches["main"]].files
    assert {"adapter_config.json", "adapter_model.safetensors", "vocalign.json", "README.md"} <= set(files)
    assert files["adapter_model.safetensors"].lfs
    assert len(repo.commits) == 2, "one upload after the repo's initial commit: the Trainer did not push on its own"
    info = json.loads(files["vocalign.json"].content)
    assert info["base_model_repo_id"] == "org/base" and info["base_model_revision"] == published["base_sha"]
    assert json.loads(files["adapter_config.json"].content)["revision"] == published["base_sha"]

    expected = _local_logits(str(published["work"] / "base"), published["adapter"])
    result = run_client(_logits_script("org/base", "org/adapter"), hub_env, tmp_path).result
    assert torch.equal(torch.tensor(result["vocalign"]), expected)
    assert torch.equal(torch.tensor(result["peft"]), expected)
    assert result["classes"] == info["class_names"]


def test_offline_mode_loads_from_the_cache(hub, hub_env, published, tmp_path):
    """After a first load (the test above, or this one's warm-up), HF_HUB_OFFLINE=1 loads base and adapter from
    the local cache without a single request to the Hub."""
    from vocalign_hf.adaptation import load_adapted_model

    load_adapted_model("org/base", "org/adapter")  # fills this process's (shared) cache
    before = len(hub.requests)
    offline = dict(hub_env, HF_HUB_OFFLINE="1")
    result = run_client(_logits_script("org/base", "org/adapter"), offline, tmp_path).result
    assert len(hub.requests) == before, hub.requests[before:]
    assert torch.equal(torch.tensor(result["vocalign"]), torch.tensor(result["peft"]))


def test_missing_repo_bad_token_and_server_error_are_clear(hub, hub_env, published, monkeypatch):
    from vocalign_hf.adaptation import load_adapted_model, push_adapter_to_hub
    from vocalign_hf.adaptation.adapters import AdapterLoadError

    with pytest.raises(AdapterLoadError, match="'org/no-such-adapter'.*Repository Not Found.*Check the repo id"):
        load_adapted_model("org/base", "org/no-such-adapter")

    push_adapter_to_hub(published["adapter"], "org/adapter-flaky")  # a repo not in the local cache yet
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    with pytest.raises(AdapterLoadError, match="'org/adapter-flaky'.*401.*Invalid credentials.*HF_TOKEN"):
        load_adapted_model("org/base", "org/adapter-flaky")
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)

    hub.fail_with(500, "/org/adapter-flaky/resolve/", method="GET")  # the download fails; HEAD would be retried
    try:
        with pytest.raises(AdapterLoadError, match="'org/adapter-flaky'.*500.*retry later"):
            load_adapted_model("org/base", "org/adapter-flaky")
    finally:
        hub.clear_failures()
    model, info = load_adapted_model("org/base", "org/adapter-flaky")  # the Hub is back
    assert info["base_model_repo_id"] == "org/base"


def test_adapter_card_is_a_valid_hub_card(hub, published):
    from huggingface_hub import ModelCard

    files = hub.repo("org/adapter").commits[hub.repo("org/adapter").branches["main"]].files
    card = ModelCard(files["README.md"].content.decode())
    data = card.data
    assert data.base_model == "org/base" and data.library_name == "peft"
    assert data.pipeline_tag == "image-segmentation" and data.model_name == "org/adapter"
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results["target mIoU (adapted)"] == round(published["results"]["adapted_miou"], 2)
    assert results["target mIoU (zero-shot)"] == round(published["results"]["zero_shot_miou"], 2)
    assert {r.task_type for r in data.eval_results} == {"image-segmentation"}
    info = json.loads(files["vocalign.json"].content)
    for name in info["class_names"]:
        assert f"| {name} |" in card.text
    assert 'load_adapted_model("org/base", "org/adapter")' in card.text
    assert f'revision="{published["base_sha"]}"' in card.text and '"max_steps": 2' in card.text
    assert "<this repo id>" not in card.text and "<folder of this adapter>" not in card.text
    # The local folder's card is the same card before publication (no repo id yet), also valid.
    local = ModelCard.load(published["adapter"] / "README.md")
    assert local.data.base_model == "org/base"


def test_adapter_card_metadata_uses_hub_ids_only(tmp_path):
    """`base_model:` and `datasets:` hold Hub ids or nothing: a local base folder or the built-in world is named
    in the text only."""
    from huggingface_hub import ModelCard

    from vocalign_hf.adaptation import build_model_card
    from vocalign_hf.data.hub import hub_dataset_id

    assert hub_dataset_id("cityscapes") == "Chris1/cityscapes"
    assert hub_dataset_id("ade20k_150") == "zhoubolei/scene_parse_150"
    assert hub_dataset_id("me/my-domain") == "me/my-domain"
    assert hub_dataset_id("world") is None and hub_dataset_id("folder") is None

    (tmp_path / "base").mkdir()
    local = ModelCard(str(build_model_card(str(tmp_path / "base"), ["road", "car"], dataset="world",
                                           metrics={"target mIoU (adapted)": 50.0})))
    assert local.data.base_model is None and local.data.datasets is None
    assert str(tmp_path / "base") in local.text and "--push-to-hub" in local.text
    hub = ModelCard(str(build_model_card("org/base", ["road", "car"], dataset="cityscapes", repo_id="org/a",
                                         metrics={"target mIoU (adapted)": 50.0, "note": "n/a"})))
    assert hub.data.base_model == "org/base" and hub.data.datasets == ["Chris1/cityscapes"]
    assert [(r.dataset_type, r.metric_value) for r in hub.data.eval_results] == [("Chris1/cityscapes", 50.0)]


def test_adapter_revisions_and_base_mismatch_warning(hub, hub_env, published, tmp_path, caplog):
    import shutil

    from safetensors.torch import save_file

    from vocalign_hf.adaptation import load_adapted_model, push_adapter_to_hub

    first_sha = hub.repo("org/adapter").branches["main"]
    second = tmp_path / "adapter_v2"
    shutil.copytree(published["adapter"], second)
    weights = {k: v + 0.5 for k, v in _lora_weights(second).items()}
    save_file(weights, str(second / "adapter_model.safetensors"), metadata={"format": "pt"})
    second_sha = push_adapter_to_hub(second, "org/adapter")
    assert second_sha != first_sha and hub.repo("org/adapter").branches["main"] == second_sha

    base = str(published["work"] / "base")
    first_logits = _local_logits(base, published["adapter"])
    second_logits = _local_logits(base, second)
    assert not torch.equal(first_logits, second_logits)

    def hub_logits(**kwargs):
        return _fixed_input_logits(load_adapted_model("org/base", "org/adapter", **kwargs)[0])

    assert torch.equal(hub_logits(adapter_revision=first_sha), first_logits)
    assert torch.equal(hub_logits(), second_logits)

    # The base model moves on: loading warns, naming both commits; pinning the trained-on base does not warn.
    from vocalign_hf import CATSegForSemanticSegmentation

    moved = CATSegForSemanticSegmentation.from_pretrained(base)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(0.01)
    moved.save_pretrained(tmp_path / "base_v2")
    new_base_sha = _upload(tmp_path / "base_v2", "org/base")
    caplog.clear()
    with caplog.at_level("WARNING", logger="vocalign_hf.adaptation.adapters"):
        load_adapted_model("org/base", "org/adapter")
    assert f"org/base@{published['base_sha']}" in caplog.text and f"org/base@{new_base_sha}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vocalign_hf.adaptation.adapters"):
        load_adapted_model("org/base", "org/adapter", revision=published["base_sha"])
    assert "trained on" not in caplog.text


def test_trainer_push_flags_map_to_the_recipe_push():
    from vocalign_hf.adaptation import VocAlignArguments
    from vocalign_hf.adaptation.adapters import adapter_push_target

    def args(**kwargs):
        return VocAlignArguments(output_dir="unused", report_to="none", **kwargs)

    assert adapter_push_target(None, args()) is None
    same = adapter_push_target(None, args(push_to_hub=True, hub_model_id="org/a", hub_private_repo=True))
    assert same == {"repo_id": "org/a", "private": True, "token": None}
    assert adapter_push_target("org/a", args())["repo_id"] == "org/a"
    assert adapter_push_target("org/a", args(push_to_hub=True, hub_model_id="org/a"))["repo_id"] == "org/a"
    with pytest.raises(ValueError, match="different repos"):
        adapter_push_target("org/a", args(push_to_hub=True, hub_model_id="org/b"))
    with pytest.raises(ValueError, match="--hub_model_id"):
        adapter_push_target(None, args(push_to_hub=True))
    with pytest.raises(ValueError, match="checkpoints"):
        adapter_push_target(None, args(push_to_hub=True, hub_model_id="org/a", hub_strategy="checkpoint"))
    with pytest.raises(ValueError, match="not a Hub repo id"):
        adapter_push_target("no-namespace", args())


def test_trainer_push_to_hub_publishes_the_adapter_card(hub, hub_env, published, tmp_path):
    """A `VocAlignTrainer` used directly (outside the recipes) pushes the adapter's own card, with the mIoU it
    measured, and not the Trainer's generic one."""
    from conftest import RandomImages
    from huggingface_hub import ModelCard

    from vocalign_hf import CATSegForSemanticSegmentation, CATSegProcessor
    from vocalign_hf.adaptation import VocAlignArguments, VocAlignTrainer, add_lora

    args = VocAlignArguments(
        output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, max_steps=1, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, push_to_hub=True, hub_model_id="org/trainer-adapter", save_strategy="no",
        disable_tqdm=True, lora_layers=[0],
    )
    model = add_lora(CATSegForSemanticSegmentation.from_pretrained("org/base"), args)
    trainer = VocAlignTrainer(
        model=model, args=args, class_names=["sky", "road", "tree"], processor=CATSegProcessor.from_pretrained("org/base"),
        concepts={"sky": ["heaven"]}, train_dataset=RandomImages(), eval_dataset=RandomImages(),
    )
    trainer.train()
    metrics = trainer.evaluate(metric_key_prefix="adapted")
    trainer.push_to_hub()

    repo = hub.repo("org/trainer-adapter")
    files = repo.commits[repo.branches["main"]].files
    assert "adapter_config.json" in files
    card = ModelCard(files["README.md"].content.decode())
    assert card.data.base_model == "org/base" and card.data.library_name == "peft"
    assert "| road |" in card.text and 'load_adapted_model("org/base", "org/trainer-adapter")' in card.text
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"target mIoU (adapted)": round(metrics["adapted_mean_iou"], 2)}


# --- datasets: repos laid out as the ones the loaders name, read by the real `datasets` client ----------------------

CITYSCAPES_LABEL_IDS = {7: 0, 8: 1, 23: 10, 26: 13, 0: 255}  # road, sidewalk, sky, car, unlabeled -> train ids
ADE_ANNOTATIONS = {0: 255, 1: 0, 5: 4, 150: 149}  # "other" -> ignore; k -> k - 1 (reduce labels)


def _segmentation_parquet(path: Path, label_column: str, values: list[int], extra: dict | None = None) -> Path:
    """A parquet shard as `Dataset.push_to_hub` writes it: Image features (PNG bytes) in the schema metadata."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images, masks = [], []
    for index in range(3):
        images.append(Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)))
        mask = np.full((8, 12), values[index % len(values)], dtype=np.uint8)
        mask[:, :4] = values[(index + 1) % len(values)]
        mask[:2] = values[(index + 2) % len(values)]
        masks.append(Image.fromarray(mask, mode="L"))
    columns = {"image": images, label_column: masks, **(extra or {})}
    features = {"image": datasets.Image(), label_column: datasets.Image()}
    features.update({k: datasets.Value("int64") for k in (extra or {})})
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def dataset_repos(hub, hub_env, tmp_path_factory):
    """`zhoubolei/scene_parse_150` (a script on main, parquet on `refs/convert/parquet`, folder
    `scene_parsing/{split}/`) and `Chris1/cityscapes` (parquet shards under `data/` on main, labelIds masks)."""
    from huggingface_hub import HfApi

    work = tmp_path_factory.mktemp("dataset_repos")
    api = HfApi()
    ade = "zhoubolei/scene_parse_150"
    api.create_repo(ade, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"# a loading script: datasets>=4 cannot run it\n",
                    path_in_repo="scene_parse_150.py", repo_id=ade, repo_type="dataset")
    api.create_branch(ade, branch="refs/convert/parquet", repo_type="dataset")
    for split in ("train", "validation"):
        shard = _segmentation_parquet(work / f"ade_{split}.parquet", "annotation", list(ADE_ANNOTATIONS),
                                      {"scene_category": [0, 1, 2]})
        api.upload_file(path_or_fileobj=str(shard), path_in_repo=f"scene_parsing/{split}/0000.parquet", repo_id=ade,
                        repo_type="dataset", revision="refs/convert/parquet")
    city = "Chris1/cityscapes"
    api.create_repo(city, repo_type="dataset")
    (work / "city" / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        _segmentation_parquet(work / "city" / "data" / f"{split}-00000-of-00001.parquet", "semantic_segmentation",
                              list(CITYSCAPES_LABEL_IDS))
    api.upload_folder(folder_path=str(work / "city"), repo_id=city, repo_type="dataset")
    return work


def test_hub_datasets_load_with_the_right_labels_streaming_included(hub, hub_env, dataset_repos, tmp_path):
    result = run_client(f"""
        import json
        import numpy as np
        from vocalign_hf.data import load_hub_dataset

        out = {{}}
        for name in ("ade20k_150", "cityscapes"):
            for streaming in (False, True):
                kwargs = {{}} if streaming else {{"cache_dir": {str(tmp_path / "datasets_cache")!r}}}
                ds = load_hub_dataset(name, "val", streaming=streaming, **kwargs)
                rows = list(ds) if streaming else [ds[i] for i in range(len(ds))]
                out[f"{{name}}/{{streaming}}"] = {{
                    "columns": sorted(rows[0]),
                    "labels": [np.asarray(r["label"]).tolist() for r in rows],
                    "size": list(np.asarray(rows[0]["image"]).shape),
                }}
            unlabeled = load_hub_dataset(name, "train", with_labels=False, streaming=True)
            out[f"{{name}}/unlabeled"] = sorted(next(iter(unlabeled)))
        print(json.dumps(out))
    """, hub_env, tmp_path).result

    import datasets
    import numpy as np

    from vocalign_hf.data.normalize import mask_to_array

    for name, mapping in (("ade20k_150", ADE_ANNOTATIONS), ("cityscapes", CITYSCAPES_LABEL_IDS)):
        label_column = "annotation" if name == "ade20k_150" else "semantic_segmentation"
        source = _segmentation_parquet(tmp_path / f"{name}.parquet", label_column, list(mapping))
        raw = datasets.Dataset.from_parquet(str(source))
        expected = [np.vectorize(mapping.get)(mask_to_array(m)).tolist() for m in raw[label_column]]
        for streaming in (False, True):
            got = result[f"{name}/{streaming}"]
            assert got["labels"] == expected, (name, streaming)
            assert "image" in got["columns"] and "label" in got["columns"] and got["size"] == [8, 12, 3]
        assert "label" not in result[f"{name}/unlabeled"] and "image" in result[f"{name}/unlabeled"]
    # The ADE20K shards were read from the parquet conversion branch, not from main.
    assert any("refs%2Fconvert%2Fparquet" in path for _, path in hub.requests)
