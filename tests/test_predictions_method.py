"""``--method predictions`` against mmseg 1.2.2's ``IoUMetric`` on random label PNGs.

Each case writes a synthetic dataset, a random prediction PNG per image id (half the valid
pixels copied from the GT so IoUs are not all near zero, a few values outside the class range,
some classes never predicted), runs the CLI and compares the result file with mmseg computed on
the same masks and the same reduce_zero_label.

NumPy-2 caveat (as in tests/engine/test_metrics.py; NumPy 2's NEP 50 promotion): the harness
reports the summary numbers as mmseg computed them under NumPy 1 (float64 before x 100);
installed mmseg under NumPy 2 keeps x 100 in float32 and can print 0.01 more or less. The checks
accept exactly that difference and nothing else.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.listing import list_samples
from tests.conftest import call_cli, read_gt, result_jsons, run_argv
from tests.synthetic import write_dataset

try:  # the reference implementation (pip install .[mmseg])
    from mmseg.evaluation.metrics import IoUMetric
except ImportError:  # pragma: no cover - depends on the environment
    IoUMetric = None
needs_mmseg = pytest.mark.skipif(IoUMetric is None, reason="mmsegmentation 1.2.2 is not installed")

# Larger and more varied than the shared tree; cityscapes ids carry their city folder.
SIZES = ((60, 80), (90, 54), (72, 72), (50, 110), (101, 67))
CASES = {"voc": 0, "voc20": 1, "ade20k": 2, "cityscapes": 3}  # dataset -> prediction seed
TREE_SEED = 6  # its VOC GTs hold 0 and 255, its ADE GTs 0 (checked below)


def write_predictions(root: Path, dataset: str, folder: Path, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A random ``<image_id>.png`` per image; returns (prediction, reduced GT) pairs in listing order."""
    card = load_card(dataset)
    n = card.num_classes
    rng = np.random.default_rng(seed)
    never_predicted = rng.choice(n, size=max(1, n // 6), replace=False)
    pairs = []
    for sample in list_samples(card, root):
        gt = read_gt(sample.gt_path, card.reduce_zero_label)
        pred = rng.integers(0, n, size=gt.shape)
        pred[np.isin(pred, never_predicted)] = 0 if 0 not in never_predicted else n - 1
        copy = (rng.random(gt.shape) < 0.5) & (gt != 255)
        pred[copy] = gt[copy]
        outside = rng.random(gt.shape) < 0.02
        pred[outside] = rng.choice([n, 255], size=int(outside.sum()))  # dropped per histogram, as in mmseg
        pred = pred.astype(np.uint8)
        target = folder / f"{sample.image_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(target)
        pairs.append((pred, gt))
    return pairs


def mmseg_metrics(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> tuple[dict, dict]:
    """(summary of IoUMetric.compute_metrics, per-class float32 arrays) from mmseg itself."""
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [f"c{i}" for i in range(num_classes)]}
    samples = [{"pred_sem_seg": {"data": torch.from_numpy(p.astype(np.int64))[None]},
                "gt_sem_seg": {"data": torch.from_numpy(g)[None]}} for p, g in pairs]
    metric.process({}, samples)
    results = list(metric.results)
    summary = metric.compute_metrics(metric.results)
    totals = [sum(r) for r in zip(*results)]
    per_class = IoUMetric.total_area_to_metrics(*totals, ["mIoU"])
    return summary, per_class


def assert_summary(ours: float, theirs: float, per_class_values: np.ndarray) -> None:
    """Equal to mmseg as run under NumPy 1; equal to installed mmseg or off by exactly its NumPy-2 rounding."""
    mean32 = np.nanmean(per_class_values)
    assert ours == float(np.round(np.float64(mean32) * 100, 2))
    if np.float32(ours) != np.float32(theirs):
        assert abs(ours - float(theirs)) == pytest.approx(0.01, abs=1e-5)
        assert np.float32(theirs) == np.round(np.float32(mean32) * np.float32(100), 2)


def expected_per_class(values: np.ndarray) -> list[float | None]:
    """mmseg's per-class table (float32 x 100, rounded in float32) as the float32's shortest decimal."""
    rounded = np.round(values.astype(np.float32) * np.float32(100), 2)
    return [None if np.isnan(v) else float(str(v)) for v in rounded]


@pytest.fixture(scope="module")
def prediction_case(tmp_path_factory):
    cache: dict[str, dict] = {}

    def make(dataset: str) -> dict:
        if dataset not in cache:
            base = tmp_path_factory.mktemp(f"pred_{dataset}")
            root, preds, out = base / "data", base / "preds", base / "runs"
            ids = write_dataset(dataset, root, num_images=len(SIZES), seed=TREE_SEED, sizes=SIZES)
            pairs = write_predictions(root, dataset, preds, seed=CASES[dataset])
            # The maps hold values n and 255 on purpose: mmseg drops them per histogram, and so does
            # --predictions-out-of-range ignore (the default refuses n).
            code, stdout, stderr = call_cli(run_argv("predictions", dataset, out, "--predictions", preds,
                                                     "--predictions-out-of-range", "ignore",
                                                     data_root=root, tiny=False))
            cache[dataset] = {"root": root, "preds": preds, "out": out, "ids": ids, "pairs": pairs,
                              "code": code, "stdout": stdout, "stderr": stderr}
        return cache[dataset]

    return make


@needs_mmseg
@pytest.mark.parametrize("dataset", list(CASES))
def test_predictions_match_mmseg_iou_metric(prediction_case, dataset):
    case = prediction_case(dataset)
    assert case["code"] == 0, case["stderr"]
    files = result_jsons(case["out"])
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    card = load_card(dataset)
    n = card.num_classes

    assert result["method"]["name"] == "predictions"
    assert result["method"]["weights"]["random"] is False
    assert result["images"]["seen"] == len(case["ids"]) == len(SIZES)
    summary, per_class = mmseg_metrics(case["pairs"], n)

    metrics = result["metrics"]
    assert_summary(metrics["mIoU"], summary["mIoU"], per_class["IoU"])
    assert_summary(metrics["mAcc"], summary["mAcc"], per_class["Acc"])
    assert_summary(metrics["aAcc"], summary["aAcc"], per_class["aAcc"])
    names = card.class_names()
    assert [metrics["per_class"][c]["iou"] for c in names] == expected_per_class(per_class["IoU"])
    assert [metrics["per_class"][c]["acc"] for c in names] == expected_per_class(per_class["Acc"])
    # The raw totals are mmseg's (float32 there, exact here at this size).
    inter, union, pred, label = (sum(r) for r in zip(*mmseg_per_image(case["pairs"], n)))
    for key, theirs in zip(("intersect", "union", "pred", "label"), (inter, union, pred, label)):
        assert result["counts"][key] == theirs.to(torch.int64).tolist(), key


def mmseg_per_image(pairs, n: int) -> list[tuple]:
    return [IoUMetric.intersect_and_union(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(g), n, 255)
            for p, g in pairs]


@needs_mmseg
def test_cases_cover_what_they_claim(prediction_case):
    voc = prediction_case("voc")
    assert any((g == 255).any() for _, g in voc["pairs"])                 # ignore pixels in the GT
    assert any((p >= 21).any() for p, _ in voc["pairs"])                  # out-of-range predictions
    voc20 = prediction_case("voc20")
    raws = [np.array(Image.open(s.gt_path)) for s in list_samples(load_card("voc20"), voc20["root"])]
    assert any((raw == 0).any() for raw in raws)                          # reduce_zero_label matters
    ade = prediction_case("ade20k")
    raws = [np.array(Image.open(s.gt_path)) for s in list_samples(load_card("ade20k"), ade["root"])]
    assert any((raw == 0).any() for raw in raws)
    city = prediction_case("cityscapes")
    assert any((g == 255).any() for _, g in city["pairs"])
    assert all("/" in i for i in city["ids"])                             # <city>/<stem> ids
    assert (city["preds"] / f"{city['ids'][0]}.png").is_file()
    result = json.loads(result_jsons(prediction_case("ade20k")["out"])[0].read_text())
    assert None in [v["iou"] for v in result["metrics"]["per_class"].values()]  # classes absent from both


def test_prediction_ids_follow_listing_order(prediction_case):
    case = prediction_case("cityscapes")
    assert case["code"] == 0, case["stderr"]
    result = json.loads(result_jsons(case["out"])[0].read_text())
    assert result["images"]["ids_sha256"] == hashlib.sha256("\n".join(case["ids"]).encode()).hexdigest()


# ----------------------------------------------------------------------------- bad predictions

@pytest.fixture
def voc_with_predictions(tmp_path):
    root, preds = tmp_path / "data", tmp_path / "preds"
    ids = write_dataset("voc", root, num_images=3, seed=5)
    write_predictions(root, "voc", preds, seed=9)
    return root, preds, ids, tmp_path / "runs"


def _run(root: Path, preds: Path, out: Path, dataset: str = "voc") -> tuple[int, str, str]:
    # write_predictions puts out-of-range values in every map; these tests are about other faults.
    return call_cli(run_argv("predictions", dataset, out, "--predictions", preds, "--predictions-out-of-range",
                             "ignore", data_root=root, tiny=False))


def test_missing_prediction_file(voc_with_predictions):
    root, preds, ids, out = voc_with_predictions
    gone = preds / f"{ids[1]}.png"
    gone.unlink()
    code, _, stderr = _run(root, preds, out)
    assert code == 2
    assert str(gone) in stderr
    assert "prediction missing" in stderr
    assert result_jsons(out) == []


def test_wrong_size_prediction(voc_with_predictions):
    root, preds, ids, out = voc_with_predictions
    bad = preds / f"{ids[2]}.png"
    h, w = np.array(Image.open(bad)).shape
    Image.fromarray(np.zeros((h + 1, w), dtype=np.uint8)).save(bad)
    code, _, stderr = _run(root, preds, out)
    assert code == 2
    assert str(bad) in stderr
    assert f"{w}x{h + 1}" in stderr and f"{w}x{h}" in stderr  # both sizes, width x height
    assert result_jsons(out) == []


def test_rgb_prediction_of_the_right_size_says_single_channel(voc_with_predictions):
    """An RGB PNG of the GT's size must not be reported as a size mismatch between equal sizes."""
    root, preds, ids, out = voc_with_predictions
    bad = preds / f"{ids[0]}.png"
    labels = np.array(Image.open(bad))
    Image.fromarray(np.stack([labels] * 3, axis=-1)).save(bad)
    code, _, stderr = _run(root, preds, out)
    assert code == 2
    assert str(bad) in stderr
    assert result_jsons(out) == []
    assert "channel" in stderr, stderr  # says what is wrong: 3 channels, not a size


def test_unreadable_prediction_file(voc_with_predictions):
    root, preds, ids, out = voc_with_predictions
    bad = preds / f"{ids[0]}.png"
    bad.write_bytes(b"this is not a png")
    code, _, stderr = _run(root, preds, out)
    assert code == 2
    assert str(bad) in stderr and "not a readable PNG" in stderr
    assert result_jsons(out) == []


def test_predictions_folder_required_and_must_exist(voc_with_predictions):
    root, preds, _, out = voc_with_predictions
    code, _, stderr = call_cli(run_argv("predictions", "voc", out, data_root=root, tiny=False))
    assert code == 2 and "--predictions" in stderr
    gone = preds.parent / "no_such_folder"
    code, _, stderr = _run(root, gone, out)
    assert code == 2 and str(gone) in stderr and "not found" in stderr
    assert result_jsons(out) == []
