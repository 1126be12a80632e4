"""The browser demo (`vocalign_hf.demo`): inputs and their messages, the fast inference path with an adapter, and
the Gradio app driven in a real headless Chromium (Selenium, the Debian `chromium` + `chromium-driver` packages)."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from PIL import Image

from vocalign_hf import CATSegForSemanticSegmentation
from vocalign_hf.adaptation import LoRASettings, lora_config_for_clip, lora_parameters, save_adapter
from vocalign_hf.demo import (
    DEFAULT_ADAPTER,
    MAX_CLASSES,
    DemoApp,
    DemoInputError,
    DemoSegmenter,
    DemoSetupError,
    ModelStore,
    load_image,
    parse_class_list,
    world_example_images,
    world_source_model,
)
from vocalign_hf.demo.segmenter import display_size, load_merged_adapter
from vocalign_hf.world import target_class_names, target_concepts

CLASSES = target_class_names()  # sky, tree, terrain, ground, building, automobile, water
CLASS_TEXT = ", ".join(CLASSES)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def base_model(world_dir) -> Path:
    """The world's shipped source model, unpacked (no training, no download)."""
    return world_source_model(world_dir / "source_model")


@pytest.fixture(scope="module")
def adapter(world_dir, base_model) -> Path:
    """A tiny VocAlign adapter on the world model (random LoRA weights: made in a second, and visibly different
    from zero-shot) with the world's target classes and concepts, saved as the main job saves its adapter."""
    torch.manual_seed(0)
    model = CATSegForSemanticSegmentation.from_pretrained(base_model)
    peft_model = get_peft_model(model, lora_config_for_clip(LoRASettings(rank=2, alpha=2.0, layers=(0, 1))))
    with torch.no_grad():
        for parameter in lora_parameters(peft_model):
            parameter.normal_(0.0, 0.3)
    return save_adapter(peft_model, world_dir / "adapter", CLASSES, target_concepts())


@pytest.fixture(scope="module")
def segmenter(base_model, adapter) -> DemoSegmenter:
    return DemoSegmenter.from_pretrained(base_model, adapter)


@pytest.fixture(scope="module")
def examples(world_dir) -> list[Path]:
    return world_example_images(world_dir / "examples", count=2)


