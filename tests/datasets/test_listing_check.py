"""Listing order, GT naming and the quick `data check` on synthetic trees in the real layouts."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ovseg_bench.datasets.cards import ALL_BENCHMARKS, load_card
from ovseg_bench.datasets.check import check_dataset, format_checks
from ovseg_bench.datasets.listing import list_samples, missing_gt
from ovseg_bench.errors import DataError
from tests.synthetic import write_all, write_dataset

# Where the first synthetic image's GT lies under the data root (the naming of each format).
FIRST_GT = {
    "voc": "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png",
    "voc20": "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png",
    "context": "VOCdevkit/VOC2010/SegmentationClassContext/2008_000002.png",
    "context59": "VOCdevkit/VOC2010/SegmentationClassContext/2008_000002.png",
    "coco_stuff": "coco_stuff164k/annotations/val2017/000000000139_labelTrainIds.png",
    "coco_object": "coco_stuff164k/annotations/val2017/000000000139_instanceTrainIds.png",
    "cityscapes": "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png",
    "ade20k": "ade/ADEChallengeData2016/annotations/validation/ADE_val_00000001.png",
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """All eight benchmarks, three images each, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("data")
    return root, write_all(root)


@pytest.mark.parametrize("name", ALL_BENCHMARKS)
def test_listing_finds_every_synthetic_image(tree, name: str) -> None:
    root, ids = tree
    samples = list_samples(load_card(name), root)
    assert [s.image_id for s in samples] == ids[name]
    assert all(s.image_path.is_file() for s in samples)
    assert missing_gt(samples) == []
    assert samples[0].gt_path == root / FIRST_GT[name]


@pytest.mark.parametrize("name", ALL_BENCHMARKS)
def test_synthetic_gt_matches_card_label_values_and_image_size(tree, name: str) -> None:
    root, _ = tree
    card = load_card(name)
    allowed = set(range(card.raw_label_max + 1)) | ({255} if card.gt_has_ignore else set())
    for sample in list_samples(card, root):
        gt = np.array(Image.open(sample.gt_path))  # as mmseg's LoadAnnotations: no conversion
        assert gt.dtype == np.uint8 and gt.ndim == 2
        assert set(np.unique(gt).tolist()) <= allowed
        assert gt.shape == cv2.imread(str(sample.image_path), cv2.IMREAD_COLOR).shape[:2]


def test_voc_gt_decodes_to_indices_not_colours(tree) -> None:
    root, _ = tree
    path = list_samples(load_card("voc"), root)[0].gt_path
    image = Image.open(path)
    assert image.mode == "P"
    indices = np.array(image)
    assert indices.ndim == 2 and len(np.unique(indices)) > 1
    assert set(np.unique(indices).tolist()) <= set(range(21)) | {255}
    # The colours are a different thing: cv2 gives 3 channels of palette colours.
    assert cv2.imread(str(path), cv2.IMREAD_COLOR).shape == (*indices.shape, 3)


def test_split_file_order_is_kept_even_when_unsorted(tmp_path: Path) -> None:
    ids = write_dataset("voc", tmp_path, num_images=4)
    split = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    shuffled = [ids[2], ids[0], ids[3], ids[1]]
    split.write_text("\n".join(shuffled) + "\n")
    assert [s.image_id for s in list_samples(load_card("voc20"), tmp_path)] == shuffled


def test_split_file_lists_only_its_entries(tmp_path: Path) -> None:
    ids = write_dataset("context", tmp_path)
    stray = tmp_path / "VOCdevkit/VOC2010/JPEGImages/2008_999999.jpg"  # a train image, say
    shutil.copy(tmp_path / f"VOCdevkit/VOC2010/JPEGImages/{ids[0]}.jpg", stray)
    assert [s.image_id for s in list_samples(load_card("context"), tmp_path)] == ids


def test_recursive_scan_is_sorted_case_sensitive_and_skips_dot_files(tmp_path: Path) -> None:
    ids = write_dataset("cityscapes", tmp_path, num_images=5)
    img_dir = tmp_path / "cityscapes/leftImg8bit/val"
    first = img_dir / f"{ids[0]}_leftImg8bit.png"
    shutil.copy(first, img_dir / "frankfurt/.hidden_leftImg8bit.png")
    shutil.copy(first, img_dir / "frankfurt/upper_leftImg8bit.PNG")
    (img_dir / "aachen/deeper").mkdir(parents=True)
    shutil.copy(first, img_dir / "aachen/deeper/aachen_000000_000001_leftImg8bit.png")
    listed = [s.image_id for s in list_samples(load_card("cityscapes"), tmp_path)]
    assert listed == sorted(ids + ["aachen/deeper/aachen_000000_000001"])
    assert ids == sorted(ids) and ids[1].startswith("frankfurt/")  # cities were written interleaved


def test_writer_is_deterministic(tmp_path: Path) -> None:
    def file_bytes(root: Path) -> bytes:
        image = root / "coco_stuff164k/images/val2017/000000000139.jpg"
        return (root / FIRST_GT["coco_stuff"]).read_bytes() + image.read_bytes()

    for sub, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_dataset("coco_object", tmp_path / sub, seed=seed)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b") != file_bytes(tmp_path / "c")


def test_custom_sizes_are_height_width(tmp_path: Path) -> None:
    write_dataset("ade20k", tmp_path, num_images=2, sizes=[(30, 70)])
    gt = np.array(Image.open(tmp_path / FIRST_GT["ade20k"]))
    assert gt.shape == (30, 70)


