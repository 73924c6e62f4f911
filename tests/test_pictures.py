"""Pictures: ``predict`` overlays, ``run --save-predictions`` label PNGs, ``run --visualize`` panels.

End to end through the in-process CLI with the tiny random model; random weights give
arbitrary labels, so the checks are about files, sizes, colours and exact round trips.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.listing import list_samples
from ovseg_bench.errors import ConfigError
from ovseg_bench.pictures import (class_shares, format_share, make_image_hook, palette, panel_entries,
                                  parse_classes, render_overlay, render_panel)
from tests.conftest import TINY_MODEL, call_cli, read_gt, result_jsons, run_argv, unwritable

DEMO_IMAGE = Path(__file__).resolve().parents[1] / "datasets" / "demo" / "JPEGImages" / "chelsea.jpg"
TINY = ("--model", TINY_MODEL, "--pretrained", "none", "--device", "cpu")
VISUALIZE = 2  # of the synthetic tree's 3 images per dataset


def predict_argv(out: Path, image: Path = DEMO_IMAGE, classes: str = "cat,floor,wall") -> list[str]:
    return ["predict", "--method", "clip", "--image", image, "--classes", classes, "--out", out, *TINY]


def chromatic(pixels: np.ndarray) -> set[tuple[int, ...]]:
    """The coloured (not grey) RGB values of ``pixels``: black text antialiased on white or grey
    adds only greys, so in a legend these are exactly the swatches of non-grey classes."""
    flat = pixels.reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(flat[(flat != flat[:, :1]).any(axis=1)], axis=0)}


# ----------------------------------------------------------------------------- predict

def test_predict_writes_an_overlay_with_a_legend(cli, tmp_path):
    out = tmp_path / "nested" / "overlay.png"
    code, stdout, stderr = cli(*predict_argv(out, classes="cat|kitten,floor,wall"))
    assert code == 0, stderr
    with Image.open(DEMO_IMAGE) as original:
        width, height = original.size
    with Image.open(out) as overlay:
        assert overlay.format == "PNG" and overlay.mode == "RGB"
        assert overlay.width == width and overlay.height > height  # the legend sits below the image
        pixels = np.asarray(overlay)
    assert len(np.unique(pixels[:height].reshape(-1, 3), axis=0)) > 1
    legend = pixels[height:]
    assert (legend == 255).all(axis=2).mean() > 0.5 and (legend < 64).all(axis=2).any()  # white with dark text
    assert str(out) in stdout
    # --pretrained none: the run table's warning, on stderr so the printed shares stay parseable
    assert "RANDOM WEIGHTS (--pretrained none)" in stderr and "mean nothing" in stderr and "RANDOM" not in stdout
    shares = [float(line.split()[-1].rstrip("%").lstrip("<")) for line in stdout.splitlines()
              if line.split()[:1] in (["cat"], ["floor"], ["wall"])]
    assert len(shares) == 3 and abs(sum(shares) - 100) < 0.3


def test_parse_classes_with_synonyms():
    assert parse_classes("cat|kitten, sofa ,floor") == (("cat", "kitten"), ("sofa",), ("floor",))
    assert parse_classes("sky") == (("sky",),)
    for bad, words in [("", "empty"), (" , ", "empty"), ("cat,,sofa", "class 2 has an empty name"),
                       ("cat|,sofa", "class 1"), ("cat,sofa,cat", "more than once")]:
        with pytest.raises(ConfigError, match=words):
            parse_classes(bad)


@pytest.mark.parametrize("classes", ["", " , "])
def test_predict_empty_class_list_exits_2(cli, tmp_path, classes):
    code, _, stderr = cli(*predict_argv(tmp_path / "o.png", classes=classes))
    assert code == 2 and "--classes is empty" in stderr and "cat,sofa,floor" in stderr
    assert not (tmp_path / "o.png").exists()


def test_predict_bad_image_exits_2_naming_it(cli, tmp_path):
    missing = tmp_path / "no_such.jpg"
    code, _, stderr = cli(*predict_argv(tmp_path / "o.png", image=missing))
    assert code == 2 and str(missing) in stderr and "not found" in stderr and "Traceback" not in stderr
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not a jpeg")
    code, _, stderr = cli(*predict_argv(tmp_path / "o.png", image=corrupt))
    assert code == 2 and str(corrupt) in stderr and "not a decodable image" in stderr
    assert not (tmp_path / "o.png").exists()


def test_predict_refuses_label_methods_and_non_png_out(cli, tmp_path):
    code, _, stderr = cli("predict", "--method", "predictions", "--image", DEMO_IMAGE, "--classes", "cat")
    assert code == 2 and "cannot segment an image" in stderr
    code, _, stderr = cli(*predict_argv(tmp_path / "overlay.jpg"))
    assert code == 2 and "ending in .png" in stderr


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if predict gets as far as looking up the method (and so loading weights)."""
    monkeypatch.setattr("ovseg_bench.registry.get_method", lambda name: pytest.fail("the model was loaded"))


