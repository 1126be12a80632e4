"""The Gradio app: upload an image, type class names, see zero-shot and adapted segmentations side by side.

Gradio is imported inside [`build_demo`] only, so that this module (and `vocalign_hf`) imports without it.
"""

from __future__ import annotations

import argparse
import html
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..world import target_class_names
from .segmenter import (
    DEFAULT_ADAPTER,
    DemoInputError,
    DemoSegmenter,
    DemoSetupError,
    SegmentationResult,
    load_image,
    load_merged_adapter,
    overlay,
    parse_class_list,
    resize_for_display,
    world_example_images,
    class_palette,
    world_source_model,
)

__all__ = ["DemoApp", "ModelStore", "build_demo", "legend_html", "main"]

TITLE = "VocAlign: zero-shot vs adapted open-vocabulary segmentation"
_NO_ADAPTER_NOTE = "No adapter given: only the zero-shot model is shown."


def legend_html(
    class_names: Sequence[str],
    palette: Sequence[tuple[int, int, int]],
    results: Mapping[str, SegmentationResult],
) -> str:
    """A colour legend: one row per class with its colour, its name (and the adapter's concepts added on the
    adapted side) and its share of the image under each model; hovering a row shows the same as a tooltip."""
    columns = list(results)
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    rows = []
    for index, name in enumerate(class_names):
        colour = "#{:02x}{:02x}{:02x}".format(*palette[index])
        shares = [f"{100 * results[column].shares[index]:.1f} %" for column in columns]
        concepts = sorted({c for column in columns for c in results[column].concepts.get(name, [])})
        label = html.escape(name) + (f" <small>(+ {html.escape(', '.join(concepts))})</small>" if concepts else "")
        numbers = [f"{share}{_mean_probability(results[column], index)} {column}"
                   for share, column in zip(shares, columns)]
        tooltip = html.escape(f"{name}: " + ", ".join(numbers), quote=True)
        cells = "".join(f'<td class="share">{share}</td>' for share in shares)
        rows.append(
            f'<tr class="legend-row" data-class="{html.escape(name, quote=True)}" data-color="{colour}" '
            f'title="{tooltip}"><td><span class="swatch" style="display:inline-block;width:1.1em;height:1.1em;'
            f'background:{colour};border:1px solid #333;vertical-align:middle"></span></td><td>{label}</td>{cells}</tr>'
        )
    return (
        f'<table class="vocalign-legend"><thead><tr><th></th><th>class</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        "<p><small>Share of the image's pixels given to each class. Hover a row for the numbers (p: the class's "
        "mean probability over its pixels).</small></p>"
    )


def _mean_probability(result: SegmentationResult, index: int) -> str:
    """" (p 0.81)": the class's mean probability over the pixels it wins, where it wins some."""
    if result.scores is None or not result.shares[index]:
        return ""
    return f" (p {result.scores[index]:.2f})"


class ModelStore:
    """The loaded models, keyed by (base model, adapter), so that a page visit or an example reuses them; the
    `max_loaded` most recently used pairs are kept.

    A base model that cannot be loaded is an error; an adapter that cannot be loaded leaves the zero-shot model
    usable and is reported as a note.
    """

    def __init__(self, bf16: bool | None = None, device: str | None = None, max_loaded: int = 2) -> None:
        self._loaded: OrderedDict[tuple[str, str], tuple[DemoSegmenter, str | None]] = OrderedDict()
        self._max_loaded = max_loaded
        self._lock = threading.Lock()
        self._options = {"bf16": bf16, "device": device}

    def add(self, segmenter: DemoSegmenter, note: str | None = None) -> None:
        """Register an already built segmenter under its base and adapter names."""
        with self._lock:
            self._loaded[(segmenter.base_name, segmenter.adapter_name or "")] = (segmenter, note)

    def get(self, base_model: str, adapter: str | None) -> tuple[DemoSegmenter, str | None]:
        """The segmenter for this pair (loaded on first use) and a note when the adapter is missing.

        Raises:
            DemoSetupError: the base model cannot be loaded.
        """
        base_model, adapter = (base_model or "").strip(), (adapter or "").strip()
        if not base_model:
            raise DemoSetupError("Give a base model: a folder written by save_pretrained or a Hub model id.")
        key = (base_model, adapter)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = self._load(base_model, adapter)
                while len(self._loaded) > self._max_loaded:  # keep memory bounded when people try many models
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]

    def _load(self, base_model: str, adapter: str) -> tuple[DemoSegmenter, str | None]:
        segmenter = DemoSegmenter.from_pretrained(base_model, **self._options)
        if not adapter:
            return segmenter, _NO_ADAPTER_NOTE
        try:
            merged, info = load_merged_adapter(base_model, adapter)
        except DemoSetupError as error:
            return segmenter, f"{error} Only the zero-shot model is shown."
        segmenter.attach_adapter(merged, info, adapter)
        return segmenter, None


