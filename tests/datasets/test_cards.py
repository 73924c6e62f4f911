"""The eight shipped dataset cards and their class-name files (MMSegmentation layout, SCLIP's cls_*.txt)."""
from __future__ import annotations

import pytest

from ovseg_bench.datasets.cards import ALL_BENCHMARKS, card_names, load_card
from ovseg_bench.resources import cards_dir

NUM_CLASSES = {
    "voc": 21, "voc20": 20, "context": 60, "context59": 59,
    "coco_stuff": 171, "coco_object": 81, "cityscapes": 19, "ade20k": 150,
}
NUM_IMAGES = {
    "voc": 1449, "voc20": 1449, "context": 5105, "context59": 5105,
    "coco_stuff": 5000, "coco_object": 5000, "cityscapes": 500, "ade20k": 2000,
}
PAIRS = (("voc", "voc20"), ("context", "context59"), ("coco_stuff", "coco_object"))


def test_all_benchmarks_come_first_in_card_names() -> None:
    assert tuple(card_names()[:8]) == ALL_BENCHMARKS


@pytest.mark.parametrize("name", ALL_BENCHMARKS)
def test_card_loads_with_expected_counts(name: str) -> None:
    card = load_card(name)
    assert card.name == name
    assert (card.split, card.track) == ("val", "semantic")
    assert card.num_classes == NUM_CLASSES[name]
    assert card.num_images == NUM_IMAGES[name]


@pytest.mark.parametrize("name", ALL_BENCHMARKS)
def test_sclip_list_matches_mmseg_count(name: str) -> None:
    card = load_card(name)
    assert len(card.class_synonyms("sclip")) == len(card.class_synonyms("mmseg")) == NUM_CLASSES[name]


@pytest.mark.parametrize("name", ALL_BENCHMARKS)
def test_label_range_agrees_with_class_count(name: str) -> None:
    # Values 0..raw_label_max on disk; reduce_zero_label removes value 0 from the scored classes.
    card = load_card(name)
    offset = 0 if card.reduce_zero_label else 1
    assert card.num_classes == card.raw_label_max + offset


def test_label_conventions_follow_the_protocol() -> None:
    cards = {n: load_card(n) for n in ALL_BENCHMARKS}
    assert {n for n, c in cards.items() if c.background_class} == {"voc", "context", "coco_object"}
    assert {n for n, c in cards.items() if c.reduce_zero_label} == {"voc20", "context59", "ade20k"}
    # 255 occurs on disk only in VOC, COCO-Stuff and Cityscapes (as their converters write them).
    assert {n for n, c in cards.items() if c.gt_has_ignore} == {"voc", "voc20", "coco_stuff", "cityscapes"}
    assert all(c.ignore_index == 255 for c in cards.values())


@pytest.mark.parametrize("a,b", PAIRS)
def test_paired_cards_share_images(a: str, b: str) -> None:
    ca, cb = load_card(a), load_card(b)
    assert (ca.shares_images_with, cb.shares_images_with) == (b, a)
    for field in ("root", "img_dir", "img_suffix", "split_file", "ann_dir", "num_images"):
        assert getattr(ca, field) == getattr(cb, field), field


def test_voc21_sclip_background_has_26_synonyms() -> None:
    background = load_card("voc").class_synonyms("sclip")[0]
    assert len(background) == 26
    assert background[:3] == ["sky", "wall", "tree"]


def test_ade_bed_keeps_its_trailing_space() -> None:
    names = load_card("ade20k").class_names()
    assert "bed " in names
    assert "bed" not in names


def test_sclip_lines_split_synonyms_and_keep_spaces() -> None:
    voc = load_card("voc20").class_synonyms("sclip")
    assert all(len(names) >= 1 and all(names) for names in voc)
    assert load_card("context").class_synonyms("sclip")[-1] == ["wood "]  # last line, no final newline


def test_every_class_name_file_is_used_by_a_card() -> None:
    used = {rel for n in card_names() for table in ("classnames", "predicted_classnames")
            for rel in getattr(load_card(n), table, {}).values()}
    shipped = {p.relative_to(cards_dir()).as_posix() for p in (cards_dir() / "classnames").rglob("*.txt")}
    assert used == shipped
