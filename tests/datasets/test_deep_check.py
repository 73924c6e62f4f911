"""`data check --deep`: sizes (EXIF considered), value sets per card, EXIF counts, GT checksums."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_bench.datasets import check as check_module
from ovseg_bench.datasets.cards import ALL_BENCHMARKS, load_card
from ovseg_bench.datasets.check import (GT_MANIFEST_NAME, check_dataset, format_checks, load_gt_manifest,
                                        read_gt_manifest, write_gt_manifest)
from ovseg_bench.errors import DataError
from tests.synthetic import voc_palette, write_all, write_dataset

CONTEXT_GT = "VOCdevkit/VOC2010/SegmentationClassContext"


def _deep(name: str, root: Path, n: int = 3):
    return check_dataset(load_card(name), root, num_expected=n, deep=True)


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deep")
    write_all(root)
    return root


@pytest.mark.parametrize("name", ALL_BENCHMARKS)
def test_deep_check_passes_on_every_synthetic_benchmark(clean_tree: Path, name: str) -> None:
    result = _deep(name, clean_tree)
    assert result.deep and result.problems == [] and result.ok
    assert result.exif_rotated == ()
    assert any("not verified" in note for note in result.notes)  # no manifest written yet


def test_quick_check_has_no_notes_and_no_notes_column(clean_tree: Path) -> None:
    result = check_dataset(load_card("voc"), clean_tree, num_expected=3)
    assert not result.deep and result.notes == ()
    assert "notes" not in format_checks([result]).splitlines()[0]
    assert "notes" in format_checks([_deep("voc", clean_tree)]).splitlines()[0]


def test_gt_size_mismatch_is_named(tmp_path: Path) -> None:
    ids = write_dataset("context", tmp_path)
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(tmp_path / CONTEXT_GT / f"{ids[1]}.png")
    result = _deep("context", tmp_path)
    assert len(result.problems) == 1
    assert "1 of 3 GT files whose size differs" in result.problems[0]
    assert f"{ids[1]}.png (GT 7x5, image 42x70)" in result.problems[0]


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("context", 60, "0..59 (and 255, ignored)"),    # one past the last class
    ("context59", 61, "0..59 (and 255, ignored)"),  # 255 alone is information there, see below
    ("coco_object", 255, "0..80 (no 255)"),   # unlabelled must have become background
    ("coco_stuff", 171, "0..170 and 255"),
    ("cityscapes", 19, "0..18 and 255"),
    ("ade20k", 151, "0..150 (no 255)"),
    ("voc", 21, "0..20 and 255"),
])
def test_values_outside_the_card_are_named(tmp_path: Path, name: str, value: int, allowed: str) -> None:
    write_dataset(name, tmp_path)
    first = _first_gt(name, tmp_path)
    gt = np.array(Image.open(first))
    gt[0, 0] = value
    image = Image.fromarray(gt)
    if name == "voc":
        image.putpalette(voc_palette())
    image.save(first)
    result = _deep(name, tmp_path)
    assert len(result.problems) == 1, result.problems
    assert f"1 of 3 GT files with values outside {allowed}" in result.problems[0]
    assert f"{first.name} (values {value})" in result.problems[0]


def _first_gt(name: str, root: Path) -> Path:
    from ovseg_bench.datasets.listing import list_samples

    return list_samples(load_card(name), root)[0].gt_path


def test_ignore_value_is_allowed_where_the_card_has_it(tmp_path: Path) -> None:
    write_dataset("voc", tmp_path)
    path = _first_gt("voc", tmp_path)
    gt = np.array(Image.open(path))
    gt[:2, :2] = 255
    image = Image.fromarray(gt)
    image.putpalette(voc_palette())
    image.save(path)
    assert _deep("voc", tmp_path).problems == []


def _put_value(name: str, root: Path, value: int) -> Path:
    """Set the top-left 2x2 pixels of the first GT file of ``name`` to ``value``."""
    path = _first_gt(name, root)
    gt = np.array(Image.open(path))
    gt[:2, :2] = value
    Image.fromarray(gt).save(path)
    return path


def test_ignore_value_is_information_on_context_and_a_problem_elsewhere(tmp_path: Path) -> None:
    """The run ignores 255 like mmseg on every card, so the deep check must not fail Context on it;
    the other cards without ignore keep refusing it (there it means a wrong conversion)."""
    assert not any("(ignore)" in note for note in _deep("context", _tree(tmp_path / "clean", "context")).notes)
    for name in ("context", "context59"):
        root = _tree(tmp_path / name, name)
        _put_value(name, root, 255)
        result = _deep(name, root)
        assert result.problems == [] and result.ok, (name, result.problems)
        assert "info: 255 (ignore) in 1 of 3 GT files" in result.notes[0], name
    for name in ("ade20k", "coco_object"):
        root = _tree(tmp_path / name, name)
        _put_value(name, root, 255)
        result = _deep(name, root)
        assert len(result.problems) == 1 and "(values 255)" in result.problems[0], name
        assert not any("(ignore)" in note for note in result.notes), name


def _tree(root: Path, name: str) -> Path:
    write_dataset(name, root)
    return root


def test_rgb_gt_is_not_a_label_map(tmp_path: Path) -> None:
    write_dataset("ade20k", tmp_path)
    path = _first_gt("ade20k", tmp_path)
    Image.open(path).convert("RGB").save(path)
    result = _deep("ade20k", tmp_path)
    assert any("not single-channel 8-bit label maps" in p and "(mode RGB)" in p for p in result.problems)


def _exif_rotated_jpeg(path: Path, width: int, height: int, orientation: int) -> None:
    """A JPEG stored width x height whose EXIF Orientation tag says how to show it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path, exif=exif.tobytes())


