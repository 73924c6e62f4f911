"""Label-conditioned cards, listing, image labels (GT / XML), COCO 2014 GT rendering, the Dataset."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ovseg_bench.datasets.label_conditioned import (
    COCO_THING_IDS, LabelConditionedCard, LabelConditionedDataset, coco_category_lut, image_labels,
    list_label_conditioned, load_label_conditioned_card, read_instances, render_coco2014_gt,
    write_coco2014_split, xml_labels)
from ovseg_bench.errors import ConfigError, DataError
from ovseg_bench.resources import cards_dir
from ovseg_bench.yamlconf import from_mapping, read_yaml
from tests.label_synthetic import VOC_CLASSES, write_coco2014_tree, write_voc_label_tree

CARDS = {"voc_train": (1464, 21, "train"), "voc_train_aug": (10582, 21, "train_aug"),
         "coco2014_train": (82081, 81, "train"), "coco2014_val": (40137, 81, "val")}


@pytest.fixture
def voc(tmp_path: Path):
    return write_voc_label_tree(tmp_path, num_train=3, num_extra=2)


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return write_coco2014_tree(tmp_path)


# ------------------------------------------------------------------------------------ cards


@pytest.mark.parametrize("name", sorted(CARDS))
def test_cards_load_with_expected_counts(name: str) -> None:
    card = load_label_conditioned_card(name)
    num_images, num_classes, split = CARDS[name]
    assert (card.name, card.track, card.split) == (name, "label-conditioned", split)
    assert (card.num_images, card.num_classes) == (num_images, num_classes)
    assert card.class_names()[0] == "background" and card.background_class and card.ignore_index == 255
    assert card.classnames_file().is_file()


def test_label_sources_of_the_cards() -> None:
    assert load_label_conditioned_card("voc_train").labels_from == ("gt", "xml")
    assert load_label_conditioned_card("voc_train_aug").xml_dir == "Annotations"
    assert load_label_conditioned_card("coco2014_train").labels_from == ("gt",)
    assert load_label_conditioned_card("coco2014_val").xml_dir is None


def test_coco_classes_are_the_80_things_in_category_id_order() -> None:
    names = load_label_conditioned_card("coco2014_train").class_names()
    # Label k is the k-th used category id: 1 person, 5 airplane, 90 toothbrush (WeakTr's names).
    assert len(COCO_THING_IDS) == 80 and names[1] == "person" and names[5] == "airplane"
    assert names[COCO_THING_IDS.index(44) + 1] == "bottle" and names[-1] == "toothbrush"


def _card_data(**changes) -> dict:
    data = read_yaml(cards_dir() / "voc_train.yaml")
    data.update(changes)
    return data


@pytest.mark.parametrize("changes,fragment", [
    ({"track": "semantic"}, "track"),
    ({"labels_from": ["xml"], "xml_dir": None}, "xml_dir"),
    ({"labels_from": ["cls_labels"]}, "labels_from"),
    ({"labels_from": []}, "labels_from"),
    ({"classnames": {"sclip": "classnames/sclip/cls_voc21.txt"}}, "mmseg"),
    ({"num_images": 0}, "num_images"),
    ({"name": "VOC Train"}, "snake_case"),
])
def test_card_validation_names_the_problem(changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        from_mapping(LabelConditionedCard, _card_data(**changes), "card.yaml")


def test_unknown_card_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="raw_label_max"):
        from_mapping(LabelConditionedCard, _card_data(raw_label_max=20), "card.yaml")


# ---------------------------------------------------------------------------------- listing


def test_voc_listings_follow_the_split_files(voc, tmp_path: Path) -> None:
    train = list_label_conditioned(load_label_conditioned_card("voc_train"), tmp_path)
    aug = list_label_conditioned(load_label_conditioned_card("voc_train_aug"), tmp_path)
    assert [r.image_id for r in train] == voc.train_ids
    assert [r.image_id for r in aug] == voc.aug_ids and len(aug) == 5
    first = train[0]
    assert first.image_path == voc.root / "JPEGImages" / f"{first.image_id}.jpg"
    assert first.gt_path == voc.root / "SegmentationClass" / f"{first.image_id}.png"
    assert first.xml_path == voc.root / "Annotations" / f"{first.image_id}.xml"
    assert all(r.gt_path.parent.name == "SegmentationClassAug" and r.gt_path.is_file() for r in aug)


def test_listing_takes_the_first_field_of_clip_es_style_lines(coco: Path, tmp_path: Path) -> None:
    card = load_label_conditioned_card("coco2014_train")
    split = tmp_path / "COCO2014" / "ImageSets" / "train2014.txt"
    split.parent.mkdir(parents=True)
    split.write_text("COCO_train2014_000000000009 0 2 17\nCOCO_train2014_000000000025 79\n\n", encoding="utf-8")
    refs = list_label_conditioned(card, tmp_path)
    assert [r.image_id for r in refs] == ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    assert refs[0].xml_path is None and refs[0].image_path.is_file()


def test_missing_split_file_is_named(voc, tmp_path: Path) -> None:
    (voc.root / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    with pytest.raises(DataError, match=r"split file .*train_aug\.txt not found"):
        list_label_conditioned(load_label_conditioned_card("voc_train_aug"), tmp_path)


def test_missing_data_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data root"):
        list_label_conditioned(load_label_conditioned_card("voc_train"), tmp_path / "nowhere")


# ----------------------------------------------------------------------------- image labels


def test_image_labels_are_the_present_foreground_classes() -> None:
    gt = np.array([[0, 0, 15, 255], [3, 3, 15, 20]], dtype=np.uint8)
    assert image_labels(gt, 21) == (3, 15, 20)
    assert image_labels(gt, 21, background_class=False) == (0, 3, 15, 20)
    assert image_labels(np.full((2, 2), 255, np.uint8), 21) == ()
    with pytest.raises(DataError, match=r"\[21\]"):
        image_labels(np.array([[0, 21]], dtype=np.uint8), 21)


def test_image_labels_agree_with_an_independent_unique(voc) -> None:
    for image_id in voc.aug_ids:
        gt = np.array(Image.open(voc.root / "SegmentationClassAug" / f"{image_id}.png"))
        expected = tuple(sorted(set(gt.ravel().tolist()) - {0, 255}))
        assert image_labels(gt, 21) == expected


def test_xml_labels_count_every_object_once_in_first_appearance_order(voc) -> None:
    names = ("background", *VOC_CLASSES)
    for image_id, objects in voc.xml_objects.items():
        expected: list[int] = []
        for name, _difficult in objects:  # difficult objects count, as in CLIP-ES
            if names.index(name) not in expected:
                expected.append(names.index(name))
        assert xml_labels(voc.root / "Annotations" / f"{image_id}.xml", names) == tuple(expected)


def test_xml_and_gt_labels_differ_by_the_difficult_object(voc) -> None:
    names = ("background", *VOC_CLASSES)
    image_id = voc.train_ids[0]
    from_xml = set(xml_labels(voc.root / "Annotations" / f"{image_id}.xml", names))
    gt = np.array(Image.open(voc.root / "SegmentationClass" / f"{image_id}.png"))
    from_gt = set(image_labels(gt, 21))
    difficult = {names.index(n) for n, d in voc.xml_objects[image_id] if d}
    assert from_xml == from_gt | difficult and not difficult & from_gt


def test_xml_part_names_are_not_objects(tmp_path: Path) -> None:
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>person</name><part><name>head</name></part></object>"
                   "<object><name>dog</name></object></annotation>", encoding="utf-8")
    assert xml_labels(xml, ("background", *VOC_CLASSES)) == (15, 12)


@pytest.mark.parametrize("text,fragment", [
    ("<annotation><object><name>unicorn</name></object></annotation>", "unicorn"),
    ("<annotation><object><name>dog</name>", "cannot read"),
])
def test_bad_xml_is_named(tmp_path: Path, text: str, fragment: str) -> None:
    xml = tmp_path / "bad.xml"
    xml.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=fragment) as info:
        xml_labels(xml, ("background", *VOC_CLASSES))
    assert str(xml) in str(info.value)


# ---------------------------------------------------------------------------------- COCO GT


def _independent_coco_gt(instances: Path, space: str) -> dict[str, np.ndarray]:
    """SemPLeS's rule computed with pycocotools' COCO API (annToMask), one annotation at a time."""
    from pycocotools.coco import COCO

    api = COCO(str(instances))
    listed = set(api.getCatIds())
    expected = {}
    for image_id, meta in api.imgs.items():
        gt = np.zeros((meta["height"], meta["width"]), dtype=np.uint8)
        for ann in api.loadAnns(api.getAnnIds(imgIds=image_id)):
            segm = ann["segmentation"]
            if isinstance(segm, list):  # degenerate polygons draw nothing (pycocotools' frPoly)
                ann = {**ann, "segmentation": [p for p in segm if len(p) >= 6]}
            cat = ann["category_id"]
            value = (cat if space == "91" else COCO_THING_IDS.index(cat) + 1) if cat in listed else 255
            m = api.annToMask(ann).astype(bool)
            gt = np.where(m & (gt == 0), value, gt).astype(np.uint8)
        expected[Path(meta["file_name"]).stem] = gt
    return expected


@pytest.mark.parametrize("space", ["81", "91"])
def test_coco_gt_matches_an_independent_rendering(coco: Path, tmp_path: Path, space: str) -> None:
    out = tmp_path / f"gt{space}"
    report = render_coco2014_gt(coco, out, space=space)
    expected = _independent_coco_gt(coco, space)
    assert (report.images, report.written, report.skipped) == (4, 4, 0)
    assert sorted(p.stem for p in out.iterdir()) == sorted(expected)
    for stem, gt in expected.items():
        with Image.open(out / f"{stem}.png") as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.array(png), gt)


def test_coco_gt_rule_pixel_by_pixel(coco: Path, tmp_path: Path) -> None:
    render_coco2014_gt(coco, tmp_path / "gt")
    gt9 = np.array(Image.open(tmp_path / "gt" / "COCO_train2014_000000000009.png"))
    person, car, dog = 1, 3, COCO_THING_IDS.index(18) + 1
    assert gt9[15, 25] == person          # person (first) and car overlap: the first instance wins
    assert gt9[30, 40] == car
    assert gt9[30, 10] == dog             # the crowd RLE is painted with its class
    assert gt9[30, 25] == car             # car came before the crowd
    gt25 = np.array(Image.open(tmp_path / "gt" / "COCO_train2014_000000000025.png"))
    assert gt25[5, 5] == 80 and gt25[15, 15] == 255   # toothbrush; an unlisted category is ignored
    assert not np.any(np.array(Image.open(tmp_path / "gt" / "COCO_train2014_000000000042.png")))


def test_coco_gt_rendering_is_resumable_and_idempotent(coco: Path, tmp_path: Path) -> None:
    out = tmp_path / "gt"
    render_coco2014_gt(coco, out)
    kept = out / "COCO_train2014_000000000009.png"
    before = kept.read_bytes()
    os.utime(kept, (1, 1))
    (out / "COCO_train2014_000000000025.png").unlink()
    report = render_coco2014_gt(read_instances(coco), out)
    assert (report.written, report.skipped) == (1, 3)
    assert kept.stat().st_mtime == 1 and kept.read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_coco_lut_spaces() -> None:
    categories = [{"id": i} for i in COCO_THING_IDS]
    assert coco_category_lut(categories, "81")[90] == 80 and coco_category_lut(categories, "91")[90] == 90
    with pytest.raises(DataError, match="80"):
        coco_category_lut(categories[:-1], "81")
    with pytest.raises(ConfigError):
        coco_category_lut(categories, "80")


def test_bad_coco_segmentation_is_named(tmp_path: Path) -> None:
    bad = {"images": [{"id": 1, "file_name": "x.jpg", "height": 4, "width": 4}],
           "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "segmentation": {"counts": [16], "size": [5, 5]}}],
           "categories": [{"id": i} for i in COCO_THING_IDS]}
    with pytest.raises(DataError, match="annotation 7"):
        render_coco2014_gt(bad, tmp_path / "gt")


def test_coco_split_lists_annotated_images_by_file_name(coco: Path, tmp_path: Path) -> None:
    out = tmp_path / "COCO2014" / "ImageSets" / "train2014.txt"
    assert write_coco2014_split(coco, out) == 3
    assert out.read_text().split("\n") == [
        "COCO_train2014_000000000009", "COCO_train2014_000000000025", "COCO_train2014_000000000030", ""]


# ---------------------------------------------------------------------------------- Dataset


def test_voc_dataset_yields_rgb_gt_and_labels(voc, tmp_path: Path) -> None:
    card = load_label_conditioned_card("voc_train")
    refs = list_label_conditioned(card, tmp_path)
    by_xml, by_gt = LabelConditionedDataset(card, refs, labels_from="xml"), LabelConditionedDataset(card, refs)
    assert by_xml.labels_from == "xml" and by_gt.labels_from == "gt" and len(by_xml) == 3  # GT: the default
    for index, ref in enumerate(refs):
        sample, other = by_xml[index], by_gt[index]
        assert sample.error is None
        assert (sample.index, sample.image_id, sample.image_path) == (index, ref.image_id, ref.image_path)
        np.testing.assert_array_equal(sample.image, cv2.imread(str(ref.image_path))[:, :, ::-1])
        gt = np.array(Image.open(ref.gt_path))
        np.testing.assert_array_equal(sample.gt, gt)
        assert sample.labels == xml_labels(ref.xml_path, card.class_names())
        assert other.labels == image_labels(gt, 21)


def test_coco_dataset_after_prepare(coco: Path, tmp_path: Path) -> None:
    root = tmp_path / "COCO2014"
    render_coco2014_gt(coco, root / "SegmentationClass")
    write_coco2014_split(coco, root / "ImageSets" / "train2014.txt")
    card = load_label_conditioned_card("coco2014_train")
    data = LabelConditionedDataset(card, list_label_conditioned(card, tmp_path))
    labels = [data[i].labels for i in range(len(data))]
    assert labels == [(1, 3, COCO_THING_IDS.index(18) + 1), (80,), (COCO_THING_IDS.index(44) + 1,)]


def test_dataset_reports_problems_as_data(voc, tmp_path: Path) -> None:
    card = load_label_conditioned_card("voc_train")
    refs = list_label_conditioned(card, tmp_path)
    refs[0].image_path.unlink()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(refs[1].gt_path)
    refs[2].xml_path.unlink()
    data = LabelConditionedDataset(card, refs, labels_from="xml")
    missing, wrong_size, no_xml = data[0], data[1], data[2]
    assert missing.skippable and "is missing" in missing.error and missing.image is None
    assert not wrong_size.skippable and "5x5" in wrong_size.error and str(refs[1].gt_path) in wrong_size.error
    assert str(refs[2].xml_path) in no_xml.error
    assert LabelConditionedDataset(card, refs, labels_from="gt")[2].error is None


def test_dataset_refuses_out_of_range_gt(voc, tmp_path: Path) -> None:
    card = load_label_conditioned_card("voc_train")
    refs = list_label_conditioned(card, tmp_path)
    gt = np.array(Image.open(refs[0].gt_path))
    gt[0, 0] = 33
    Image.fromarray(gt).save(refs[0].gt_path)
    sample = LabelConditionedDataset(card, refs)[0]
    assert "[33]" in sample.error and str(refs[0].gt_path) in sample.error


def test_dataset_refuses_a_label_source_the_card_lacks(coco: Path, tmp_path: Path) -> None:
    card = load_label_conditioned_card("coco2014_train")
    with pytest.raises(ConfigError, match="xml"):
        LabelConditionedDataset(card, [], labels_from="xml")
    assert dataclasses.is_dataclass(card)
