"""Tests for vocalign_hf.metrics: streaming mIoU and the packaged `evaluate` mean_iou module."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from vocalign_hf.metrics import (
    MEAN_IOU_MODULE_DIR,
    StreamingMeanIoU,
    confusion_matrix,
    load_mean_iou,
    remap_labels,
)

IGNORE = 255
RESULT_KEYS = {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"}


# --------------------------------------------------------------------------- helpers


def naive_miou(preds: list, refs: list, num_classes: int, ignore_index: int = IGNORE) -> dict:
    """Independent reference: per-class loops over boolean masks, pooled over all images."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    ref_area = np.zeros(num_classes)
    for p, r in zip(preds, refs):
        p = np.asarray(p).ravel()
        r = np.asarray(r).ravel()
        valid = r != ignore_index
        p, r = p[valid], r[valid]
        for c in range(num_classes):
            pc, rc = p == c, r == c
            inter[c] += np.logical_and(pc, rc).sum()
            union[c] += np.logical_or(pc, rc).sum()
            ref_area[c] += rc.sum()
    iou = np.array([inter[c] / union[c] if union[c] > 0 else np.nan for c in range(num_classes)])
    acc = np.array([inter[c] / ref_area[c] if ref_area[c] > 0 else np.nan for c in range(num_classes)])
    present_iou = [v for v in iou if not np.isnan(v)]
    present_acc = [v for v in acc if not np.isnan(v)]
    return {
        "mean_iou": sum(present_iou) / len(present_iou),
        "mean_accuracy": sum(present_acc) / len(present_acc),
        "overall_accuracy": inter.sum() / ref_area.sum(),
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }


def assert_results_close(got: dict, expected: dict) -> None:
    assert RESULT_KEYS <= set(got)
    for k in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert got[k] == pytest.approx(expected[k], rel=1e-12, abs=1e-12), k
    for k in ("per_category_iou", "per_category_accuracy"):
        np.testing.assert_allclose(np.asarray(got[k], dtype=float), expected[k], rtol=1e-12, atol=1e-12, equal_nan=True)


def random_batches(seed: int, num_batches: int, num_classes: int, shape=(2, 17, 23), used_classes=None):
    """Random (pred, ref) batches; ~10% ignore pixels in refs; optionally only some classes used."""
    rng = np.random.default_rng(seed)
    used = np.arange(num_classes) if used_classes is None else np.asarray(used_classes)
    out = []
    for _ in range(num_batches):
        ref = rng.choice(used, size=shape)
        # correlated predictions: 60% correct, rest random among used classes
        pred = np.where(rng.random(shape) < 0.6, ref, rng.choice(used, size=shape))
        ref = np.where(rng.random(shape) < 0.1, IGNORE, ref)
        out.append((pred, ref))
    return out


# Tiny hand-computed case (2x3 image, 3 classes)
TINY_PRED = np.array([[0, 0, 1], [1, 2, 2]])
TINY_REF = np.array([[0, 1, 1], [1, 2, 0]])
# rows = reference, columns = prediction
TINY_CONFMAT = np.array([[1, 0, 1], [1, 2, 0], [0, 0, 1]])


# --------------------------------------------------------------------------- (a) vs naive numpy


def test_streaming_matches_naive_numpy_over_batches():
    num_classes = 7
    batches = random_batches(seed=0, num_batches=4, num_classes=num_classes, used_classes=range(6))  # class 6 absent
    metric = StreamingMeanIoU(num_classes=num_classes)
    for i, (pred, ref) in enumerate(batches):
        if i % 2 == 0:  # mix input types: torch tensors and numpy (uint8) arrays
            metric.update(torch.from_numpy(pred), torch.from_numpy(ref))
        else:
            metric.update(pred.astype(np.uint8), ref.astype(np.uint8))
    got = metric.compute()
    expected = naive_miou([p for p, _ in batches], [r for _, r in batches], num_classes)
    assert_results_close(got, expected)
    assert np.isnan(got["per_category_iou"][6])
    assert metric.confusion_matrix.dtype == torch.int64
    assert metric.confusion_matrix.shape == (num_classes, num_classes)
    n_valid = sum(int((r != IGNORE).sum()) for _, r in batches)
    assert int(metric.confusion_matrix.sum()) == n_valid


