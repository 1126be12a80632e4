"""Make the archive of the world's source model that ships with the package (`vocalign_hf.world.shipped`).

To stay small (about 3 MB instead of 19), the archive holds no tokenizer files (the processor is rebuilt from the
config and the packaged CLIP BPE vocabulary when unpacking) and keeps only the rows of CLIP's 49408-token
embedding table that the world's texts use (source and target names, concepts, distractors, with their prompt
template, and the special tokens); the other rows are zero. Those tokens never occur in the world's vocabularies
and were never trained, so every world result is unchanged (checked when exporting: identical logits). Words
outside the world's vocabulary get a zero token embedding instead of an untrained random one.

Re-create the archive (the command re-trains if needed, then exports):

    python -m vocalign_hf.world.export
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..atomic import atomic_write_file
from ..models.catseg import CATSegForSemanticSegmentation, CATSegProcessor
from .datasets import World, build_world
from .generator import SOURCE_SYNONYMS, WorldConfig
from .pretrain import DISTRACTOR_WORDS, PRETRAIN_THREADS, pretrain_source_model
from .shipped import SHIPPED_SOURCE_MODEL
from .source_folder import INFO_FILE

__all__ = ["export_source_model", "world_token_ids"]


def world_token_ids(world: World, processor: CATSegProcessor) -> torch.Tensor:
    """Every token id the world's texts use with the processor's prompt templates (sorted, unique)."""
    texts = set(world.source_class_names) | set(world.target_class_names) | set(DISTRACTOR_WORDS)
    texts |= {concept for concepts in world.target_concepts.values() for concept in concepts}
    texts |= {word for words in SOURCE_SYNONYMS.values() for word in words}  # trained with `synonyms`
    ids = processor.tokenize_classes(sorted(texts))["input_ids"]
    return torch.unique(ids)


def _token_embedding(model: CATSegForSemanticSegmentation) -> torch.nn.Embedding:
    return model.catseg.clip.text_model.embeddings.token_embedding


def export_source_model(model_dir: str | os.PathLike, archive: str | os.PathLike, world: World) -> Path:
    """Zip a pretrained world source model with its unused token-embedding rows zeroed (see the module docstring).

    Checks before writing that the pruned model gives the same logits as the original on the world's target
    evaluation images, with the target vocabulary with and without concepts and with the source names.
    """
    model_dir, archive = Path(model_dir), Path(archive)
    original = CATSegForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = CATSegProcessor.from_pretrained(model_dir)
    pruned = copy.deepcopy(original)
    table = _token_embedding(pruned).weight
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[world_token_ids(world, processor)] = True
    with torch.no_grad():
        table[~keep] = 0.0
    images = [world.target_eval[i]["image"] for i in range(min(16, len(world.target_eval)))]
    pixel_values = processor(images=images)["pixel_values"]
    concepts = [c for cs in world.target_concepts.values() for c in cs]
    for names in (world.target_class_names, world.target_class_names + concepts, world.source_class_names):
        ids = processor.tokenize_classes(names)["input_ids"]
        with torch.no_grad():
            same = torch.equal(original(pixel_values=pixel_values, input_ids=ids).logits,
                               pruned(pixel_values=pixel_values, input_ids=ids).logits)
        if not same:
            raise RuntimeError(f"pruning the token table changed the logits for {names}")

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent) as tmp:
        folder = Path(tmp) / "model"
        pruned.save_pretrained(folder)  # the processor is rebuilt from the config when unpacking
        shutil.copy2(model_dir / INFO_FILE, folder / INFO_FILE)

        def write(path: Path) -> None:
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
                for file in sorted(folder.iterdir()):
                    zf.write(file, file.name)

        atomic_write_file(archive, write)
    return archive


def main(argv: list[str] | None = None) -> None:
    """Pretrain (or reuse) the default world's source model with the default settings and export the archive."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="runs/shipped_source_model", help="where the model is pretrained")
    parser.add_argument("--archive", default=str(SHIPPED_SOURCE_MODEL))
    options = parser.parse_args(argv)
    world = build_world(WorldConfig())
    model_dir = pretrain_source_model(
        world, options.work_dir, seed=world.config.seed, num_threads=PRETRAIN_THREADS, use_shipped=False
    )
    path = export_source_model(model_dir, options.archive, world)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
