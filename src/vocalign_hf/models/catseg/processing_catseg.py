"""Processor for CAT-Seg: images through [`CATSegImageProcessor`], class names through the CLIP tokenizer."""

import gzip
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from transformers import CLIPTokenizer
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import logging

from .class_list import validate_class_names
from .image_processing_catseg import CATSegImageProcessor, CATSegImageProcessorKwargs
from .prompt_templates import resolve_prompt_templates
from .vocabulary_catseg import aligned_entries

logger = logging.get_logger(__name__)

BPE_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
#: CLIP's text context: longer prompts are cut to it.
CLIP_MAX_TOKENS = 77


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> unicode table of GPT-2/CLIP BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with resources.files("vocalign_hf.resources").joinpath(BPE_RESOURCE).open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = list(_bytes_to_unicode().values())
    tokens += [token + "</w>" for token in tokens]
    tokens += ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """The OpenAI CLIP BPE tokenizer (49408 tokens), built from the vocabulary file shipped with the package.

    Checkpoints converted with `convert-catseg-checkpoint` save this tokenizer with the model, so this is only needed
    to build a processor from scratch (tests, new checkpoints).
    """
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


class CATSegProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: CATSegImageProcessorKwargs


class CATSegProcessor(ProcessorMixin):
    r"""Bundles [`CATSegImageProcessor`] and a CLIP tokenizer, and turns class names into prompt token ids.

    `processor(images=..., text=["road", "car"])` returns `pixel_values` (B, 3, H, W), and `input_ids` and
    `attention_mask` (num_classes * num_templates, seq_len), class-major, ready for
    [`CATSegForSemanticSegmentation`] ([`tokenize_classes`] gives them as (num_classes, num_templates, seq_len)). A
    class name containing `", "` ("sky, heaven") is prompted with its first part only, as the reference does.
    Keyword arguments are routed as in every transformers processor: flat (`do_resize=False`, `padding="max_length"`)
    or per modality (`images_kwargs={...}`, `text_kwargs={...}`, `common_kwargs={"return_tensors": "np"}`).

    Args:
        image_processor: a [`CATSegImageProcessor`].
        tokenizer: a `CLIPTokenizer`.
        prompt_templates: the template set name or list; must match the model config's `prompt_templates`.
    """

    valid_processor_kwargs = CATSegProcessorKwargs
    # Defaults of the class prompts' tokenisation: pad to the longest prompt, cut at CLIP's context.
    text_kwargs = {"padding": True, "truncation": True, "max_length": CLIP_MAX_TOKENS, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, prompt_templates: str | list[str] = "single", **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        resolve_prompt_templates(prompt_templates)
        self.prompt_templates = prompt_templates if isinstance(prompt_templates, str) else list(prompt_templates)

    @classmethod
    def from_config(cls, config, **image_processor_kwargs: Any) -> "CATSegProcessor":
        """A processor matching a [`CATSegConfig`] (resolution, templates) with the bundled CLIP tokenizer."""
        size = {"height": config.clip_resolution, "width": config.clip_resolution}
        image_processor = CATSegImageProcessor(size=size, **image_processor_kwargs)
        return cls(image_processor, clip_tokenizer(), prompt_templates=config.prompt_templates)

    @property
    def templates(self) -> tuple[str, ...]:
        return resolve_prompt_templates(self.prompt_templates)

    def prompts(self, class_names: Sequence[str]) -> list[str]:
        """All prompt strings, class-major: [t0(c0), t1(c0), ..., t0(c1), ...]."""
        names = validate_class_names(class_names)
        return [template.format(name.split(", ")[0]) for name in names for template in self.templates]

    def tokenize_classes(self, class_names: Sequence[str], **text_kwargs: Any) -> dict[str, torch.Tensor]:
        """Token ids (num_classes, num_templates, seq_len) and attention mask of every (class, template) prompt.

        `text_kwargs` override the tokenizer settings of `CATSegProcessor.text_kwargs` (padding, truncation,
        max_length); the result is always torch tensors."""
        prompts = self.prompts(class_names)
        settings = {**self.text_kwargs, **text_kwargs, "return_tensors": "pt"}
        encoded = self.tokenizer(prompts, **settings)
        self._warn_truncated(class_names, prompts)
        shape = (len(prompts) // len(self.templates), len(self.templates), -1)
        return {"input_ids": encoded["input_ids"].view(shape), "attention_mask": encoded["attention_mask"].view(shape)}

    def _warn_truncated(self, class_names: Sequence[str], prompts: Sequence[str]) -> None:
        """CLIP reads 77 tokens; a longer prompt loses its end (and the class name may be cut): say which."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]
        per_class = len(self.templates)
        cut = {name: max(lengths[i * per_class : (i + 1) * per_class]) for i, name in enumerate(class_names)}
        cut = {name: length for name, length in cut.items() if length > CLIP_MAX_TOKENS}
        if cut:
            shown = ", ".join(f"{name[:40]!r} ({length} tokens)" for name, length in list(cut.items())[:3])
            logger.warning(
                "%d class name(s) make prompts longer than CLIP's %d tokens and are cut at the end: %s; shorten them",
                len(cut), CLIP_MAX_TOKENS, shown,
            )

    def __call__(
        self,
        images=None,
        text: Sequence[str] | None = None,
        concepts: Mapping[str, Sequence[str]] | None = None,
        **kwargs: Unpack[CATSegProcessorKwargs],
    ):
        """Prepare images and/or a list of class names (the vocabulary shared by the whole batch).

        `concepts` (`{class name: [concept, ...]}`, VocAlign's vocabulary alignment) scores each class with its name
        and its concepts: `input_ids` are then those of every entry (the names and concepts, class-major) and
        `entry_class_ids` (num_entries,) gives each entry's class, which the model sums back (Eq. 7). `concepts={}`
        scores the names alone, even with a model that holds concepts of its own. Image options go to
        [`CATSegImageProcessor.preprocess`] and tokenizer options to the class prompts' tokenisation; an option
        neither takes is an error.
        """
        if images is None and text is None:
            raise ValueError("Give `images`, `text` (a list of class names), or both.")
        if concepts is not None and text is None:
            raise ValueError("`concepts` belong to class names: give `text` (the class names) too.")
        self._check_options(kwargs)
        options = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        data: dict[str, Any] = {}
        if images is not None:
            data.update(self.image_processor(images, **options["images_kwargs"]))
        if text is not None:
            text_options = {k: v for k, v in options["text_kwargs"].items() if k != "return_tensors"}
            if concepts is not None:
                text, data["entry_class_ids"] = aligned_entries(text, concepts)
            data.update({name: ids.flatten(0, 1) for name, ids in self.tokenize_classes(text, **text_options).items()})
        return_tensors = options["text_kwargs" if text is not None else "images_kwargs"].get("return_tensors")
        return BatchFeature(data, tensor_type=return_tensors)

    def _check_options(self, kwargs: dict[str, Any]) -> None:
        """transformers' processors only warn about an unknown option and drop it; here it is an error."""
        fields = CATSegProcessorKwargs.__annotations__
        known = {*fields, "common_kwargs", *CATSegImageProcessorKwargs.__annotations__}
        unknown = sorted(set(kwargs) - known - set(fields["text_kwargs"].__annotations__))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {unknown}")

    def post_process_semantic_segmentation(self, *args, **kwargs):
        """See [`CATSegImageProcessor.post_process_semantic_segmentation`]."""
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)