def test_predict_refuses_an_out_below_a_file_before_loading(cli, tmp_path, no_model_load):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "sub" / "overlay.png"
    code, _, stderr = cli(*predict_argv(out))
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"{tmp_path / 'notes.txt'} is not a folder" in stderr


def test_predict_refuses_a_read_only_folder_before_loading(cli, tmp_path, no_model_load):
    folder = tmp_path / "read_only"
    with unwritable(folder):
        code, _, stderr = cli(*predict_argv(folder / "new" / "overlay.png"))
    assert code == 2 and stderr.count("\n") == 1 and f"cannot write in {folder}" in stderr
    assert not (folder / "new").exists()


# ----------------------------------------------------------------------------- colours and layout

def test_palette_is_fixed_and_keeps_ignore_apart():
    table = palette()
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert np.array_equal(table, palette())
    assert tuple(table[255]) == (255, 255, 255)
    classes = table[:255]
    assert not (classes == 0).all(axis=1).any() and not (classes == 255).all(axis=1).any()
    assert len(np.unique(classes, axis=0)) == 255
    assert [tuple(c) for c in table[:3]] == [(128, 0, 0), (0, 128, 0), (128, 128, 0)]  # VOC colours 1..3


def test_overlay_legend_lists_present_classes_only():
    rgb = np.full((40, 300, 3), 90, dtype=np.uint8)
    labels = np.zeros((40, 300), dtype=np.int64)
    labels[:, 200:] = 2
    overlay = np.asarray(render_overlay(rgb, labels, ["left", "absent", "right"]))
    legend_colours = {tuple(c) for c in overlay[40:].reshape(-1, 3)}
    assert tuple(palette()[0]) in legend_colours and tuple(palette()[2]) in legend_colours
    assert tuple(palette()[1]) not in legend_colours
    assert np.allclose(class_shares(labels, 3), [2 / 3, 0, 1 / 3])
    assert format_share(0.0001) == "<0.1%" and format_share(0.5) == "50.0%"


NAMES = ("c0", "c1", "c2", "c3", "c4", "c5")  # palette colours 0..5 are all chromatic


def test_panel_is_three_images_wide_with_ignore_white():
    rgb = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    gt = np.full((30, 60), 255, dtype=np.uint8)
    gt[:10] = 4
    panel = np.asarray(render_panel(rgb, gt, np.zeros((30, 60), np.uint8), "m | d | id", names=NAMES))
    assert panel.shape[1] == 180 and panel.shape[0] > 30
    assert np.array_equal(panel[:30, :60], rgb)
    assert (panel[10:30, 60:120] == 255).all() and (panel[:10, 60:120] == palette()[4]).all()
    assert (panel[:30, 120:180] == palette()[0]).all()