# --------------------------------------------------------------------------------------------------- no browser
def test_the_library_does_not_import_gradio():
    code = (
        "import sys, vocalign_hf, vocalign_hf.adaptation, vocalign_hf.demo\n"
        "assert 'gradio' not in sys.modules, 'gradio was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_class_list_parsing_and_its_messages():
    assert parse_class_list(" sky,  tree ,\nroad ,") == ["sky", "tree", "road"]
    for text in ("", " , ,", None):
        with pytest.raises(DemoInputError, match="class list is empty"):
            parse_class_list(text)
    with pytest.raises(DemoInputError, match="duplicate class name 'Sky'"):
        parse_class_list("sky, tree, Sky")
    with pytest.raises(DemoInputError, match=f"at most {MAX_CLASSES}"):
        parse_class_list(",".join(f"class {i}" for i in range(MAX_CLASSES + 1)))


def test_image_messages_name_the_file(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text")
    with pytest.raises(DemoInputError, match="holiday.png is not a readable image"):
        load_image(not_an_image, name="holiday.png")
    with pytest.raises(DemoInputError, match="gone.png: the file is missing"):
        load_image(tmp_path / "gone.png")
    huge = tmp_path / "huge.png"  # 40 megapixels, refused from the header before decoding
    Image.new("RGB", (8000, 5000), (90, 140, 200)).save(huge, compress_level=1)
    with pytest.raises(DemoInputError, match=r"huge.png is 8000 x 5000 pixels \(40.0 megapixels\).*downscale"):
        load_image(huge)
    gray = tmp_path / "gray.png"
    Image.new("L", (20, 10), 128).save(gray)
    assert load_image(gray).mode == "RGB" and load_image(gray).size == (20, 10)
    assert display_size(64, 32) == (384, 192) and display_size(2048, 1024) == (1024, 512)
    assert display_size(512, 512) == (512, 512)


def test_missing_models_are_explained(tmp_path, base_model, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/world/adapter here
    store = ModelStore()
    segmenter, note = store.get(str(base_model), DEFAULT_ADAPTER)
    assert not segmenter.has_adapter
    assert note.startswith(f"No adapter at {DEFAULT_ADAPTER} yet") and "accelerate launch recipes/adapt.py" in note
    (tmp_path / "empty").mkdir()
    with pytest.raises(DemoSetupError, match="empty is not a peft adapter folder"):
        load_merged_adapter(base_model, tmp_path / "empty")
    with pytest.raises(DemoSetupError, match="Could not load the base model 'no/such/model'"):
        store.get("no/such/model", "")
    # without an adapter the app still answers, with the zero-shot side only
    image = world_example_images(tmp_path / "examples", count=1)[0]
    zero_shot, adapted, legend, status = DemoApp(store).run(str(image), CLASS_TEXT, str(base_model), DEFAULT_ADAPTER)
    assert zero_shot.size == (384, 384) and adapted is None
    assert "No adapter at" in status and "automobile" in legend


def test_fast_path_with_adapter(segmenter, base_model, adapter, examples, monkeypatch):
    assert segmenter.has_adapter and segmenter.adapter_class_names == CLASSES and not segmenter.bf16
    image = Image.open(examples[0]).convert("RGB")

    # the adapter's LoRA weights are merged: the same logits as the peft model, and not those of the base
    from vocalign_hf.adaptation import load_adapted_model

    peft_model, _ = load_adapted_model(base_model, adapter)
    pixel_values = segmenter.prepare(image)
    ids = segmenter.processor.tokenize_classes(CLASSES)["input_ids"]
    with torch.no_grad():
        expected = peft_model(pixel_values=pixel_values, input_ids=ids).logits
        merged = segmenter.adapted_model(pixel_values=pixel_values, input_ids=ids).logits
        base = segmenter.base_model(pixel_values=pixel_values, input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    assert (merged - base).abs().max() > 1e-2

    # each vocabulary is encoded once per model
    calls = []
    for model in (segmenter.base_model, segmenter.adapted_model):
        original = model.get_text_embeddings
        monkeypatch.setattr(model, "get_text_embeddings", lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))
        model.text_embedding_cache.clear()
    for _ in range(3):
        zero_shot = segmenter.segment(pixel_values, CLASSES, "zero-shot")
        adapted = segmenter.segment(pixel_values, CLASSES, "adapted")
    assert len(calls) == 2
    segmenter.segment(pixel_values, CLASSES[:3], "zero-shot")
    assert len(calls) == 3

    # the adapted side scores the adapter's concepts with their classes (Eq. 7), the zero-shot side does not
    assert zero_shot.entries == CLASSES and zero_shot.concepts == {}
    assert adapted.concepts == target_concepts()
    assert adapted.entries[5:8] == ["ground", "road", "street"]
    plain = segmenter.segment(pixel_values, CLASSES, "adapted", use_concepts=False)
    assert plain.entries == CLASSES and plain.concepts == {}
    # vocabulary alignment without training: the zero-shot side with the concepts, on request
    aligned = segmenter.segment(pixel_values, CLASSES, "zero-shot", use_concepts=True)
    assert aligned.entries == adapted.entries and aligned.concepts == target_concepts()
    # a concept that is itself a listed class stays that class's name only
    with_car = segmenter.segment(pixel_values, ["automobile", "car", "sky"], "adapted")
    assert with_car.concepts == {"automobile": ["vehicle"]}
    assert segmenter.adapter_concepts(["automobile", "car"])[1] == ["car (automobile)"]
    for result in (zero_shot, adapted):
        assert result.labels.shape == (8 * 4, 8 * 4) and result.shares.sum() == pytest.approx(1.0)

    # a 512 x 512 photo-sized image is answered by both models in a few seconds on CPU
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    start = time.perf_counter()
    both = [segmenter.segment(photo, CLASSES, which) for which in ("zero-shot", "adapted")]
    assert time.perf_counter() - start < 10.0
    assert all(result.labels.shape == (512, 512) for result in both)


# --------------------------------------------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Chromium and its driver (Debian: chromium chromium-driver; .ci/run)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(segmenter, world_dir):
    """The app on 127.0.0.1, built around the module's world model and tiny adapter; opacity 1 so that the result
    pixels are exactly the legend's colours."""
    from vocalign_hf.demo import build_demo

    demo = build_demo(segmenter=segmenter, examples_dir=world_dir / "examples", opacity=1.0)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open_page(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 30)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image-input input[type=file]")))
    return wait


def _type_classes(browser, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, "#class-names textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    if text:
        box.send_keys(text)


@needs_browser
def test_browser_segments_an_uploaded_world_image(server, browser, examples):
    from selenium.webdriver.common.by import By

    wait = _open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(examples[1]))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input img"))  # the upload is shown
    _type_classes(browser, CLASS_TEXT)
    browser.find_element(By.CSS_SELECTOR, "#segment").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#legend tr.legend-row")) == len(CLASSES))

    rows = browser.find_elements(By.CSS_SELECTOR, "#legend tr.legend-row")
    assert [row.get_attribute("data-class") for row in rows] == CLASSES
    colours = [tuple(int(row.get_attribute("data-color")[i : i + 2], 16) for i in (1, 3, 5)) for row in rows]
    assert len(set(colours)) == len(CLASSES)
    for side, column in (("zero-shot", 0), ("adapted", 1)):
        img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{side}-result img"))
        with urllib.request.urlopen(img.get_attribute("src"), timeout=30) as response:
            result = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
        assert result.shape == (384, 384, 3)  # the 64 x 64 world image, enlarged 6x for display
        pixels = result.reshape(-1, 3)
        counts = {colour: int((pixels == colour).all(axis=1).sum()) for colour in colours}
        assert sum(counts.values()) == len(pixels), f"{side}: pixels of colours outside the legend"
        assert sum(1 for n in counts.values() if n) >= 2, f"{side}: one class everywhere"
        for row, colour in zip(rows, colours):  # the legend's shares are those of the drawn pixels
            shown = float(row.find_elements(By.CSS_SELECTOR, "td.share")[column].text.rstrip(" %"))
            assert shown == pytest.approx(100 * counts[colour] / len(pixels), abs=0.051), (side, row.text)
    assert "automobile (+ car, vehicle)" in browser.find_element(By.CSS_SELECTOR, "#legend").text
    assert "Answered in" in browser.find_element(By.CSS_SELECTOR, "#status").text


@needs_browser
def test_browser_reports_an_empty_class_list(server, browser, examples):
    from selenium.webdriver.common.by import By

    wait = _open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(examples[0]))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input img"))
    _type_classes(browser, "")
    browser.find_element(By.CSS_SELECTOR, "#segment").click()
    wait.until(lambda d: "The class list is empty" in d.find_element(By.TAG_NAME, "body").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#legend tr.legend-row")


def test_app_scores_the_zero_shot_side_with_the_concepts_on_request(base_model, adapter, examples):
    """Vocabulary alignment without training in the demo: the zero-shot side with the adapter's concepts (Eq. 7)."""
    app = DemoApp(ModelStore())
    plain = app.run(str(examples[1]), CLASS_TEXT, str(base_model), str(adapter))
    aligned = app.run(str(examples[1]), CLASS_TEXT, str(base_model), str(adapter), zero_shot_concepts=True)
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(aligned[0]))  # the zero-shot side changed
    assert np.array_equal(np.asarray(plain[1]), np.asarray(aligned[1]))  # the adapted side did not
