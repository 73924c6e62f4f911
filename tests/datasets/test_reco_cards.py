"""The two benchmarks ReCo defines (issue 12): coco_stuff27 and cityscapes27.

Oracles are ReCo's own tables and rules (NoelShin/reco@5c5e1bc), written here independently of
the shipped label-map files: coco_stuff_182_to_27 over raw stuffthingmap values
(datasets/coco_stuff.py), and label id - 7 with negative values and values >= 27 ignored for
Cityscapes (datasets/cityscapes.py, metrics/running_score.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_bench.datasets import converters, prepare
from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.check import check_dataset
from ovseg_bench.datasets.listing import first_missing, layout_paths, list_samples, split_file_used
from ovseg_bench.datasets.loader import SplitDataset
from ovseg_bench.datasets.listing import SampleRef
from ovseg_bench.engine.protocol import load_protocol
from ovseg_bench.errors import ConfigError
from ovseg_bench.resources import cards_dir
from tests.synthetic import smooth_image, write_dataset

# ReCo's coco_stuff_182_to_27, the values for raw values 0..181 in order (NoelShin/reco@5c5e1bc:
# datasets/coco_stuff.py; IIC's fine-to-coarse table).
RECO_182_TO_27 = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1,
    4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15,
    15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17,
    16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26,
    15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26,
    19, 19, 24,
)
SPLIT_SHA256 = "5d8ff03b25dfa5c3c8ae66a4a40894eedb51347c48692cd91ec37f7d5958d2be"  # PiCIE@fc4e7c1's copy
CURATED = "coco_stuff164k/curated/val2017/Coco164kFull_Stuff_Coarse.txt"


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _settings():
    return load_protocol("tcl").settings_for("cityscapes")


# --------------------------------------------------------------------------- COCO-Stuff-27 tables

def test_coco_stuff27_classes_and_counts() -> None:
    card = load_card("coco_stuff27")
    assert (card.num_classes, len(card.prediction_names()), card.num_images, card.card_version) == (27, 171, 4172, 1)
    assert card.class_names()[:3] == ("electronic", "appliance", "food things") and card.class_names()[-1] == "water"
    assert len(card.prediction_synonyms("mmseg")) == 171 and card.prediction_synonyms("mmseg")[0] == ["person"]
    # ReCo's fine spellings are mmseg's COCO-Stuff names with spaces for hyphens, in train-id order.
    mmseg = load_card("coco_stuff").class_names()
    assert [n.replace("-", " ") for n in mmseg] == list(card.prediction_names())


@pytest.mark.parametrize("fine,coarse", [("person", "person"), ("sky other", "sky"), ("tree", "plant"),
                                         ("wall brick", "wall"), ("wall wood", "wall"), ("fog", "water"),
                                         ("bicycle", "vehicle"), ("playingfield", "ground")])
def test_171_to_27_by_hand(fine: str, coarse: str) -> None:
    card = load_card("coco_stuff27")
    predicted = card.prediction_names().index(fine)
    assert card.class_names()[card.prediction_map()[predicted]] == coarse
    assert card.class_names()[card.gt_lut()[predicted]] == coarse  # the GT map over train ids: the same table


def test_171_to_27_equals_recos_182_table_through_the_train_ids() -> None:
    card = load_card("coco_stuff27")
    pred, lut = card.prediction_map(), card.gt_lut()
    assert pred.dtype == np.int64 and pred.shape == (171,) and lut.dtype == np.uint8 and lut.shape == (256,)
    raw = np.arange(256, dtype=np.uint8)[None, :]
    train = converters.coco_stuff_train_ids(raw)[0]  # the converter that writes <id>_labelTrainIds.png
    used = [r for r in range(182) if r not in converters.COCO_UNUSED]
    assert len(used) == 171
    for r in used:
        assert pred[train[r]] == RECO_182_TO_27[r] == lut[train[r]], r
    # ReCo's GT: 255 (unlabelled) -> ignored; train ids 171..255 never map to a class.
    assert (lut[171:] == 255).all()


# --------------------------------------------------------------------------- Cityscapes-27 GT map

def test_cityscapes27_gt_map_on_a_label_id_png(tmp_path: Path) -> None:
    card = load_card("cityscapes27")
    assert card.prediction_map() is None and card.prediction_names() == card.class_names()
    assert (card.num_classes, card.num_images, card.class_names()[19]) == (27, 500, "car")
    raw = np.array([[0, 6, 7, 26, 33, 255]] * 2, dtype=np.uint8)
    _save(tmp_path / "a.png", smooth_image(np.random.default_rng(0), raw.shape))
    gt = _save(tmp_path / "a_gtFine_labelIds.png", raw)
    sample = SplitDataset(card, [SampleRef("a", tmp_path / "a.png", gt)], _settings())[0]
    assert sample.error is None
    assert sample.gt.tolist() == [[255, 255, 0, 19, 26, 255]] * 2
    # Every raw value 7..33 is id - 7, everything else ignored (ReCo's first_nonvoid and RunningScore).
    lut = card.gt_lut()
    assert [int(lut[v]) for v in range(256)] == [v - 7 if 7 <= v <= 33 else 255 for v in range(256)]


def test_a_value_above_raw_label_max_is_refused_before_the_map(tmp_path: Path) -> None:
    raw = np.array([[7, 34]], dtype=np.uint8)
    _save(tmp_path / "a.png", smooth_image(np.random.default_rng(0), raw.shape))
    gt = _save(tmp_path / "a_gt.png", raw)
    sample = SplitDataset(load_card("cityscapes27"), [SampleRef("a", tmp_path / "a.png", gt)], _settings())[0]
    assert sample.gt is None and "label values [34] are outside 0..33" in sample.error


# --------------------------------------------------------------------------- the split file

def test_shipped_split_is_the_piCIE_copy() -> None:
    path = cards_dir() / load_card("coco_stuff27").shipped_split_file
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SPLIT_SHA256
    lines = data.decode().split("\n")
    assert len(lines) == 4173 and lines[-1] == "" and lines[0] == "000000000139"


def test_shipped_split_stands_in_until_the_data_root_has_one(tmp_path: Path) -> None:
    card = load_card("coco_stuff27")
    write_dataset("coco_stuff", tmp_path, num_images=3)
    shipped = cards_dir() / card.shipped_split_file
    assert first_missing(card, tmp_path) is None
    assert ("split file", shipped) in layout_paths(card, tmp_path)
    samples = list_samples(card, tmp_path)
    assert len(samples) == 4172 and samples[0].image_id == "000000000139"
    assert samples[0].gt_path == tmp_path / "coco_stuff164k/annotations/val2017/000000000139_labelTrainIds.png"
    assert split_file_used(card, tmp_path) == (shipped, SPLIT_SHA256)
    # A copy under the data root (STEGO's layout) takes precedence, in its own order.
    local = tmp_path / CURATED
    local.parent.mkdir(parents=True)
    local.write_text("000000000431\n000000000139\n000000000285\n", encoding="utf-8")
    assert [s.image_id for s in list_samples(card, tmp_path)] == ["000000000431", "000000000139", "000000000285"]
    assert split_file_used(card, tmp_path) == (local, hashlib.sha256(local.read_bytes()).hexdigest())
    assert ("split file", local) in layout_paths(card, tmp_path)


def test_without_a_shipped_copy_the_data_root_split_is_reported_missing(tmp_path: Path) -> None:
    card = dataclasses.replace(load_card("coco_stuff27"), shipped_split_file="splits/not_shipped.txt")
    write_dataset("coco_stuff", tmp_path, num_images=1)
    assert first_missing(card, tmp_path) == ("split file", tmp_path / CURATED)
    assert split_file_used(load_card("coco_stuff"), tmp_path) is None  # a directory scan


# --------------------------------------------------------------------------- bad map files

def _card_with(tmp_path: Path, name: str, **files: str):
    fields = {}
    for field, text in files.items():
        path = tmp_path / f"{field}.txt"
        path.write_text(text, encoding="utf-8")
        fields[field] = str(path)  # absolute: cards_dir() / path is path
    return dataclasses.replace(load_card(name), **fields)


@pytest.mark.parametrize("text,message", [
    ("# header\n7 0\n8 x\n", "gt_map.txt, line 3: '8 x' is not 2 integers"),
    ("7 0 1\n", "gt_map.txt, line 1: '7 0 1' is not 2 integers"),
    ("7 0\n\n34 1\n", "gt_map.txt, line 3: raw value 34 is outside 0..33"),
    ("7 0\n7 1  # again\n", "gt_map.txt, line 2: raw value 7 is listed twice"),
    ("7 27\n", "gt_map.txt, line 1: class 27 is outside 0..26"),
])
def test_a_bad_gt_map_is_one_config_error_naming_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    card = _card_with(tmp_path, "cityscapes27", gt_map=text)
    with pytest.raises(ConfigError, match=message):
        card.gt_lut()
    with pytest.raises(ConfigError, match=message):  # before any worker starts
        SplitDataset(card, [], _settings())


@pytest.mark.parametrize("text,message", [
    ("9\n" * 170, r"predicted_to_class.txt: 170 entries, expected one per predicted class of 'coco_stuff27' \(171"),
    ("9\n" * 100 + "27  # too big\n" + "9\n" * 70, "predicted_to_class.txt, line 101: class 27 is outside 0..26"),
    ("9\n" * 170 + "nine\n", "predicted_to_class.txt, line 171: 'nine' is not one integer"),
])
def test_a_bad_prediction_map_is_one_config_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _card_with(tmp_path, "coco_stuff27", predicted_to_class=text).prediction_map()


@pytest.mark.parametrize("change,message", [
    ({"reduce_zero_label": True}, "gt_map and reduce_zero_label both change the GT"),
    ({"predicted_to_class": None}, "predicted_classnames and predicted_to_class go together"),
    ({"predicted_classnames": {"sclip": "x.txt"}}, r"predicted_classnames has naming schemes \['sclip'\]"),
    ({"split_file": None}, "shipped_split_file is a copy of split_file"),
])
def test_inconsistent_cards_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"dataset card 'coco_stuff27': {message}"):
        dataclasses.replace(load_card("coco_stuff27"), **change)


# --------------------------------------------------------------------------- data check

def test_data_check_coco_stuff27_with_the_shipped_and_a_local_split(cli, tmp_path: Path) -> None:
    write_dataset("coco_stuff", tmp_path, num_images=3)
    code, out, _ = cli("data", "check", "coco_stuff27", "--data-root", tmp_path)
    assert code == 1 and "4171 of 4172 images missing" in out  # the shipped list names 000000000139 only
    assert "split list read from the copy shipped with the card" in out
    local = tmp_path / CURATED
    local.parent.mkdir(parents=True)
    local.write_text("000000000139\n000000000285\n000000000431\n", encoding="utf-8")
    code, out, _ = cli("data", "check", "coco_stuff27", "--deep", "--data-root", tmp_path)
    row = next(line for line in out.splitlines() if line.startswith("coco_stuff27"))
    assert code == 1 and "3 / 4172" in row and "count mismatch" in row and "copy shipped" not in row


def _cityscapes27_tree(data_root: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    labels = []
    for k, stem in enumerate(("frankfurt/frankfurt_000000_000019", "lindau/lindau_000000_000021")):
        _save(data_root / f"cityscapes/leftImg8bit/val/{stem}_leftImg8bit.png", smooth_image(rng, (6, 8)))
        ids = rng.integers(0, 34, size=(6, 8), dtype=np.uint8)
        labels.append(_save(data_root / f"cityscapes/gtFine/val/{stem}_gtFine_labelIds.png", ids))
    return labels


def test_data_check_cityscapes27(cli, tmp_path: Path) -> None:
    labels = _cityscapes27_tree(tmp_path)
    check = check_dataset(load_card("cityscapes27"), tmp_path, num_expected=2, deep=True)
    assert check.ok, check.problems
    _save(labels[1], np.full((6, 8), 34, dtype=np.uint8))
    code, out, _ = cli("data", "check", "cityscapes27", "--deep", "--data-root", tmp_path)
    assert code == 1 and "1 of 2 GT files with values outside 0..33 (no 255)" in out


# --------------------------------------------------------------------------- data prepare cityscapes27

def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


POLYGONS = {"imgWidth": 8, "imgHeight": 6, "objects": [
    {"label": "road", "polygon": _box(0, 3, 7, 5)},
    {"label": "building", "polygon": _box(0, 0, 7, 2)},
    {"label": "cargroup", "polygon": _box(2, 1, 5, 4)},               # 'car' (26) over road and building
    {"label": "license plate", "polygon": _box(3, 3, 4, 3)},          # never drawn
    {"label": "sky", "polygon": _box(0, 0, 1, 1), "deleted": 1},      # skipped
    {"label": "ego vehicle", "polygon": _box(0, 5, 7, 5)},            # void id 1 over the road
]}
LABEL_IDS = np.array([[11] * 8,
                      [11, 11, 26, 26, 26, 26, 11, 11],
                      [11, 11, 26, 26, 26, 26, 11, 11],
                      [7, 7, 26, 26, 26, 26, 7, 7],
                      [7, 7, 26, 26, 26, 26, 7, 7],
                      [1] * 8], dtype=np.uint8)


def test_label_ids_from_polygons_as_json2labelimg_ids() -> None:
    assert np.array_equal(converters.cityscapes_label_ids_from_polygons(POLYGONS), LABEL_IDS)
    train = converters.cityscapes_train_ids_from_polygons(POLYGONS)  # the same drawing, other numbers
    assert np.array_equal(train, converters.cityscapes_train_ids_from_label_ids(LABEL_IDS))
    assert converters.cityscapes_label_ids_from_polygons({"imgWidth": 2, "imgHeight": 1, "objects": []}).tolist() == [[0, 0]]


def test_prepare_cityscapes27_renders_missing_label_ids_and_keeps_shipped_ones(cli, tmp_path: Path) -> None:
    val = tmp_path / "cityscapes/gtFine/val"
    a, b = "frankfurt/frankfurt_000000_000294", "lindau/lindau_000001_000019"
    for stem in (a, b):
        _save(tmp_path / f"cityscapes/leftImg8bit/val/{stem}_leftImg8bit.png", smooth_image(np.random.default_rng(1), (6, 8)))
        (val / stem).parent.mkdir(parents=True, exist_ok=True)
        (val / f"{stem}_gtFine_polygons.json").write_text(json.dumps(POLYGONS), encoding="utf-8")
    shipped = _save(val / f"{b}_gtFine_labelIds.png", np.full((6, 8), 24, dtype=np.uint8))  # differs from POLYGONS
    before = (shipped.read_bytes(), shipped.stat().st_mtime_ns)
    code, out, err = cli("data", "prepare", "cityscapes27", "--data-root", tmp_path, "--workers", 1, "--quiet")
    assert code == 0, err + out
    assert np.array_equal(np.array(Image.open(val / f"{a}_gtFine_labelIds.png")), LABEL_IDS)
    assert (shipped.read_bytes(), shipped.stat().st_mtime_ns) == before  # never rewritten
    assert "1 of 2 Cityscapes label-id files were rendered from _gtFine_polygons.json" in out
    rendered = [f"gtFine/val/{a}_gtFine_labelIds.png"]

    def conversion() -> dict:
        return prepare.read_report(tmp_path / "cityscapes")["cityscapes27"]["conversion"]

    assert conversion()["gt_source"] == {"label_ids": 1, "polygons": 1}
    assert conversion()["rendered_from_polygons"] == rendered
    assert check_dataset(load_card("cityscapes27"), tmp_path, num_expected=2, deep=True).ok
    # Rerun: nothing changed, so nothing is converted, and the rendered file still counts as rendered.
    code, out, _ = cli("data", "prepare", "cityscapes27", "--data-root", tmp_path, "--workers", 1, "--quiet")
    assert code == 0 and "up to date" in out and conversion()["gt_source"] == {"label_ids": 1, "polygons": 1}
    # New polygons: the rendered file follows them; the shipped one still stays as it is.
    moved = {**POLYGONS, "objects": [{"label": "sky", "polygon": _box(0, 0, 7, 5)}]}
    for stem in (a, b):
        path = val / f"{stem}_gtFine_polygons.json"
        path.write_text(json.dumps(moved), encoding="utf-8")
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    code, out, _ = cli("data", "prepare", "cityscapes27", "--data-root", tmp_path, "--workers", 1, "--quiet")
    assert code == 0 and (np.array(Image.open(val / f"{a}_gtFine_labelIds.png")) == 23).all()
    assert (shipped.read_bytes(), shipped.stat().st_mtime_ns) == before
    assert conversion()["gt_source"] == {"label_ids": 1, "polygons": 1}
    assert conversion()["rendered_from_polygons"] == rendered


def test_prepare_coco_stuff27_writes_the_train_ids_of_the_coco_stuff_tree(cli, tmp_path: Path) -> None:
    ann = tmp_path / "coco_stuff164k/annotations/val2017"
    _save(tmp_path / "coco_stuff164k/images/val2017/000000000139.jpg", smooth_image(np.random.default_rng(2), (4, 6)))
    raw = np.array([[0, 156, 168, 170, 255, 11]] * 4, dtype=np.uint8)  # person, sky-other, tree, wall-brick, -, unused
    _save(ann / "000000000139.png", raw)
    local = tmp_path / CURATED
    local.parent.mkdir(parents=True)
    local.write_text("000000000139\n", encoding="utf-8")
    code, out, err = cli("data", "prepare", "coco_stuff27", "--data-root", tmp_path, "--workers", 1, "--quiet")
    assert code == 0, err + out
    assert "coco_stuff27" in prepare.read_report(tmp_path / "coco_stuff164k")
    card = load_card("coco_stuff27")
    sample = SplitDataset(card, list_samples(card, tmp_path), load_protocol("tcl").settings_for("coco_stuff"))[0]
    names = [card.class_names()[v] if v != 255 else None for v in sample.gt[0].tolist()]
    assert names == ["person", "sky", "plant", "wall", None, None]
    assert [RECO_182_TO_27[r] for r in (0, 156, 168, 170)] == sample.gt[0, :4].tolist()