def test_panel_legend_lists_classes_of_gt_or_prediction_then_ignored():
    gt = np.full((30, 60), 255, dtype=np.uint8)
    gt[:10] = 1
    labels = np.full((30, 60), 2, dtype=np.uint8)
    labels[:, 30:] = 4
    entries = panel_entries(gt, labels, NAMES)
    assert [name for _, name in entries] == ["c1", "c2", "c4", "ignored"]  # class order; 0, 3, 5 absent
    assert np.array_equal([colour for colour, _ in entries], palette()[[1, 2, 4, 255]])
    panel = render_panel(np.zeros((30, 60, 3), np.uint8), gt, labels, "m | d | id", names=NAMES)
    assert chromatic(np.asarray(panel)[30:]) == {tuple(int(v) for v in palette()[k]) for k in (1, 2, 4)}
    again = render_panel(np.zeros((30, 60, 3), np.uint8), gt, labels, "m | d | id", names=NAMES)
    assert panel.tobytes() == again.tobytes()
    beyond_the_card = panel_entries(np.array([[1, 9]]), np.array([[1, 1]]), NAMES)
    assert [name for _, name in beyond_the_card] == ["c1", "9: not a class"]


def test_hook_beyond_n_without_saving_does_nothing(tmp_path):
    card = load_card("voc")
    hook = make_image_hook(tmp_path, "clip", card, [], save_predictions=False, visualize=1)
    hook(1, "later_image", torch.zeros(4, 4, dtype=torch.int64), torch.zeros(4, 4, dtype=torch.uint8))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="--visualize -1"):
        make_image_hook(tmp_path, "clip", card, [], save_predictions=False, visualize=-1)


# ----------------------------------------------------------------------------- run outputs

@pytest.fixture(scope="module")
def cityscapes_run(synthetic_tree, tmp_path_factory):
    """One tiny-model run on the synthetic cityscapes split (ids carry a city folder) that saves
    predictions and visualises the first VISUALIZE images; then the saved labels scored again."""
    root, _ = synthetic_tree
    output = tmp_path_factory.mktemp("pictures_run")
    code, _, stderr = call_cli(run_argv("clip", "cityscapes", output, "--save-predictions",
                                        "--visualize", VISUALIZE, data_root=root))
    assert code == 0, stderr
    rescored = output / "rescored"
    folder = output / "predictions" / "clip" / "cityscapes"
    code, _, stderr = call_cli(run_argv("predictions", "cityscapes", rescored, "--predictions", folder,
                                        data_root=root, tiny=False))
    assert code == 0, stderr
    return root, output, rescored


def test_saved_predictions_score_exactly_like_the_run(cityscapes_run):
    root, output, rescored = cityscapes_run
    card = load_card("cityscapes")
    samples = list_samples(card, root)
    assert any("/" in s.image_id for s in samples)
    for sample in samples:
        with Image.open(output / "predictions" / "clip" / "cityscapes" / f"{sample.image_id}.png") as png:
            assert png.mode == "L" and png.size[::-1] == read_gt(sample.gt_path, card.reduce_zero_label).shape
            assert np.asarray(png).max() < card.num_classes
    first, second = (json.loads(result_jsons(folder)[0].read_text()) for folder in (output, rescored))
    assert first["counts"] == second["counts"]
    assert first["metrics"] == second["metrics"]
    assert first["images"]["ids_sha256"] == second["images"]["ids_sha256"]


def test_visualize_writes_the_first_n_panels_only(cityscapes_run):
    root, output, _ = cityscapes_run
    card = load_card("cityscapes")
    samples = list_samples(card, root)
    folder = output / "visualize" / "clip__cityscapes"
    expected = {f"{s.image_id.replace('/', '__')}.png" for s in samples[:VISUALIZE]}
    assert {p.name for p in folder.iterdir()} == expected
    for sample in samples[:VISUALIZE]:
        name = f"{sample.image_id.replace('/', '__')}.png"
        with Image.open(sample.image_path) as image, Image.open(folder / name) as panel:
            assert panel.width == 3 * image.width and panel.height > image.height
            assert np.array_equal(np.asarray(panel)[: image.height, : image.width], np.asarray(image.convert("RGB")))
            below = np.asarray(panel)[image.height:]  # caption and legend
        with Image.open(output / "predictions" / "clip" / "cityscapes" / f"{sample.image_id}.png") as png:
            present = np.union1d(read_gt(sample.gt_path, card.reduce_zero_label), np.asarray(png))
        # the legend shows a swatch for each class in the GT or the prediction, and no other class
        assert chromatic(below) == chromatic(palette()[present[present < card.num_classes]])
