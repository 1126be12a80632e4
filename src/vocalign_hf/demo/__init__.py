"""An interactive demo: zero-shot and VocAlign-adapted CAT-Seg side by side in the browser (Gradio).

    pip install -e ".[demo]"
    python -m vocalign_hf.demo                      # the built-in world's source model + runs/world/adapter
    python -m vocalign_hf.demo --base_model your-org/catseg-vitb-384 --adapter your-org/catseg-vocalign-cityscapes

Gradio is an optional extra: this package imports it only when the app is built ([`build_demo`]).
"""

from .segmenter import (
    DEFAULT_ADAPTER,
    MAX_CLASSES,
    MAX_PIXELS,
    DemoInputError,
    DemoSegmenter,
    DemoSetupError,
    SegmentationResult,
    load_image,
    overlay,
    parse_class_list,
    world_example_images,
    world_source_model,
)
from .ui import DemoApp, ModelStore, build_demo, legend_html, main

__all__ = [
    "DEFAULT_ADAPTER",
    "MAX_CLASSES",
    "MAX_PIXELS",
    "DemoApp",
    "DemoInputError",
    "DemoSegmenter",
    "DemoSetupError",
    "ModelStore",
    "SegmentationResult",
    "build_demo",
    "legend_html",
    "load_image",
    "main",
    "overlay",
    "parse_class_list",
    "world_example_images",
    "world_source_model",
]
