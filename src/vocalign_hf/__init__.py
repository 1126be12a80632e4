"""vocalign-hf: source-free domain adaptation of open-vocabulary segmentation (CAT-Seg + VocAlign) on Hugging Face.

The model names load lazily (PEP 562), so that `import vocalign_hf.class_names` (the concept command) imports
neither torch nor transformers; `from vocalign_hf import CATSegForSemanticSegmentation` loads the model package and
registers it with the Auto classes, as before. Where transformers is already imported, `import vocalign_hf`
registers them at once (and the `zero-shot-image-segmentation` task): `from transformers import pipeline; import
vocalign_hf; pipeline(..., model="org/catseg")` then uses this package's code, with no `trust_remote_code` prompt.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models.catseg import (
        CATSegConfig,
        CATSegForSemanticSegmentation,
        CATSegImageProcessor,
        CATSegModel,
        CATSegProcessor,
        clip_tokenizer,
    )

__version__ = "0.1.0"

__all__ = [
    "CATSegConfig",
    "CATSegModel",
    "CATSegForSemanticSegmentation",
    "CATSegImageProcessor",
    "CATSegProcessor",
    "clip_tokenizer",
]


def __getattr__(name: str) -> Any:
    """Load a model name from `models.catseg` on first use (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .models import catseg  # here, not at the top: keeps `import vocalign_hf` fast (no torch; see the docstring)

    value = getattr(catseg, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# A transformers user (`from transformers import pipeline`, then `import vocalign_hf`, as the README shows) gets the
# Auto classes and the pipeline task now; the concept command, which never imports transformers, stays torch-free.
if "transformers" in sys.modules:
    from .models.catseg import register_auto_classes

    register_auto_classes()
