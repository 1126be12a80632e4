"""transformers' own common tests (ModelTesterMixin, ConfigTester, image processing and processor mixins) on CAT-Seg.

The mixins come from the sdist of the installed transformers release (`common_tests_loader.py`); they are fetched
and cached on first use and the module is skipped only where no package index is reachable. Both variants run the
model mixin: CAT-Seg (CVPR'24, CLIP-only) and v1 (with its ResNet appearance backbone).
"""

from __future__ import annotations

import unittest
from unittest.mock import patch

import pytest
import torch
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from common_tests_loader import CommonTestsUnavailable, load_common_tests
from conftest import tiny_catseg_config, tiny_catseg_v1_config
from vocalign_hf import CATSegConfig, CATSegForSemanticSegmentation, CATSegModel, CATSegProcessor
from vocalign_hf.models.catseg.image_processing_catseg import CATSegImageProcessor
from vocalign_hf.models.catseg.processing_catseg import clip_tokenizer

try:
    common = load_common_tests()
    from transformers_common_tests.test_configuration_common import ConfigTester
    from transformers_common_tests.test_image_processing_common import (
        ImageProcessingTestMixin,
        ImageProcessingTester,
        PostProcessSemanticSegmentationTestMixin,
    )
    from transformers_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor
    from transformers_common_tests.test_processing_common import ProcessorTesterMixin
except CommonTestsUnavailable as error:
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)

NUM_CLASSES = 3
VOCAB_SIZE = 99  # CLIP's 49408 tokens would make the tiny model larger than the common tests allow (1M)

# What registering CAT-Seg inside transformers would add to its name maps: the mixins look models up there (the base
# model has no loss; the segmentation head gets segmentation labels). Patched per test, not for the session.
IN_TREE_NAMES = (
    patch.dict(MODEL_MAPPING_NAMES, {"catseg": "CATSegModel"}),
    patch.dict(MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES, {"catseg": "CATSegForSemanticSegmentation"}),
)


def in_tree(cls):
    for patcher in IN_TREE_NAMES:
        cls = patcher(cls)
    return cls


def common_test_config(config_factory, **overrides) -> CATSegConfig:
    """The tiny config within the common tests' limits: a 99-token vocabulary and a 2-layer vision tower (whose
    first layer then guides both decoder stages)."""
    guidance = {} if config_factory is tiny_catseg_v1_config else {"guidance_layers": [0, 0]}
    config = config_factory(num_labels=NUM_CLASSES, **guidance, **overrides)
    text = config.clip_config.text_config
    text.vocab_size, text.bos_token_id, text.eos_token_id, text.pad_token_id = VOCAB_SIZE, 97, 98, 98
    config.clip_config.vision_config.num_hidden_layers = 2
    return config


class CATSegModelTester:
    """Inputs as a CAT-Seg user gives them: normalised images and one tokenised prompt per class."""

    is_training = True

    def __init__(self, parent, config_factory, batch_size=2):
        self.parent = parent
        self.config_factory = config_factory
        self.batch_size = batch_size
        config = self.get_config()
        self.image_size = config.clip_resolution
        self.num_hidden_layers = config.num_layers  # the aggregator's; its states are the forward's hidden states
        self.hidden_size = config.hidden_dim
        self.grid = config.feature_resolution
        # get_image_features returns the CLIP vision tower's states
        self.vision_config = {"num_hidden_layers": config.clip_config.vision_config.num_hidden_layers}
        self.seq_length = 7

    def get_config(self) -> CATSegConfig:
        return common_test_config(self.config_factory)

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        input_ids = torch.randint(1, 97, (NUM_CLASSES, self.seq_length))
        input_ids[:, 0], input_ids[:, -1] = 97, 98  # start and end of text, as the tokenizer writes them
        labels = torch.randint(0, NUM_CLASSES, (self.batch_size, self.image_size, self.image_size))
        return self.get_config(), pixel_values, input_ids, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, input_ids, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values, "input_ids": input_ids}


@in_tree
class _CATSegModelTest(ModelTesterMixin):
    all_model_classes = (CATSegModel, CATSegForSemanticSegmentation)
    pipeline_model_mapping = {}
    test_resize_embeddings = False
    test_torchscript = False
    has_attentions = False
    # get_image_features' last_hidden_state is CLIP's (vision hidden size); the test looks for a vision config that
    # a CAT-Seg config holds inside clip_config.
    skip_test_image_features_output_shape = True
    config_factory = staticmethod(tiny_catseg_config)

    def setUp(self):
        self.model_tester = CATSegModelTester(self, self.config_factory)
        self.config_tester = ConfigTester(self, config_class=CATSegConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="CAT-Seg has no input embeddings of its own: its inputs are images and class prompts")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="CAT-Seg has no input embeddings of its own: its inputs are images and class prompts")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="CAT-Seg does not output attentions (SDPA); this test asks every output, attentions included")
    def test_capture_outputs_decorator(self):
        pass

    def test_hidden_states_output(self):
        # Overridden as in transformers' SegFormer tests: the states are cost-volume embeddings, not token sequences.
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        tester = self.model_tester
        expected = (tester.batch_size, tester.hidden_size, NUM_CLASSES, tester.grid, tester.grid)
        for model_class in self.all_model_classes:
            for from_config in (False, True):
                config.output_hidden_states = from_config
                model = model_class(config).eval()
                with torch.no_grad():
                    outputs = model(**inputs) if from_config else model(**inputs, output_hidden_states=True)
                self.assertEqual(len(outputs.hidden_states), tester.num_hidden_layers + 1)
                self.assertTrue(all(tuple(h.shape) == expected for h in outputs.hidden_states))


class CATSegModelTest(_CATSegModelTest, unittest.TestCase):
    pass


class CATSegV1ModelTest(_CATSegModelTest, unittest.TestCase):
    config_factory = staticmethod(tiny_catseg_v1_config)


class CATSegImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent):
        super().__init__(parent, batch_size=3, min_resolution=20, max_resolution=60, size={"height": 32, "width": 32},
                         num_labels=NUM_CLASSES)

    def _get_image_processing_classes(self):
        return {"pil": CATSegImageProcessor}


class CATSegImageProcessingTest(ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin,
                                unittest.TestCase):
    image_processor_tester_class = CATSegImageProcessingTester

    @unittest.skip(reason="torchvision does not load with the torch release the project supports (2.13); the "
                          "processor runs its image operations in torch itself")
    def test_new_models_require_torchvision_backend(self):
        pass


# In-tree processors are not registered for remote code; registered, saving adds `auto_map` to the saved processor
# only (custom_object_save), which the save/load comparisons would count. Hub loading is tested in test_hub.py.
@patch.object(CATSegProcessor, "_auto_class", None)
@patch.object(CATSegImageProcessor, "_auto_class", None)
class CATSegProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = CATSegProcessor

    @staticmethod
    def prepare_processor_dict():
        # The bare class name as its prompt, so that the text side compares with the tokenizer's own output.
        return {"prompt_templates": ["{}"]}

    def prepare_text_inputs(self, batch_size=None, modalities=None):
        # CAT-Seg's text is a vocabulary: a list of class names, never one string (a string is refused).
        text = super().prepare_text_inputs(batch_size=batch_size, modalities=modalities)
        return [text] if isinstance(text, str) else text

    @classmethod
    def _setup_tokenizer(cls):
        return clip_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return CATSegImageProcessor(size={"height": 32, "width": 32})
