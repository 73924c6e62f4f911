"""The pure converters on hand-made inputs in each source format, against hand-computed labels.

Expected values are written out from the rules of the published converters (MMSegmentation's
pascal_context, coco_stuff164k and cityscapes converters, TCL's convert_coco_object.py), not
computed with the code under test: RLE strings were worked out with maskApi.c's rules (and
agree with pycocotools), polygon fills follow Pillow's inclusive rasterisation of integer
vertices, as cityscapesscripts' json2labelImg uses it.
"""
from __future__ import annotations

import numpy as np
import pytest

from ovseg_bench.datasets import converters as cv
from ovseg_bench.errors import DataError
from tests.synthetic import COCO_USED, coco_object_ids, coco_train_ids


# --------------------------------------------------------------------------- RLE

@pytest.mark.parametrize(("counts", "text"), [
    ([2, 5, 5], "255"),             # small counts: one character each (48 + count)
    ([0, 40, 3, 45], "0X135"),      # 40 needs two 5-bit groups ('X' = 48 + 8 + 32, then '1'); 45 stored as 45 - 40
    ([5, 10, 2, 3], "5:2I"),        # 3 stored as 3 - 10 = -7: one group with the sign bit, 48 + 25 = 'I'
])
def test_rle_string_round_trip_matches_hand_encoding(counts: list[int], text: str) -> None:
    assert cv.rle_string_from_counts(counts) == text
    assert cv.rle_counts_from_string(text) == counts
    assert cv.rle_counts_from_string(text.encode()) == counts


def test_decode_rle_runs_down_columns_starting_with_zeros() -> None:
    # 3 x 4, runs of 2 zeros, 5 ones, 5 zeros down the columns: column 0 is 0 0 1, column 1 all 1,
    # column 2 is 1 0 0, column 3 all 0.
    expected = np.array([[0, 1, 1, 0],
                         [0, 1, 0, 0],
                         [1, 1, 0, 0]], dtype=np.uint8)
    for counts in ([2, 5, 5], "255"):
        mask = cv.decode_rle({"size": [3, 4], "counts": counts})
        assert mask.dtype == np.uint8 and np.array_equal(mask, expected)
    assert cv.encode_rle(expected) == {"size": [3, 4], "counts": "255"}