def test_exif_rotated_images_are_counted_named_and_sized_after_rotation(tmp_path: Path) -> None:
    ids = write_dataset("context", tmp_path, sizes=[(48, 64)])
    image_dir = tmp_path / "VOCdevkit/VOC2010/JPEGImages"
    _exif_rotated_jpeg(image_dir / f"{ids[0]}.jpg", 64, 48, orientation=6)   # shown 48 wide, 64 high
    Image.fromarray(np.zeros((64, 48), dtype=np.uint8)).save(tmp_path / CONTEXT_GT / f"{ids[0]}.png")
    _exif_rotated_jpeg(image_dir / f"{ids[1]}.jpg", 64, 48, orientation=3)   # upside down: same size
    result = _deep("context", tmp_path)
    assert result.problems == []
    assert result.exif_rotated == (ids[0], ids[1])
    assert "2 image(s) carry an EXIF Orientation other than 1" in result.notes[0]
    assert f"{ids[0]}.jpg (6)" in result.notes[0] and f"{ids[1]}.jpg (3)" in result.notes[0]
    # A GT drawn on the stored (unrotated) pixels no longer fits the image the reference decodes.
    Image.fromarray(np.zeros((48, 64), dtype=np.uint8)).save(tmp_path / CONTEXT_GT / f"{ids[0]}.png")
    result = _deep("context", tmp_path)
    assert len(result.problems) == 1 and f"{ids[0]}.png (GT 64x48, image 48x64)" in result.problems[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checksums_against_the_local_manifest(tmp_path: Path) -> None:
    write_dataset("coco_stuff", tmp_path)
    card = load_card("coco_stuff")
    root = card.root_in(tmp_path)
    gts = sorted((root / "annotations/val2017").glob("*_labelTrainIds.png"))
    manifest = write_gt_manifest(root, card, {p.relative_to(root).as_posix(): _sha(p) for p in gts})
    assert manifest == root / GT_MANIFEST_NAME
    result = _deep("coco_stuff", tmp_path)
    assert result.problems == [] and f"GT sha256 checked against {manifest}" in result.notes
    assert _deep("coco_object", tmp_path).problems == []  # no entry for it: not verified, no problem
    # A changed file (same values, different bytes count as well) and a file the manifest lacks.
    Image.fromarray(np.array(Image.open(gts[0]))).save(gts[0], compress_level=0)
    write_gt_manifest(root, card, {p.relative_to(root).as_posix(): _sha(p) for p in gts[:2]} | {
        gts[0].relative_to(root).as_posix(): "0" * 64})
    problems = _deep("coco_stuff", tmp_path).problems
    assert any("1 of 3 GT files differ from the checksums" in p and gts[0].name in p for p in problems)
    assert any("1 of 3 GT files are not in the checksum manifest" in p and gts[2].name in p for p in problems)
    assert "coco_stuff" in read_gt_manifest(manifest)
    manifest.write_text("not json", encoding="utf-8")  # reported as a problem, never raised
    assert any(GT_MANIFEST_NAME in p and "not a GT checksum manifest" in p for p in _deep("coco_stuff", tmp_path).problems)


def test_manifest_keeps_other_cards_and_refuses_foreign_files(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    write_gt_manifest(root, load_card("voc"), {"a.png": "1" * 64})
    write_gt_manifest(root, load_card("voc20"), {"a.png": "1" * 64})
    assert set(read_gt_manifest(root / GT_MANIFEST_NAME)) == {"voc", "voc20"}
    (root / GT_MANIFEST_NAME).write_text('{"schema": "something else"}', encoding="utf-8")
    with pytest.raises(DataError, match=GT_MANIFEST_NAME):
        read_gt_manifest(root / GT_MANIFEST_NAME)


def test_a_shipped_manifest_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset("ade20k", tmp_path)
    card = load_card("ade20k")
    root = card.root_in(tmp_path)
    gts = sorted((root / "annotations/validation").glob("*.png"))
    write_gt_manifest(root, card, {p.relative_to(root).as_posix(): _sha(p) for p in gts})
    shipped = tmp_path / "shipped" / "ade20k.json"
    shipped.parent.mkdir()
    write_gt_manifest(shipped.parent, card, {p.relative_to(root).as_posix(): "f" * 64 for p in gts})
    (shipped.parent / GT_MANIFEST_NAME).rename(shipped)
    monkeypatch.setattr(check_module, "shipped_gt_manifest", lambda c: shipped)
    entries, source = load_gt_manifest(card, root)
    assert source == shipped and set(entries.values()) == {"f" * 64}
    assert any("3 of 3 GT files differ" in p for p in _deep("ade20k", tmp_path).problems)


def test_data_check_deep_on_the_command_line(cli, tmp_path: Path) -> None:
    write_dataset("voc", tmp_path)
    code, stdout, _ = cli("data", "check", "voc", "--deep", "--data-root", tmp_path)
    assert code == 1 and "count mismatch" in stdout  # 3 images, the card expects 1449
    assert "notes" in stdout.splitlines()[0] and "GT checksums not verified" in stdout
