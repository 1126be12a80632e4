"""The concept audit and gate (issue 40): which pixels each concept wins before adapting, and from which class."""

import numpy as np
import pytest
import torch
from PIL import Image

from vocalign_hf.adaptation.concept_audit import ConceptAudit, audit_concepts, format_audit, gate_concepts
from vocalign_hf.adaptation.vocabulary import ConceptVocabulary
from vocalign_hf.errors import UsageError

NAMES = ["sky", "road", "car"]
CONCEPTS = {"road": ["street", "asphalt"], "car": ["vehicle"]}


def test_audit_counts_what_each_concept_wins_from_one_forward(tiny_model, tiny_processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    vocabulary = ConceptVocabulary(NAMES, CONCEPTS)
    rows = audit_concepts(tiny_model, tiny_processor, images, vocabulary, confidence=0.4, batch_size=2)
    assert [(r.class_name, r.concept) for r in rows] == [("road", "street"), ("road", "asphalt"), ("car", "vehicle")]
    # By hand, from the entries' logits of all images at once.
    with torch.no_grad():
        inputs = tiny_processor(images=images, text=vocabulary.entries)
        logits = tiny_model(**inputs, entry_class_ids=torch.arange(vocabulary.num_entries)).logits
    winner = logits.argmax(1)
    names_probs = logits[:, [0, 1, 4]].softmax(1)
    confidence, names_class = names_probs.max(1)
    for row, entry, owner in zip(rows, (2, 3, 5), (1, 1, 2)):
        won = winner == entry
        assert row.pixel_share == pytest.approx(float(won.float().mean()), abs=1e-6)
        if won.any():
            stolen = (names_class[won] != owner) & (confidence[won] >= 0.4)
            assert row.stolen_share == pytest.approx(float(stolen.float().mean()), abs=1e-6)
            assert sum(row.taken_from.values()) == pytest.approx(1.0)
        assert row.class_name_share == pytest.approx(float((names_class == owner).float().mean()), abs=1e-6)
    assert "street" in format_audit(rows, 0.4)


def _row(class_name, concept, stolen, by_name):
    return ConceptAudit(class_name, concept, 0.1, stolen, {}, 0.8, by_name)


def test_gate_drops_a_concept_that_steals_only_when_its_class_is_read_by_name():
    audit = [
        _row("ground", "road", stolen=0.7, by_name=0.30),      # ground is read by its name: "road" steals water
        _row("terrain", "grass", stolen=0.7, by_name=0.0),     # terrain's name is unknown: its concepts must take pixels
        _row("car", "vehicle", stolen=0.2, by_name=0.10),      # mostly its own class's pixels
    ]
    concepts = {"ground": ["road", "street"], "terrain": ["grass"], "car": ["vehicle"]}
    kept, dropped = gate_concepts(concepts, audit, max_stolen_share=0.5)
    assert kept == {"ground": ["street"], "terrain": ["grass"], "car": ["vehicle"]}
    assert [(r.class_name, r.concept) for r in dropped] == [("ground", "road")]
    assert gate_concepts({"ground": ["road"]}, audit[:1], 0.5)[0] == {}  # a class left without concepts is left out


def test_concept_gate_is_a_checked_option_of_its_own_ablation_row(tmp_path):
    from vocalign_hf.adaptation import ABLATIONS, VocAlignArguments

    assert ABLATIONS["concept_gate"]["concept_gate"] == 0.5
    assert all(row["concept_gate"] is None for name, row in ABLATIONS.items() if name != "concept_gate")
    with pytest.raises(UsageError, match="concept_gate"):
        VocAlignArguments(output_dir=str(tmp_path), concept_gate=1.5)
