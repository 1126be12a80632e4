"""Prompt templates for building CLIP text embeddings of class names.

``IMAGENET`` is the 80-template ensemble of the OpenAI CLIP ImageNet notebook, ``IMAGENET_SELECT`` the
7+1 selection CAT-Seg v1 used, ``IMAGENET_SELECT_CLIP`` the larger selection of CAT-Seg (data, not code), and
``SINGLE`` the one template of the released CVPR'24 CAT-Seg configs.
"""

from __future__ import annotations

SINGLE: tuple[str, ...] = ("A photo of a {} in the scene",)

IMAGENET: tuple[str, ...] = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

IMAGENET_SELECT: tuple[str, ...] = (
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
    'A photo of a {} in the scene',
)

IMAGENET_SELECT_CLIP: tuple[str, ...] = (
    'a bad photo of the {}.',
    'a photo of the large {}.',
    'a photo of the small {}.',
    'a cropped photo of a {}.',
    'This is a photo of a {}',
    'This is a photo of a small {}',
    'This is a photo of a medium {}',
    'This is a photo of a large {}',
    'This is a masked photo of a {}',
    'This is a masked photo of a small {}',
    'This is a masked photo of a medium {}',
    'This is a masked photo of a large {}',
    'This is a cropped photo of a {}',
    'This is a cropped photo of a small {}',
    'This is a cropped photo of a medium {}',
    'This is a cropped photo of a large {}',
    'A photo of a {} in the scene',
    'a bad photo of the {} in the scene',
    'a photo of the large {} in the scene',
    'a photo of the small {} in the scene',
    'a cropped photo of a {} in the scene',
    'a photo of a masked {} in the scene',
    'There is a {} in the scene',
    'There is the {} in the scene',
    'This is a {} in the scene',
    'This is the {} in the scene',
    'This is one {} in the scene',
    'There is a masked {} in the scene',
    'There is the masked {} in the scene',
    'This is a masked {} in the scene',
    'This is the masked {} in the scene',
    'This is one masked {} in the scene',
)

# The 10-template "imagenet_select_clip" of the mmsegmentation CAT-Seg v1 that VocAlign's configs use
# (andraghetti/VocAlign, CAT-Seg/cat_seg/utils/clip_templates.py); the CVPR'24 set of that name has 32.
VOCALIGN_SELECT_CLIP = (
    'a cropped photo of a {}.',
    'This is a photo of a {}',
    'This is a masked photo of a {}',
    'This is a cropped photo of a {}',
    'A photo of a {} in the scene',
    'a bad photo of the {} in the scene',
    'a cropped photo of a {} in the scene',
    'There is a {} in the scene',
    'This is a masked {} in the scene',
    'This is one masked {} in the scene',
)

PROMPT_TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": SINGLE,
    "imagenet": IMAGENET,
    "imagenet_select": IMAGENET_SELECT,
    "imagenet_select_clip": IMAGENET_SELECT_CLIP,
    "vocalign_select_clip": VOCALIGN_SELECT_CLIP,
}


def resolve_prompt_templates(templates: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Return the template tuple for a set name (``"single"``, ``"imagenet"``, ...) or validate a user list.

    Every template must contain exactly one ``{}`` placeholder for the class name.
    """
    if isinstance(templates, str):
        if templates not in PROMPT_TEMPLATE_SETS:
            raise ValueError(
                f"Unknown prompt template set {templates!r}; known sets: {sorted(PROMPT_TEMPLATE_SETS)} "
                "(or pass a list of templates with one '{}' each)."
            )
        return PROMPT_TEMPLATE_SETS[templates]
    templates = tuple(templates)
    if not templates:
        raise ValueError("prompt_templates is empty: give at least one template such as 'a photo of a {}.'")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f"Each prompt template needs exactly one '{{}}' placeholder; these do not: {bad}")
    return templates
