"""The concept audit and guard (issue 40): which pixels each concept wins before adapting, and from which class."""

import numpy as np
import pytest
import torch
from PIL import Image

from vocalign_hf.adaptation.concept_audit import ConceptAudit, audit_concepts, format_audit, guard_concepts
from vocalign_hf.adaptation.vocabulary import ConceptVocabulary

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


def test_audit_names_the_class_whose_confident_pixels_a_concept_takes(tiny_model, tiny_processor):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    vocabulary = ConceptVocabulary(NAMES, CONCEPTS)
    rows = audit_concepts(tiny_model, tiny_processor, images, vocabulary, confidence=0.4, min_territory=0.0)
    with torch.no_grad():
        inputs = tiny_processor(images=images, text=vocabulary.entries)
        logits = tiny_model(**inputs, entry_class_ids=torch.arange(vocabulary.num_entries)).logits
    winner = logits.argmax(1)
    confidence, names_class = logits[:, [0, 1, 4]].softmax(1).max(1)
    confident = confidence >= 0.4
    for row, entry, owner in zip(rows, (2, 3, 5), (1, 1, 2)):
        shares = {c: float(((winner == entry) & confident & (names_class == c)).sum())
                  / max(float((confident & (names_class == c)).sum()), 1.0) for c in range(3) if c != owner}
        best = max(shares.values())
        assert row.victim_share == pytest.approx(best, abs=1e-6)
        assert row.victim == (NAMES[max(shares, key=shares.get)] if best > 0 else None)


def _row(class_name, concept, victim_share, by_name, victim="water"):
    return ConceptAudit(class_name, concept, 0.1, 0.5, {}, 0.8, by_name, victim=victim, victim_share=victim_share)


def test_guard_weighs_down_a_concept_that_takes_a_class_only_when_its_own_class_is_read_by_name():
    audit = [
        _row("ground", "road", victim_share=0.5, by_name=0.30),    # ground is read by its name: "road" takes water
        _row("terrain", "grass", victim_share=0.5, by_name=0.0),   # terrain's name is unknown: grass must find it
        _row("car", "vehicle", victim_share=0.1, by_name=0.10),    # takes little of any other class
        _row("sky", "heaven", victim_share=0.0, by_name=0.3, victim=None),
    ]
    weights, guarded = guard_concepts(audit)
    assert weights == {"ground": {"road": -1.5}}
    assert [(r.class_name, r.concept) for r in guarded] == [("ground", "road")]
    assert guard_concepts(audit, max_victim_share=0.05, log_weight=-2.0)[0] == {
        "ground": {"road": -2.0}, "car": {"vehicle": -2.0}}


def test_teacher_vocabulary_weighs_down_a_concept_before_the_classes_are_summed():
    vocabulary = ConceptVocabulary(NAMES, CONCEPTS)
    weighted = vocabulary.with_log_weights({"road": {"street": -1.5}})
    logits = torch.randn(2, vocabulary.num_entries, 3, 3)
    shifted = logits.clone()
    shifted[:, 2] -= 1.5
    torch.testing.assert_close(weighted.aggregate(logits), vocabulary.aggregate(shifted))
    assert vocabulary.entry_log_weights is None  # the original is unchanged (the student's vocabulary)
    with pytest.raises(ValueError, match="no concept 'asphalt' of class 'car'"):
        vocabulary.with_log_weights({"car": {"asphalt": -1.0}})


def test_concept_guard_is_an_option_of_its_own_ablation_row():
    from vocalign_hf.adaptation import ABLATIONS

    guarded = {"concept_guard", "names_concept_guard"}
    assert all(ABLATIONS[name]["concept_guard"] is True for name in guarded)
    assert all(row["concept_guard"] is False for name, row in ABLATIONS.items() if name not in guarded)
    assert ABLATIONS["names_concept_guard"] == {**ABLATIONS["adaptive_topk"], "concept_guard": True}
