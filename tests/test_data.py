"""Tests of vocalign_hf.data: dataset metadata, Cityscapes / folder loaders, Hub normalisation (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

import vocalign_hf.data as vdata
from vocalign_hf.data import (
    ADE20K_150_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    PASCAL_CONTEXT_59_CLASSES,
    DatasetInfo,
    DatasetNotOnHubError,
    detect_cityscapes_label_encoding,
    get_dataset_info,
    load_cityscapes,
    load_class_names,
    load_hub_dataset,
    load_image_folder,
    map_label_ids,
    normalize_segmentation_dataset,
    reduce_labels,
)

# Official cityscapesScripts labels.py: labelId -> trainId for the 19 evaluated classes; all others -> 255.
EVALUATED = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip


def expected_train_ids(label_ids: np.ndarray) -> np.ndarray:
    out = np.full(label_ids.shape, 255, dtype=np.int64)
    for lid, tid in EVALUATED.items():
        out[label_ids == lid] = tid
    return out


# ---------------------------------------------------------------------------------------------------------------
# dataset_info
# ---------------------------------------------------------------------------------------------------------------


def test_known_datasets_sizes_and_order():
    cs, ade, pc = (get_dataset_info(n) for n in ("cityscapes", "ade20k_150", "pascal_context_59"))
    assert cs.num_classes == 19 and len(cs.palette) == 19
    assert cs.class_names[:3] == ("road", "sidewalk", "building") and cs.class_names[-1] == "bicycle"
    assert cs.palette[0] == (128, 64, 128) and cs.palette[13] == (0, 0, 142)  # road, car
    assert ade.num_classes == 150 and len(set(ade.class_names)) == 150 and len(ade.palette) == 150
    assert ade.class_names[:4] == ("wall", "building", "sky", "floor") and ade.class_names[-1] == "flag"
    assert pc.num_classes == 59 and list(pc.class_names) == sorted(pc.class_names)  # alphabetical by original id
    assert pc.class_names[0] == "aeroplane" and pc.class_names[-1] == "wood"
    assert all(i.ignore_index == IGNORE_INDEX == 255 for i in (cs, ade, pc))
    assert ade.reduce_labels and pc.reduce_labels and not cs.reduce_labels
    assert cs.id2label[18] == "bicycle" and ade.label2id["wall"] == 0
    assert CITYSCAPES_CLASSES is cs.class_names and ADE20K_150_CLASSES == ade.class_names
    assert PASCAL_CONTEXT_59_CLASSES == pc.class_names


def test_cityscapes_label_table_matches_official():
    table = dict(CITYSCAPES_LABEL_ID_TO_TRAIN_ID)
    assert set(table) == set(range(34)) | {-1}
    for lid in range(34):
        assert table[lid] == EVALUATED.get(lid, 255), lid
    assert table[-1] == 255
    assert sorted(v for v in table.values() if v != 255) == list(range(19))


def test_get_dataset_info_aliases_and_error():
    assert get_dataset_info("ADE20K").name == "ade20k_150"
    assert get_dataset_info("scene_parse_150").name == "ade20k_150"
    assert get_dataset_info("PC-59").name == "pascal_context_59"
    assert get_dataset_info("Chris1/cityscapes").name == "cityscapes"
    with pytest.raises(ValueError) as e:
        get_dataset_info("camvid")
    msg = str(e.value)
    assert "camvid" in msg and "cityscapes" in msg and "ade20k_150" in msg and "pascal_context_59" in msg


def test_map_label_ids_every_case_and_out_of_range():
    ids = np.arange(0, 40, dtype=np.uint8).reshape(4, 10)  # 0..33 plus 34..39 (invalid)
    out = map_label_ids(ids, CITYSCAPES_LABEL_ID_TO_TRAIN_ID)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected_train_ids(ids))
    signed = np.array([[-1, 7, 1000, -5]], dtype=np.int32)  # license plate, road, too large, unknown negative
    np.testing.assert_array_equal(map_label_ids(signed, CITYSCAPES_LABEL_ID_TO_TRAIN_ID), [[255, 0, 255, 255]])


def test_reduce_labels():
    m = np.array([[0, 1, 2], [150, 255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_labels(m), [[255, 0, 1], [149, 255, 255]])
    assert get_dataset_info("ade20k").convert_label(m).tolist() == [[255, 0, 1], [149, 255, 255]]
    # without_reduce_labels (CAT-Seg PC-59 masks 0..58 + 255) keeps values
    assert get_dataset_info("pc59").without_reduce_labels().convert_label(m).tolist() == m.tolist()


def test_dataset_info_validation_and_colorize():
    with pytest.raises(ValueError, match="duplicate"):
        DatasetInfo.from_class_names(["a", "b", "a"])
    with pytest.raises(ValueError, match="ignore_index"):
        DatasetInfo.from_class_names(["c%d" % i for i in range(300)])  # 255 would be a class id
    custom = DatasetInfo.from_class_names(["x", "y"], name="mine")
    assert len(custom.palette) == 2 and custom.palette[0] != custom.palette[1]
    rgb = get_dataset_info("cityscapes").colorize(np.array([[0, 255], [13, 18]]))
    assert rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == (128, 64, 128) and tuple(rgb[0, 1]) == (0, 0, 0) and tuple(rgb[1, 0]) == (0, 0, 142)


# ---------------------------------------------------------------------------------------------------------------
# Cityscapes folder layout
# ---------------------------------------------------------------------------------------------------------------

CITIES = {"aachen": 2, "bochum": 1}


def _label_ids_mask(seed: int) -> np.ndarray:
    """32x64 labelIds mask containing every id 0..33 (evaluated ones and ones mapped to 255)."""
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 34, size=(32, 64)).astype(np.uint8)
    m.flat[:34] = np.arange(34, dtype=np.uint8)
    return m


def _make_cityscapes(root: Path, split: str = "val", train_ids: bool = False) -> dict[str, np.ndarray]:
    masks = {}
    k = 0
    for city, n in CITIES.items():
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"{city}_000000_{i:06d}"
            img = np.full((32, 64, 3), 10 * k, dtype=np.uint8)
            Image.fromarray(img).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            m = _label_ids_mask(k)
            Image.fromarray(m).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            if train_ids:
                # deliberately NOT the mapping of the labelIds file, to see which file was read
                Image.fromarray(np.full((32, 64), 5, np.uint8)).save(
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
                )
            masks[stem] = m
            k += 1
    return masks


def test_load_cityscapes_maps_label_ids(tmp_path):
    raw = _make_cityscapes(tmp_path)
    ds = load_cityscapes(tmp_path, "val")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 3
    assert ds.column_names == ["image", "label"]
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["label"], datasets.Image)
    for i, stem in enumerate(sorted(raw)):  # aachen_0, aachen_1, bochum_0
        ex = ds[i]
        assert ex["image"].size == (64, 32)
        assert np.asarray(ex["image"])[0, 0, 0] == 10 * i  # order: city then file name
        label = np.asarray(ex["label"])
        np.testing.assert_array_equal(label, expected_train_ids(raw[stem]))
        assert set(np.unique(label)) == set(range(19)) | {IGNORE_INDEX}


def test_load_cityscapes_prefers_train_ids_and_split_alias(tmp_path):
    _make_cityscapes(tmp_path, train_ids=True)
    ds = load_cityscapes(tmp_path, "validation")
    assert np.unique(np.asarray(ds[0]["label"])).tolist() == [5]
    forced = load_cityscapes(tmp_path, "val", label_type="labelIds")
    assert np.unique(np.asarray(forced[0]["label"])).tolist() != [5]


def test_load_cityscapes_unlabeled_and_cities(tmp_path):
    _make_cityscapes(tmp_path, split="train")
    import shutil

    shutil.rmtree(tmp_path / "gtFine")
    ds = load_cityscapes(tmp_path, "train", with_labels=False)
    assert ds.column_names == ["image"] and len(ds) == 3
    assert len(load_cityscapes(tmp_path, "train", with_labels=False, cities=["bochum"])) == 1
    with pytest.raises(FileNotFoundError, match="gtFine"):
        load_cityscapes(tmp_path, "train")


def test_load_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_cityscapes(tmp_path / "nowhere")
    _make_cityscapes(tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit[/\\]train"):
        load_cityscapes(tmp_path, "train")
    missing = tmp_path / "gtFine" / "val" / "bochum" / "bochum_000000_000000_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_cityscapes(tmp_path, "val")
    assert "bochum_000000_000000_leftImg8bit.png" in str(e.value) and missing.name in str(e.value)
    with pytest.raises(ValueError, match="split"):
        load_cityscapes(tmp_path, "dev")


# ---------------------------------------------------------------------------------------------------------------
# Plain folders + class lists
# ---------------------------------------------------------------------------------------------------------------


def _make_folder(tmp_path: Path, stems=("b", "a", "c"), mask_stems=None, ext=".jpg"):
    img_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    for i, s in enumerate(stems):
        Image.new("RGB", (8, 6), (i * 40, 0, 0)).save(img_dir / f"{s}{ext}")
    for i, s in enumerate(mask_stems if mask_stems is not None else stems):
        Image.fromarray(np.full((6, 8), i, np.uint8)).save(mask_dir / f"{s}.png")
    return img_dir, mask_dir


def test_image_folder_with_masks_and_classes(tmp_path):
    img_dir, mask_dir = _make_folder(tmp_path)
    (img_dir / "notes.txt").write_text("not an image")
    ds = load_image_folder(img_dir, mask_dir)
    assert ds.column_names == ["image", "label"] and len(ds) == 3
    # sorted by stem: a (mask value 1), b (0), c (2): masks follow their image
    assert [int(np.asarray(ds[i]["label"])[0, 0]) for i in range(3)] == [1, 0, 2]
    assert [int(np.asarray(ds[i]["image"])[0, 0, 0]) for i in range(3)] == pytest.approx([40, 0, 80], abs=3)
    (tmp_path / "classes.json").write_text(json.dumps(["sky", "road", "car"]))
    (tmp_path / "classes_obj.json").write_text(json.dumps({"classes": ["sky", "road"]}))
    assert load_class_names(tmp_path / "classes.json") == ["sky", "road", "car"]
    assert load_class_names(tmp_path / "classes_obj.json") == ["sky", "road"]
    unlabeled = load_image_folder(img_dir)
    assert unlabeled.column_names == ["image"] and len(unlabeled) == 3


def test_image_folder_mismatch_names_files(tmp_path):
    img_dir, mask_dir = _make_folder(tmp_path, stems=("a", "b", "c"), mask_stems=("a", "c", "zz"))
    with pytest.raises(ValueError) as e:
        load_image_folder(img_dir, mask_dir)
    msg = str(e.value)
    assert "b.jpg" in msg and "zz.png" in msg and "a.jpg" not in msg
    # non-strict: extra masks are fine but an image without mask still fails
    with pytest.raises(ValueError, match="b.jpg"):
        load_image_folder(img_dir, mask_dir, strict=False)


def test_image_folder_recursive_suffix_and_reduce(tmp_path):
    img_dir, mask_dir = tmp_path / "img", tmp_path / "ann"
    (img_dir / "x").mkdir(parents=True)
    (mask_dir / "x").mkdir(parents=True)
    Image.new("L", (4, 4), 7).save(img_dir / "top.png")
    Image.new("RGB", (4, 4)).save(img_dir / "x" / "deep.webp")
    Image.fromarray(np.array([[0, 1], [2, 150]], np.uint8).repeat(2, 0).repeat(2, 1)).save(mask_dir / "top_mask.png")
    Image.fromarray(np.ones((4, 4), np.uint8)).save(mask_dir / "x" / "deep_mask.png")
    assert len(load_image_folder(img_dir)) == 1  # not recursive
    with pytest.raises(FileNotFoundError, match="recursive"):
        load_image_folder(img_dir / "x" / "..", None, image_suffix="_nomatch")
    ds = load_image_folder(img_dir, mask_dir, recursive=True, mask_suffix="_mask", dataset_info="ade20k")
    assert len(ds) == 2
    labels = {int(np.asarray(ds[i]["image"].convert("L"))[0, 0]): np.asarray(ds[i]["label"]) for i in range(2)}
    np.testing.assert_array_equal(np.unique(labels[7]), [0, 1, 149, 255])  # ADE reduce labels applied
    with pytest.raises(FileNotFoundError, match="mask folder"):
        load_image_folder(img_dir, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_image_folder(tmp_path / "missing")


@pytest.mark.parametrize(
    "content, match",
    [
        ("[\"a\", ", "not valid JSON"),
        ("[]", "empty"),
        ("[\"a\", \"b\", \"a\"]", "duplicate"),
        ("[\"a\", 3]", "entry 1 is int"),
        ("[\"a\", \"  \"]", "entry 1 is blank"),
        ("{\"names\": [\"a\"]}", "classes"),
        ("\"road\"", "list"),
    ],
)
def test_class_json_validation(tmp_path, content, match):
    p = tmp_path / "classes.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        load_class_names(p)
    assert "classes.json" in str(e.value)


def test_class_json_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_class_names(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------------------------
# Hub normalisation (offline: locally built datasets with the Hub sources' columns)
# ---------------------------------------------------------------------------------------------------------------


def _image_ds(columns: dict, features: dict) -> datasets.Dataset:
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _rgb(h=4, w=5):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_normalize_cityscapes_label_ids_columns():
    m0 = _label_ids_mask(0)
    m1 = _label_ids_mask(1)
    ds = _image_ds(
        {"image": [_rgb(32, 64)] * 2, "semantic_segmentation": [Image.fromarray(m0), Image.fromarray(m1)],
         "city": ["a", "b"]},
        {"image": datasets.Image(), "semantic_segmentation": datasets.Image(), "city": datasets.Value("string")},
    )
    out = normalize_segmentation_dataset(ds, "cityscapes")
    assert out.column_names == ["image", "label"]
    assert isinstance(out.features["label"], datasets.Image)
    np.testing.assert_array_equal(np.asarray(out[0]["label"]), expected_train_ids(m0))
    np.testing.assert_array_equal(np.asarray(out[1]["label"]), expected_train_ids(m1))
    kept = normalize_segmentation_dataset(ds, "cityscapes", keep_columns=["city"])
    assert kept.column_names == ["image", "label", "city"] and kept[1]["city"] == "b"


def test_normalize_cityscapes_train_ids_untouched_and_heuristic():
    train = np.array([[0, 18, 255], [5, 10, 13]], np.uint8)
    ds = _image_ds(
        {"image": [_rgb(2, 3)], "semantic_segmentation": [Image.fromarray(train)]},
        {"image": datasets.Image(), "semantic_segmentation": datasets.Image()},
    )
    out = normalize_segmentation_dataset(ds, "cityscapes")
    np.testing.assert_array_equal(np.asarray(out[0]["label"]), train)  # would become 255s if mapped as labelIds
    assert detect_cityscapes_label_encoding([train]) == "train_ids"
    assert detect_cityscapes_label_encoding([train, np.array([[7, 26]], np.uint8)]) == "label_ids"
    forced = normalize_segmentation_dataset(ds, "cityscapes", label_encoding="label_ids")
    assert np.asarray(forced[0]["label"]).tolist() == [[255, 255, 255], [255, 255, 4]]  # 13 = fence


def test_normalize_ade_reduce_labels_and_detection():
    ann = np.array([[0, 1, 2], [150, 75, 0]], np.uint8)
    ds = _image_ds(
        {"image": [_rgb(2, 3)], "annotation": [Image.fromarray(ann)], "scene_category": [3]},
        {"image": datasets.Image(), "annotation": datasets.Image(), "scene_category": datasets.Value("int64")},
    )
    out = normalize_segmentation_dataset(ds, "ade20k_150")
    assert out.column_names == ["image", "label"]
    assert np.asarray(out[0]["label"]).tolist() == [[255, 0, 1], [149, 74, 255]]
    assert np.asarray(out[0]["image"]).shape == (2, 3, 3)
    # no dataset info: values kept
    assert np.asarray(normalize_segmentation_dataset(ds)[0]["label"]).tolist() == ann.tolist()
    unlabeled = normalize_segmentation_dataset(ds, "ade20k_150", with_labels=False)
    assert unlabeled.column_names == ["image"]


def test_normalize_column_detection_and_errors(tmp_path):
    # a classification-style int "label" must not be taken as the mask; "mask" (Image) is
    ds = _image_ds(
        {"img": [_rgb()], "label": [1], "mask": [Image.fromarray(np.zeros((4, 5), np.uint8))]},
        {"img": datasets.Image(), "label": datasets.Value("int64"), "mask": datasets.Image()},
    )
    out = normalize_segmentation_dataset(ds)
    assert out.column_names == ["image", "label"] and isinstance(out.features["label"], datasets.Image)
    with pytest.raises(ValueError, match="not a column"):
        normalize_segmentation_dataset(ds, label_column="semantic_segmentation")
    no_img = _image_ds({"foo": [1]}, {"foo": datasets.Value("int64")})
    with pytest.raises(ValueError, match="no image column"):
        normalize_segmentation_dataset(no_img)
    with pytest.raises(ValueError, match="label_encoding"):
        normalize_segmentation_dataset(ds, label_encoding="weird")  # type: ignore[arg-type]
    # string path columns are cast to Image
    p = tmp_path / "x.png"
    _rgb().save(p)
    paths = _image_ds({"image": [str(p)]}, {"image": datasets.Value("string")})
    assert isinstance(normalize_segmentation_dataset(paths).features["image"], datasets.Image)


def test_pascal_context_not_on_hub():
    with pytest.raises(DatasetNotOnHubError) as e:
        load_hub_dataset("pascal_context_59", "validation")
    msg = str(e.value)
    assert "load_image_folder" in msg and "prepare_pascal_context_59" in msg
    assert isinstance(e.value, ValueError)


def test_load_hub_dataset_wiring(monkeypatch):
    """The real load path, with datasets.load_dataset replaced by a local stand-in (no Hub here)."""
    calls = []
    ann = np.array([[0, 3]], np.uint8)
    cs_mask = np.array([[7, 26]], np.uint8)

    def fake_load_dataset(path, split=None, streaming=False, **kwargs):
        calls.append((path, split, kwargs))
        if path == "parquet":
            return _image_ds(
                {"image": [_rgb(1, 2)], "annotation": [Image.fromarray(ann)], "scene_category": [0]},
                {"image": datasets.Image(), "annotation": datasets.Image(), "scene_category": datasets.Value("int64")},
            )
        return _image_ds(
            {"image": [_rgb(1, 2)], "semantic_segmentation": [Image.fromarray(cs_mask)]},
            {"image": datasets.Image(), "semantic_segmentation": datasets.Image()},
        )

    monkeypatch.setattr(vdata.hub.datasets, "load_dataset", fake_load_dataset)
    cs = load_hub_dataset("cityscapes", "val")
    assert calls[-1][0] == "Chris1/cityscapes" and calls[-1][1] == "validation"
    assert np.asarray(cs[0]["label"]).tolist() == [[0, 13]]
    ade = load_hub_dataset("ADE20K", "val")
    path, split, kwargs = calls[-1]
    assert path == "parquet" and split == "validation"
    assert kwargs["data_files"]["validation"].startswith("hf://datasets/zhoubolei/scene_parse_150@")
    assert "/scene_parsing/validation/" in kwargs["data_files"]["validation"]
    assert np.asarray(ade[0]["label"]).tolist() == [[255, 2]]
    other = load_hub_dataset("someone/my-seg-data", "train", dataset_info="ade20k_150", revision="main")
    assert calls[-1] == ("someone/my-seg-data", "train", {"revision": "main"})
    assert other.column_names == ["image", "label"]
    assert np.asarray(other[0]["label"]).tolist() == [[6, 25]]  # reduce labels of the given dataset_info


def test_normalize_streaming_dataset():
    ann = np.array([[0, 1, 151 - 1]], np.uint8)
    ds = _image_ds(
        {"image": [_rgb(1, 3)] * 2, "annotation": [Image.fromarray(ann)] * 2},
        {"image": datasets.Image(), "annotation": datasets.Image()},
    ).to_iterable_dataset()
    out = normalize_segmentation_dataset(ds, "ade20k_150")
    assert isinstance(out, datasets.IterableDataset)
    ex = next(iter(out))
    assert sorted(ex) == ["image", "label"]
    assert np.asarray(ex["label"]).tolist() == [[255, 0, 149]]


# ---------------------------------------------------------------------------------------------------------------
# validation of every file before a run
# ---------------------------------------------------------------------------------------------------------------


def test_validation_names_each_bad_file_and_reports_sizes(tmp_path):
    from vocalign_hf.data.validation import DatasetValidationError, validate_segmentation_dataset

    img_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", (24, 32)), ("b", (40, 40)), ("c", (40, 40))):
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(img_dir / f"{name}.jpg")
        Image.fromarray(np.ones(size, dtype=np.uint8), mode="L").save(mask_dir / f"{name}.png")
    ds = load_image_folder(img_dir, mask_dir)
    report = validate_segmentation_dataset(ds, split="eval", num_classes=2)
    assert report.rows == 3 and report.min_size == (24, 32) and report.labelled_pixels == 24 * 32 + 2 * 1600
    jpeg = img_dir / "b.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-300])  # a cut-off download: no JPEG end marker
    Image.fromarray(np.full((40, 40), 2, dtype=np.uint8), mode="L").save(mask_dir / "c.png")
    with pytest.raises(DatasetValidationError) as error:
        validate_segmentation_dataset(load_image_folder(img_dir, mask_dir), split="eval", num_classes=2)
    message = str(error.value)
    assert message.startswith("2 bad file(s) in the eval:")
    assert f"{jpeg}: unreadable image (OSError: image file is truncated" in message
    assert f"{mask_dir / 'c.png'}: mask values [2] are not class ids 0-1 nor the ignore value 255" in message