def test_confusion_matrix_function_layout():
    cm = confusion_matrix(TINY_PRED, TINY_REF, num_classes=3)
    np.testing.assert_array_equal(cm.numpy(), TINY_CONFMAT)


# --------------------------------------------------------------------------- (b) hand-computed


def test_tiny_hand_computed_case():
    metric = StreamingMeanIoU(num_classes=3)
    metric.update(TINY_PRED, TINY_REF)
    np.testing.assert_array_equal(metric.confusion_matrix.numpy(), TINY_CONFMAT)
    res = metric.compute()
    # class 0: inter 1, union 3; class 1: inter 2, union 3; class 2: inter 1, union 2
    np.testing.assert_allclose(res["per_category_iou"], [1 / 3, 2 / 3, 1 / 2])
    # class 0: 1/2 ref pixels correct; class 1: 2/3; class 2: 1/1
    np.testing.assert_allclose(res["per_category_accuracy"], [1 / 2, 2 / 3, 1.0])
    assert res["mean_iou"] == pytest.approx(0.5)
    assert res["mean_accuracy"] == pytest.approx(13 / 18)
    assert res["overall_accuracy"] == pytest.approx(4 / 6)


def test_hub_documented_example():
    """The example from the Hub `mean_iou` metric card, with its documented output."""
    preds = [
        np.array([[1, 2], [3, 4], [5, 255]]),
        np.array([[2, 7], [9, 2], [3, 6]]),
        np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]]),
    ]
    refs = [
        np.array([[0, 3], [5, 4], [6, 255]]),
        np.array([[1, 7], [9, 2], [3, 6]]),
        np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]]),
    ]
    metric = StreamingMeanIoU(num_classes=10, ignore_index=255)
    for p, r in zip(preds, refs):
        metric.update(p, r)
    res = metric.compute()
    assert res["mean_iou"] == pytest.approx(0.4775)
    assert res["mean_accuracy"] == pytest.approx(0.5916666666666666)
    assert res["overall_accuracy"] == pytest.approx(0.5263157894736842)
    np.testing.assert_allclose(res["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])
    np.testing.assert_allclose(
        res["per_category_accuracy"], [0, 0, 0.75, 2 / 3, 1, 0, 0.5, 1, 1, 1], rtol=1e-7
    )


# --------------------------------------------------------------------------- (c) ignore index


def test_ignore_index_excluded():
    ref = TINY_REF.copy()
    ref[1, 2] = IGNORE  # was class 0, predicted as 2
    base = StreamingMeanIoU(num_classes=3)
    base.update(TINY_PRED, ref)
    res = base.compute()
    assert int(base.confusion_matrix.sum()) == 5
    # class 0: ref {(0,0)}, pred {(0,0),(0,1)} -> 1/2; class 1 unchanged 2/3; class 2: pred==ref=={(1,1)} -> 1
    np.testing.assert_allclose(res["per_category_iou"], [1 / 2, 2 / 3, 1.0])
    assert res["overall_accuracy"] == pytest.approx(4 / 5)

    # whatever is predicted at an ignored pixel (even an out-of-range value) changes nothing
    for garbage in (0, 1, 2, 255):
        pred = TINY_PRED.copy()
        pred[1, 2] = garbage
        m = StreamingMeanIoU(num_classes=3)
        m.update(pred, ref)
        assert torch.equal(m.confusion_matrix, base.confusion_matrix)

    # a custom ignore_index works the same way
    m = StreamingMeanIoU(num_classes=3, ignore_index=-1)
    ref_neg = np.where(ref == IGNORE, -1, ref)
    m.update(TINY_PRED, ref_neg)
    assert torch.equal(m.confusion_matrix, base.confusion_matrix)


# --------------------------------------------------------------------------- (d) absent class


def test_absent_class_is_nan_and_excluded_from_mean():
    metric = StreamingMeanIoU(num_classes=5)
    metric.update(TINY_PRED, TINY_REF)  # classes 3 and 4 never appear
    pred = np.array([[4, 4]])
    ref = np.array([[0, 0]])  # class 4 predicted but absent from the reference
    metric.update(pred, ref)
    res = metric.compute()
    iou, acc = res["per_category_iou"], res["per_category_accuracy"]
    assert np.isnan(iou[3]) and np.isnan(acc[3])
    assert iou[4] == 0.0  # union > 0 -> a real 0, counted in the mean
    assert np.isnan(acc[4])  # no reference pixel -> accuracy undefined
    # class 0 now: inter 1, ref 4, pred 2 -> union 5
    np.testing.assert_allclose(iou[:3], [1 / 5, 2 / 3, 1 / 2])
    assert res["mean_iou"] == pytest.approx((1 / 5 + 2 / 3 + 1 / 2 + 0.0) / 4)
    assert res["mean_accuracy"] == pytest.approx((1 / 4 + 2 / 3 + 1.0) / 3)
    assert not math.isnan(res["mean_iou"])

    filled = metric.compute(nan_to_num=-1)
    assert filled["per_category_iou"][3] == -1 and filled["per_category_accuracy"][4] == -1


def test_empty_metric_is_all_nan():
    res = StreamingMeanIoU(num_classes=3).compute()
    assert math.isnan(res["mean_iou"]) and math.isnan(res["overall_accuracy"])
    assert np.isnan(res["per_category_iou"]).all()


# --------------------------------------------------------------------------- (e) evaluate module


@pytest.fixture
def isolated_evaluate_cache(tmp_path, monkeypatch):
    """Point evaluate's module/metric caches at tmp_path, isolating the dynamic `evaluate_modules` package."""
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", tmp_path / "metrics")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_CACHE", tmp_path / "evaluate")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(sys, "path", list(sys.path))

    def dynamic_modules():
        return [m for m in sys.modules if m == "evaluate_modules" or m.startswith("evaluate_modules.")]

    for name in dynamic_modules():  # restored by monkeypatch afterwards
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in dynamic_modules():
        del sys.modules[name]


def test_evaluate_module_matches_streaming(isolated_evaluate_cache):
    tmp = isolated_evaluate_cache
    mean_iou = load_mean_iou()
    assert type(mean_iou).__name__ == "MeanIoU"
    # the script was copied into the (redirected) module cache, and nothing else was needed
    assert list((tmp / "modules").rglob("mean_iou.py")), "evaluate did not cache the module in HF_MODULES_CACHE"

    num_classes = 6
    rng = np.random.default_rng(1)
    preds, refs = [], []
    for h, w in [(5, 7), (9, 4), (6, 6)]:  # images of different sizes
        ref = rng.integers(0, num_classes - 1, size=(h, w))  # class 5 absent
        pred = np.where(rng.random((h, w)) < 0.5, ref, rng.integers(0, num_classes - 1, size=(h, w)))
        ref[rng.random((h, w)) < 0.15] = IGNORE
        preds.append(pred)
        refs.append(ref)

    got = mean_iou.compute(predictions=preds, references=refs, num_labels=num_classes, ignore_index=IGNORE)
    stream = StreamingMeanIoU(num_classes=num_classes)
    for p, r in zip(preds, refs):
        stream.update(p, r)
    expected = stream.compute()
    assert set(got) == RESULT_KEYS
    assert_results_close(got, expected)
    assert_results_close(got, naive_miou(preds, refs, num_classes))
    assert np.isnan(got["per_category_iou"][5])

    # incremental add_batch path + nan_to_num
    for p, r in zip(preds, refs):
        mean_iou.add_batch(predictions=[p], references=[r])
    got2 = mean_iou.compute(num_labels=num_classes, ignore_index=IGNORE, nan_to_num=0)
    assert got2["per_category_iou"][5] == 0
    assert got2["mean_iou"] == pytest.approx(expected["mean_iou"])

    # reduce_labels / label_map are applied to the references like the Hub metric
    ref0 = np.array([[0, 1, 2], [3, 3, 0]])
    pred0 = np.array([[1, 0, 1], [2, 2, 0]])
    got3 = mean_iou.compute(
        predictions=[pred0], references=[ref0], num_labels=3, ignore_index=IGNORE, reduce_labels=True
    )
    reduced = remap_labels(ref0, reduce_labels=True)
    np.testing.assert_array_equal(reduced, [[255, 0, 1], [2, 2, 255]])
    s = StreamingMeanIoU(num_classes=3)
    s.update(pred0, reduced)
    assert_results_close(got3, s.compute())
    np.testing.assert_array_equal(remap_labels(ref0, label_map={0: 3, 3: 0}), [[3, 1, 2], [0, 0, 3]])


def test_packaged_script_imports_are_one_per_line():
    """evaluate parses `import x` lines to check dependencies; `import a, b` would be misread."""
    script = MEAN_IOU_MODULE_DIR / "mean_iou.py"
    assert script.is_file()
    import_lines = [ln for ln in script.read_text().splitlines() if ln.startswith("import ")]
    assert import_lines and all("," not in ln for ln in import_lines)


# --------------------------------------------------------------------------- (f) validation


def test_out_of_range_prediction_raises():
    metric = StreamingMeanIoU(num_classes=3)
    pred = TINY_PRED.copy()
    pred[0, 1] = 7
    with pytest.raises(ValueError, match=r"prediction value 7 is out of range"):
        metric.update(pred, TINY_REF)
    pred[0, 1] = -2
    with pytest.raises(ValueError, match=r"prediction value -2"):
        metric.update(torch.from_numpy(pred), torch.from_numpy(TINY_REF))
    assert int(metric.confusion_matrix.sum()) == 0  # nothing accumulated by failed updates

    ref = TINY_REF.copy()
    ref[0, 0] = 3
    with pytest.raises(ValueError, match=r"reference value 3"):
        metric.update(TINY_PRED, ref)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(TINY_PRED, TINY_REF[:1])
    with pytest.raises(TypeError, match="integer class indices"):
        metric.update(TINY_PRED.astype(np.float32), TINY_REF)


# --------------------------------------------------------------------------- (g) merge / reset


def test_merge_equals_single_accumulator_and_reset():
    num_classes = 5
    batches = random_batches(seed=2, num_batches=5, num_classes=num_classes, shape=(3, 11, 13))
    full = StreamingMeanIoU(num_classes)
    a, b = StreamingMeanIoU(num_classes), StreamingMeanIoU(num_classes)
    for i, (p, r) in enumerate(batches):
        full.update(p, r)
        (a if i < 2 else b).update(p, r)
    assert not torch.equal(a.confusion_matrix, full.confusion_matrix)
    merged = a.merge(b)
    assert merged is a
    assert torch.equal(a.confusion_matrix, full.confusion_matrix)
    assert_results_close(a.compute(), full.compute())

    # merging into an empty accumulator copies, and incompatible settings are refused
    empty = StreamingMeanIoU(num_classes).merge(full)
    assert torch.equal(empty.confusion_matrix, full.confusion_matrix)
    with pytest.raises(ValueError, match="different settings"):
        full.merge(StreamingMeanIoU(num_classes + 1))

    full.reset()
    assert int(full.confusion_matrix.sum()) == 0
    assert int(a.confusion_matrix.sum()) > 0


# --------------------------------------------------------------------------- (h) accelerate gather


def test_gather_with_single_process_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == 1
        metric = StreamingMeanIoU(num_classes=4)
        for p, r in random_batches(seed=3, num_batches=2, num_classes=4):
            metric.update(p, r)
        before = metric.confusion_matrix.clone()
        gathered = metric.gather(accelerator)
        assert isinstance(gathered, StreamingMeanIoU)
        assert gathered.confusion_matrix.dtype == torch.int64
        assert torch.equal(gathered.confusion_matrix.cpu(), before)
        assert torch.equal(metric.confusion_matrix, before)  # source untouched, no double counting
        assert gathered.compute()["mean_iou"] == pytest.approx(metric.compute()["mean_iou"])
        # a process that saw no data still takes part with zeros
        assert int(StreamingMeanIoU(num_classes=4).gather(accelerator).confusion_matrix.sum()) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


# --------------------------------------------------------------------------- table


def test_format_table():
    metric = StreamingMeanIoU(num_classes=4)
    metric.update(TINY_PRED, TINY_REF)
    table = metric.format_table(["road", "sidewalk", "building", "wall"])
    lines = table.splitlines()
    assert "road" in table and "building" in table
    row_road = next(ln for ln in lines if "road" in ln)
    assert "33.33" in row_road and "50.00" in row_road
    row_wall = next(ln for ln in lines if "wall" in ln)
    assert "-" in row_wall and "33.33" not in row_wall  # absent class shown as '-'
    assert "mIoU 50.00" in lines[-1]
    with pytest.raises(ValueError, match="class names"):
        metric.format_table(["road"])


def test_update_from_scores_resizes_then_takes_the_argmax():
    torch.manual_seed(0)
    scores, labels = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 32, 32))
    labels[0, :5] = 255
    metric, manual = StreamingMeanIoU(4), StreamingMeanIoU(4)
    metric.update_from_scores(scores, labels)
    upsampled = torch.nn.functional.interpolate(scores, size=(32, 32), mode="bilinear", align_corners=False)
    manual.update(upsampled.argmax(1), labels)
    assert torch.equal(metric.confusion_matrix, manual.confusion_matrix)
    assert int(metric.confusion_matrix.sum()) == 2 * 32 * 32 - 5 * 32
    same_size = StreamingMeanIoU(4)
    same_size.update_from_scores(upsampled, labels)
    assert torch.equal(same_size.confusion_matrix, manual.confusion_matrix)