def test_wrong_data_root_raises_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError) as info:
        list_samples(load_card("ade20k"), missing)
    message = str(info.value)
    assert str(missing) in message and "--data-root" in message and "OVSEG_DATA" in message
    assert "ade20k.yaml" in message


def test_missing_image_folder_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "cityscapes").mkdir()
    with pytest.raises(DataError, match="leftImg8bit/val"):
        list_samples(load_card("cityscapes"), tmp_path)


def test_check_on_complete_tree_reports_count_against_card(tree) -> None:
    root, _ = tree
    checks = [check_dataset(load_card(n), root) for n in ALL_BENCHMARKS]
    for check in checks:
        assert check.found and check.problems == [] and check.num_images == 3
        assert check.num_expected == load_card(check.name).num_images
        assert (check.status, check.ok) == ("count mismatch", False)
    table = format_checks(checks)
    assert "3 / 1449" in table and "3 / 500" in table and "count mismatch" in table


def test_check_with_matching_expected_count_is_ok(tree) -> None:
    root, _ = tree
    check = check_dataset(load_card("voc"), root, num_expected=3)
    assert (check.status, check.ok) == ("ok", True)


def test_check_reports_missing_gt_and_split_file(tmp_path: Path) -> None:
    ids = write_dataset("voc", tmp_path)
    write_dataset("context", tmp_path)
    (tmp_path / f"VOCdevkit/VOC2012/SegmentationClass/{ids[1]}.png").unlink()
    split = tmp_path / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"
    split.unlink()
    voc = check_dataset(load_card("voc"), tmp_path)
    assert voc.status == "problems" and voc.num_images == 3
    assert len(voc.problems) == 1 and "1 of 3 GT files missing" in voc.problems[0]
    assert f"{ids[1]}.png" in voc.problems[0]
    context = check_dataset(load_card("context"), tmp_path)
    assert context.status == "problems" and context.num_images == 0
    assert any(str(split) in p for p in context.problems)
    assert "split file" in format_checks([voc, context])


def test_check_reports_missing_gt_folder_and_absent_listed_images(tmp_path: Path) -> None:
    ids = write_dataset("coco_stuff", tmp_path)
    write_dataset("voc", tmp_path)
    shutil.rmtree(tmp_path / "coco_stuff164k/annotations")
    coco = check_dataset(load_card("coco_stuff"), tmp_path)
    assert coco.num_images == len(ids)
    assert coco.problems == [f"GT folder {tmp_path / 'coco_stuff164k/annotations/val2017'} not found"]
    (tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000040.jpg").unlink()
    voc = check_dataset(load_card("voc"), tmp_path)
    assert voc.num_images == 2 and "1 of 3 images missing" in voc.problems[0]


def test_check_points_to_the_card_when_no_gt_exists(tmp_path: Path) -> None:
    write_dataset("coco_stuff", tmp_path)
    for path in (tmp_path / "coco_stuff164k/annotations/val2017").glob("*_instanceTrainIds.png"):
        path.unlink()
    check = check_dataset(load_card("coco_object"), tmp_path)
    assert check.problems and "none of the 3 GT files" in check.problems[0]
    assert "coco_object.yaml" in check.problems[0]


def test_check_on_wrong_data_root_reports_without_raising(tmp_path: Path) -> None:
    check = check_dataset(load_card("voc"), tmp_path / "nowhere")
    assert (check.found, check.status, check.num_images) == (False, "missing", 0)
    assert str(tmp_path / "nowhere") in check.problems[0]


# ------------------------------------------------------------ where the data root came from

def test_missing_default_data_root_says_it_was_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --data-root and no $OVSEG_DATA: the message says ./data was the default and how to change it."""
    monkeypatch.delenv("OVSEG_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # ./data does not exist here
    with pytest.raises(DataError) as info:
        list_samples(load_card("ade20k"), Path("data"))
    message = str(info.value)
    assert "no --data-root was given and $OVSEG_DATA is unset, so the default ./data (" in message
    assert f"{tmp_path / 'data'}) was used" in message
    assert "--data-root DIR" in message
    check = check_dataset(load_card("voc"), Path("data"))
    assert "the default ./data (" in check.problems[0] and "does not exist" in check.problems[0]


def test_missing_data_root_from_the_environment_names_ovseg_data(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "from_env"
    monkeypatch.setenv("OVSEG_DATA", str(gone))
    check = check_dataset(load_card("voc"), gone)
    assert str(gone) in check.problems[0] and "this is $OVSEG_DATA" in check.problems[0]


def test_require_datasets_names_every_missing_dataset_at_once(tmp_path: Path) -> None:
    from ovseg_bench.datasets.listing import require_datasets

    write_dataset("voc", tmp_path)
    (tmp_path / "cityscapes").mkdir()  # present, but without its image folder
    cards = [load_card(n) for n in ALL_BENCHMARKS]
    with pytest.raises(DataError) as info:
        require_datasets(cards, tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"datasets not found under {tmp_path}: context (expected ")
    assert f"ade20k (expected {tmp_path / 'ade/ADEChallengeData2016'})" in message
    assert f"cityscapes (expected image folder {tmp_path / 'cityscapes/leftImg8bit/val'})" in message
    assert "voc (" not in message and "ovseg-bench data prepare context context59" in message
    require_datasets([load_card("voc"), load_card("demo")], tmp_path)  # all there: no error


def test_require_datasets_on_a_missing_root_says_so_once(tmp_path: Path) -> None:
    from ovseg_bench.datasets.listing import require_datasets

    with pytest.raises(DataError, match=r"data root .*nowhere does not exist \(needed by voc, ade20k\)"):
        require_datasets([load_card("voc"), load_card("ade20k")], tmp_path / "nowhere")