def test_rle_round_trip_on_random_masks() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        h, w = rng.integers(1, 30, size=2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        assert np.array_equal(cv.decode_rle(cv.encode_rle(mask)), mask)


def test_rle_with_wrong_pixel_count_is_refused() -> None:
    with pytest.raises(DataError, match="12"):
        cv.decode_rle({"size": [3, 4], "counts": [2, 5]})
    with pytest.raises(DataError, match="RLE"):
        cv.decode_rle({"counts": "255"})


# --------------------------------------------------------------------------- Pascal Context

def _rect(h: int, w: int, rows: slice, cols: slice) -> dict:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[rows, cols] = 1
    return cv.encode_rle(mask)


def test_context_category_list_is_the_sorted_60() -> None:
    ids = cv.CONTEXT_CATEGORY_IDS
    assert len(ids) == 60 and list(ids) == sorted(ids) and ids[0] == 0
    assert (ids[1], ids[2], ids[-1]) == (2, 9, 458)


def test_context_paints_in_list_order_and_maps_to_ranks() -> None:
    h, w = 4, 5
    annotations = [
        (2, _rect(h, w, slice(0, 4), slice(0, 3))),     # aeroplane (rank 1), left three columns
        (9, _rect(h, w, slice(1, 3), slice(2, 5))),     # bag (rank 2) over it, later wins
        (3, _rect(h, w, slice(0, 1), slice(0, 5))),     # unlisted category: top row -> background
        (458, _rect(h, w, slice(3, 4), slice(4, 5))),   # the last class (rank 59)
        (2, _rect(h, w, slice(2, 3), slice(4, 5))),     # aeroplane again, over the bag
    ]
    expected = np.array([[0, 0, 0, 0, 0],
                         [1, 1, 2, 2, 2],
                         [1, 1, 2, 2, 1],
                         [1, 1, 1, 0, 59]], dtype=np.uint8)  # (3, 3) is never covered
    label = cv.context_label_map(h, w, annotations)
    assert label.dtype == np.uint8 and np.array_equal(label, expected)


def test_context_without_annotations_is_all_background() -> None:
    assert not cv.context_label_map(3, 2, []).any()


def test_context_ids_map_to_their_rank_and_others_to_zero() -> None:
    ids = np.array([list(cv.CONTEXT_CATEGORY_IDS) + [1, 3, 459, 500]])
    mapped = cv.map_context_ids(ids)
    assert mapped[0, :60].tolist() == list(range(60))
    assert mapped[0, 60:].tolist() == [0, 0, 0, 0]


def test_context_rle_size_must_match_the_image() -> None:
    with pytest.raises(DataError, match="4x5"):
        cv.context_label_map(4, 5, [(2, _rect(5, 4, slice(0, 1), slice(0, 1)))])


# --------------------------------------------------------------------------- COCO-Stuff / COCO-Object

# raw:           person, unused 11, toothbrush (last thing), unused 90, banner (first stuff), wood (last), unlabelled, never
RAW = np.array([[0, 11, 89, 90, 91, 181, 255, 200]], dtype=np.uint8)


def test_coco_stuff_train_ids_by_hand() -> None:
    assert cv.coco_stuff_train_ids(RAW).tolist() == [[0, 255, 79, 255, 80, 170, 255, 255]]


def test_coco_object_ids_by_hand() -> None:
    # things +1 (in the order of the 80 used values), stuff, 255 and anything else -> 0
    assert cv.coco_object_ids(RAW).tolist() == [[1, 0, 80, 0, 0, 0, 0, 0]]


def test_coco_unexpected_values_are_named() -> None:
    assert cv.unexpected_coco_values(RAW) == [11, 90, 200]
    assert cv.unexpected_coco_values(np.array([[0, 255]], dtype=np.uint8)) == []


def test_coco_tables_agree_with_the_synthetic_writer_on_every_used_value() -> None:
    raw = np.array([[*COCO_USED, 255]], dtype=np.uint8)
    assert np.array_equal(cv.coco_stuff_train_ids(raw), coco_train_ids(raw))
    assert np.array_equal(cv.coco_object_ids(raw), coco_object_ids(raw))
    assert cv.coco_stuff_train_ids(raw)[0, :-1].tolist() == list(range(171))


def test_coco_refuses_multichannel_maps() -> None:
    with pytest.raises(DataError, match="single-channel"):
        cv.coco_stuff_train_ids(np.zeros((2, 2, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- Cityscapes

def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def test_cityscapes_polygons_in_file_order_with_the_label_rules() -> None:
    annotation = {"imgWidth": 8, "imgHeight": 6, "objects": [
        {"label": "road", "polygon": _box(0, 3, 7, 5)},                       # 0 on rows 3..5
        {"label": "cargroup", "polygon": _box(1, 1, 3, 4)},                   # 'group' -> car 13, over road
        {"label": "license plate", "polygon": _box(2, 2, 3, 3)},              # id -1: never drawn
        {"label": "out of roi", "polygon": [[7, 3], [7, 5], [5, 5]]},         # void: 255 over the road
        {"label": "person", "polygon": _box(5, 4, 6, 5), "deleted": 1},       # deleted: skipped
        {"label": "sky", "polygon": _box(4, 0, 7, 1)},                        # 10
    ]}
    # The triangle covers the pixels with x + y >= 10 (Pillow fills edges inclusively).
    expected = np.array([[255, 255, 255, 255, 10, 10, 10, 10],
                         [255, 13, 13, 13, 10, 10, 10, 10],
                         [255, 13, 13, 13, 255, 255, 255, 255],
                         [0, 13, 13, 13, 0, 0, 0, 255],
                         [0, 13, 13, 13, 0, 0, 255, 255],
                         [0, 0, 0, 0, 0, 255, 255, 255]], dtype=np.uint8)
    label = cv.cityscapes_train_ids_from_polygons(annotation)
    assert label.dtype == np.uint8 and np.array_equal(label, expected)


def test_cityscapes_unknown_label_is_refused() -> None:
    with pytest.raises(DataError, match="'spaceship'"):
        cv.cityscapes_train_ids_from_polygons(
            {"imgWidth": 2, "imgHeight": 2, "objects": [{"label": "spaceship", "polygon": _box(0, 0, 1, 1)}]})
    with pytest.raises(DataError, match="imgWidth"):
        cv.cityscapes_train_ids_from_polygons({"objects": []})


def test_cityscapes_label_table_train_ids() -> None:
    train = {name: t for name, i, t in cv.CITYSCAPES_LABELS if i >= 0 and t != 255}
    assert sorted(train.values()) == list(range(19))
    assert cv.cityscapes_label_of("persongroup") == (24, 11)
    assert cv.cityscapes_label_of("polegroup") == (18, 255)  # a label of its own, not 'pole'


def test_cityscapes_label_id_remap_by_hand() -> None:
    ids = np.array([[0, 1, 7, 8, 24, 26, 33, 34, 255]], dtype=np.uint8)
    assert cv.cityscapes_train_ids_from_label_ids(ids).tolist() == [[255, 255, 0, 1, 11, 13, 18, 255, 255]]