def _short(name: str | None) -> str:
    """A local path as shown on the page: relative below the working directory, `~/...` below the home folder."""
    name = name or ""
    path = Path(name)
    if not path.is_absolute():
        return name
    for root, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return prefix + str(path.resolve().relative_to(root.resolve()))
        except (OSError, ValueError):
            continue
    return name


def _payload_path(payload: Any) -> tuple[str | None, str | None]:
    """(path, original file name) of an image input sent without Gradio's preprocessing."""
    if payload is None:
        return None, None
    if isinstance(payload, (str, os.PathLike)):
        return str(payload), Path(payload).name
    if isinstance(payload, Mapping):
        return payload.get("path"), payload.get("orig_name") or (Path(payload["path"]).name if payload.get("path") else None)
    return getattr(payload, "path", None), getattr(payload, "orig_name", None)


class DemoApp:
    """What the page does on "Segment", without Gradio: inputs in, images, legend and status out."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def status(self, segmenter: DemoSegmenter, note: str | None) -> str:
        base = _short(segmenter.base_name)
        lines = [f"**Zero-shot:** `{base}`"]
        if segmenter.has_adapter:
            classes = ", ".join(segmenter.adapter_class_names) or "not recorded"
            lines.append(f"**Adapted:** `{base}` + adapter `{_short(segmenter.adapter_name)}` (trained for: {classes})")
        if note:
            lines.append(f"**Note:** {note}")
        device = f"{segmenter.device.type}{', bf16' if segmenter.bf16 else ''}"
        lines.append(f"Running on {device}.")
        return "  \n".join(lines)

    def run(
        self,
        image: Any,
        classes_text: str,
        base_model: str,
        adapter: str | None,
        use_concepts: bool = True,
        opacity: float = 0.6,
        zero_shot_concepts: bool = False,
    ) -> tuple[Image.Image, Image.Image | None, str, str]:
        """Segment `image` with both models. Returns the zero-shot overlay, the adapted overlay (None without an
        adapter), the legend HTML and the status text. `zero_shot_concepts`: the zero-shot side scores the adapter's
        concepts too (vocabulary alignment without training).

        Raises:
            DemoInputError: bad class list or image. DemoSetupError: the base model cannot be loaded.
        """
        class_names = parse_class_list(classes_text)
        path, name = _payload_path(image)
        if path is None:
            raise DemoInputError("No image: upload one, or click one of the examples.")
        picture = resize_for_display(load_image(path, name))
        segmenter, note = self.store.get(base_model, adapter)
        palette = class_palette(len(class_names))
        pixel_values = segmenter.prepare(picture)
        size = (picture.height, picture.width)
        results = {"zero-shot": segmenter.segment(pixel_values, class_names, "zero-shot", zero_shot_concepts,
                                                  output_size=size)}
        adapted = None
        if segmenter.has_adapter:
            results["adapted"] = segmenter.segment(pixel_values, class_names, "adapted", use_concepts, output_size=size)
            adapted = overlay(picture, results["adapted"].labels, palette, opacity)
            unknown = [c for c in class_names if c.casefold() not in {n.casefold() for n in segmenter.adapter_class_names}]
            if segmenter.adapter_class_names and unknown:
                note = (note + " " if note else "") + (
                    f"The adapter was not trained for {', '.join(unknown)}: the adapted model only generalises there.")
            dropped = segmenter.adapter_concepts(class_names)[1]
            if (use_concepts or zero_shot_concepts) and dropped:
                note = (note + " " if note else "") + (
                    f"Concepts left out because they are also listed classes: {', '.join(dropped)}.")
        zero_shot = overlay(picture, results["zero-shot"].labels, palette, opacity)
        timing = ", ".join(f"{k} {v.seconds:.2f} s" for k, v in results.items())
        status = self.status(segmenter, note) + f"  \nAnswered in {timing}."
        return zero_shot, adapted, legend_html(class_names, palette, results), status


def _initial_status_and_classes(store: ModelStore, app: DemoApp, base_model: str, adapter: str) -> tuple[str, str]:
    """The status the page opens with, and its class names (the adapter's, else the world's target classes)."""
    try:
        start, note = store.get(base_model, adapter)
        initial_status = app.status(start, note)
        default_classes = start.adapter_class_names
    except DemoSetupError as error:  # the page still opens and says what is wrong; the fields can be fixed
        initial_status, default_classes = f"**Error:** {error}", []
    if not default_classes:
        default_classes = target_class_names()
    return initial_status, ", ".join(default_classes)


def _input_column(
    gr: Any, classes_value: str, base_model: str, adapter: str, opacity: float, examples: list[list[str]]
) -> tuple[list[Any], Any]:
    """The left column (image, class names, models and display, examples): its inputs in `DemoApp.run`'s order,
    and the Segment button."""
    with gr.Column(scale=1):
        image = gr.Image(
            label="Image", type="filepath", sources=["upload", "clipboard"], height=300, elem_id="image-input"
        )
        classes = gr.Textbox(label="Class names, comma-separated", value=classes_value, elem_id="class-names")
        with gr.Accordion("Models and display", open=False):
            base = gr.Textbox(label="Base model (folder or Hub id)", value=base_model, elem_id="base-model")
            adapter_box = gr.Textbox(
                label="Adapter (folder or Hub id; empty for none)", value=adapter, elem_id="adapter"
            )
            use_concepts = gr.Checkbox(
                label="Adapted model: add the adapter's concepts to their classes (VocAlign Eq. 7)", value=True
            )
            zero_shot_concepts = gr.Checkbox(
                label="Zero-shot model: add the adapter's concepts too (vocabulary alignment, no training)",
                value=False,
            )
            alpha = gr.Slider(0.0, 1.0, value=opacity, step=0.05, label="Overlay opacity", elem_id="opacity")
        submit = gr.Button("Segment", variant="primary", elem_id="segment")
        gr.Examples(examples=examples, inputs=[image, classes], label="Images from the built-in world")
    return [image, classes, base, adapter_box, use_concepts, alpha, zero_shot_concepts], submit


def _result_column(gr: Any) -> list[Any]:
    """The right column: the zero-shot and adapted segmentations side by side, and the legend under them."""
    with gr.Column(scale=2):
        with gr.Row():
            zero_shot = gr.Image(
                label="Zero-shot", type="pil", format="png", interactive=False, elem_id="zero-shot-result"
            )
            adapted = gr.Image(label="Adapted", type="pil", format="png", interactive=False, elem_id="adapted-result")
        legend = gr.HTML(elem_id="legend")
    return [zero_shot, adapted, legend]


def build_demo(
    base_model: str | None = None,
    adapter: str | None = DEFAULT_ADAPTER,
    segmenter: DemoSegmenter | None = None,
    examples_dir: str | os.PathLike | None = None,
    opacity: float = 0.6,
    bf16: bool | None = None,
    device: str | None = None,
):
    """The Gradio `Blocks` of the demo (not launched).

    Args:
        base_model: zero-shot model (folder or Hub id); default the built-in world's source model.
        adapter: VocAlign adapter (folder or Hub id) or None/"" for none; default the main job's
            `runs/world/adapter`. If it cannot be loaded, the page says so and shows the zero-shot model.
        segmenter: an already loaded [`DemoSegmenter`] to start with (its base and adapter names fill the fields).
        examples_dir: where the world's example images are written (default a temporary folder).
        opacity: initial opacity of the segmentation over the image (0 to 1).
        bf16, device: see [`DemoSegmenter`].
    """
    try:  # here, not at the top: Gradio is an optional dependency (the `demo` extra)
        import gradio as gr
    except ImportError as error:
        raise ImportError('The demo needs Gradio: pip install -e ".[demo]" (or pip install "vocalign-hf[demo]")') from error

    store = ModelStore(bf16=bf16, device=device)
    if segmenter is not None:
        store.add(segmenter, None if segmenter.has_adapter else _NO_ADAPTER_NOTE)
        base_model, adapter = segmenter.base_name, segmenter.adapter_name or ""
    else:
        base_model = base_model or str(world_source_model())
        adapter = adapter or ""
    app = DemoApp(store)
    initial_status, classes_value = _initial_status_and_classes(store, app, base_model, adapter)
    examples_dir = Path(examples_dir) if examples_dir else Path(tempfile.mkdtemp(prefix="vocalign-demo-"))
    examples = [[str(path), classes_value] for path in world_example_images(examples_dir)]

    def on_submit(image, classes_text, base, adapter_text, use_concepts, alpha, zero_shot_concepts):
        try:
            return app.run(image, classes_text, base, adapter_text, use_concepts, alpha, zero_shot_concepts)
        except (DemoInputError, DemoSetupError) as error:  # the user's mistake: a message, no traceback
            raise gr.Error(str(error), duration=None, print_exception=False) from None

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {TITLE}\nUpload an image (or click an example from the built-in world), type the class names, "
            "press **Segment**. Left: the base CAT-Seg (zero-shot); right: the same model with the VocAlign adapter."
        )
        status = gr.Markdown(initial_status, elem_id="status")
        with gr.Row():
            inputs, submit = _input_column(gr, classes_value, base_model, adapter, opacity, examples)
            outputs = _result_column(gr) + [status]
        classes = inputs[1]
        # preprocess=False: the image arrives as the uploaded file's path (still checked by Gradio to be an
        # upload), and load_image gives the messages for unreadable and oversized files.
        submit.click(on_submit, inputs, outputs, preprocess=False)
        classes.submit(on_submit, inputs, outputs, preprocess=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    """`python -m vocalign_hf.demo`: start the demo on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base_model", default=None, help="zero-shot model, folder or Hub id (default: the world's)")
    parser.add_argument("--adapter", default=DEFAULT_ADAPTER, help="VocAlign adapter, folder or Hub id ('' for none)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default 7860, or the next free port")
    parser.add_argument("--opacity", type=float, default=0.6)
    options = parser.parse_args(argv)
    demo = build_demo(options.base_model, options.adapter, opacity=options.opacity)
    demo.launch(server_name=options.host, server_port=options.port)