def test_no_valid_pixel_is_reported_absent_not_nan():
    """All-ignore references give a NaN mIoU (Hub semantics); the report keeps it out of JSON, with the reason."""
    import json

    from vocalign_hf.metrics import StreamingMeanIoU, split_absent_metrics

    metric = StreamingMeanIoU(num_classes=3)
    metric.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), 255))
    result = metric.compute()
    report = {"eval_mean_iou": 100 * result["mean_iou"]}
    report.update({f"eval_iou_{n}": 100 * float(v) for n, v in zip("abc", result["per_category_iou"])})
    finite, absent = split_absent_metrics(report)
    assert finite == {} and set(absent) == set(report)
    assert "no labelled pixel" in absent["eval_mean_iou"] and "'b' is in neither" in absent["eval_iou_b"]
    json.dumps({**finite, "absent": absent}, allow_nan=False)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))  # class 2 never occurs: only its IoU is absent
    finite, absent = split_absent_metrics({f"iou_{n}": float(v) for n, v in zip("abc", metric.compute()["per_category_iou"])})
    assert set(finite) == {"iou_a", "iou_b"} and set(absent) == {"iou_c"}


def test_batch_mean_iou_streams_gathered_batches_and_skips_the_cross_process_padding():
    """The Trainer's compute_metrics: batches in, numbers (percent, NaN for an absent class) only on the last call;
    -100, the loop's padding of shorter maps, counts as no pixel; the counts start afresh after each result."""
    from types import SimpleNamespace

    from vocalign_hf.metrics import BatchMeanIoU

    torch.manual_seed(0)
    predictions, labels = torch.randint(0, 3, (4, 50)), torch.randint(0, 2, (4, 50))  # class "c" never occurs
    labels[0, :7] = IGNORE
    padded_predictions, padded_labels = predictions.clone(), labels.clone()
    padded_predictions[3, 40:], padded_labels[3, 40:] = -100, -100  # a shorter map from another process
    metric = BatchMeanIoU(["a", "b", "c"])
    assert metric(SimpleNamespace(predictions=padded_predictions[:2], label_ids=padded_labels[:2]), False) == {}
    result = metric(SimpleNamespace(predictions=padded_predictions[2:], label_ids=padded_labels[2:]), True)
    reference = StreamingMeanIoU(3)
    reference.update(predictions[:3], labels[:3])
    reference.update(predictions[3, :40], labels[3, :40])
    expected = reference.compute()
    assert result["mean_iou"] == 100 * expected["mean_iou"]
    assert result["iou_a"] == 100 * float(expected["per_category_iou"][0]) and result["iou_a"] > 0
    assert result["iou_c"] == 0.0  # predicted but never in the reference: 0, not absent
    assert metric.table == reference.format_table(["a", "b", "c"])
    assert int(metric.metric.confusion_matrix.sum()) == 0  # a new evaluation starts from zero
    only_a = metric(SimpleNamespace(predictions=np.zeros((1, 4), np.int64), label_ids=np.zeros((1, 4), np.int64)))
    assert only_a["mean_iou"] == 100.0 and math.isnan(only_a["iou_b"])  # numpy input, absent class NaN
