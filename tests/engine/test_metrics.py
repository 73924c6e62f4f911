"""IoUCounts against mmseg 1.2.2's IoUMetric and against per-class numpy counting."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ovseg_bench.engine.metrics import IoUCounts, MetricSummary, mmseg_float32_totals, summarize
from ovseg_bench.errors import DataError

try:  # the reference implementation; an optional dependency (pip install .[mmseg])
    from mmseg.evaluation.metrics import IoUMetric
except ImportError:  # pragma: no cover - depends on the environment
    IoUMetric = None
needs_mmseg = pytest.mark.skipif(IoUMetric is None, reason="mmsegmentation 1.2.2 is not installed")


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg LoadAnnotations(reduce_zero_label=True) on a uint8 map: 0 -> 255, v -> v-1, 255 stays."""
    out = label.astype(np.uint8).copy()
    out[out == 0] = 255
    out = out - 1
    out[out == 254] = 255
    return out


def random_case(rng: np.random.Generator, num_classes: int, num_images: int,
                reduce: bool, out_of_range: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images of varied sizes; some classes never appear, some only in predictions."""
    n = num_classes
    absent_both = rng.choice(n, size=max(1, n // 5), replace=False)
    only_pred = [c for c in range(n) if c not in absent_both][:1]
    pairs = []
    for _ in range(num_images):
        h, w = (int(v) for v in rng.integers(5, 40, size=2))
        raw_hi = n + (1 if reduce else 0) + (2 if out_of_range else 0)
        gt = rng.integers(0, raw_hi, size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.15] = 255
        if reduce:
            gt = reduce_zero_label(gt)
        gt[np.isin(gt, np.concatenate([absent_both, only_pred]))] = 255
        pred = rng.integers(-1 if out_of_range else 0, n + (3 if out_of_range else 0), size=(h, w))
        pred[np.isin(pred, absent_both)] = only_pred[0]
        # Make matches common so IoUs are not all near zero.
        agree = (rng.random((h, w)) < 0.5) & (gt != 255)
        pred[agree] = gt[agree]
        pairs.append((torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt)))
    return pairs


def mmseg_reference(pairs, num_classes: int) -> tuple[dict, dict]:
    """(compute_metrics output, per-class float32 arrays) from mmseg's own IoUMetric."""
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [f"c{i}" for i in range(num_classes)]}
    samples = [{"pred_sem_seg": {"data": p[None]}, "gt_sem_seg": {"data": g[None]}} for p, g in pairs]
    metric.process({}, samples)
    per_class_results = list(metric.results)
    summary = metric.compute_metrics(metric.results)
    inter, union, pred, label = (sum(r) for r in zip(*per_class_results))
    per_class = IoUMetric.total_area_to_metrics(inter, union, pred, label, ["mIoU"])
    return summary, per_class


def numpy1_summary(value: np.floating) -> float:
    """mmseg's summary (compute_metrics) as run under NumPy 1: float64 before x 100."""
    return float(np.round(np.float64(value) * 100, 2))


def assert_summary_matches(ours: float, theirs: float, float32_value: np.floating) -> None:
    """Equal to installed mmseg, or off by 0.01 *because* NumPy 2 keeps x 100 in float32.

    Under NumPy 2 mmseg's value is itself a float32, so equality is checked in float32.
    """
    assert ours == numpy1_summary(float32_value)
    if np.float32(ours) != np.float32(theirs):
        assert abs(ours - theirs) == pytest.approx(0.01, abs=1e-5)
        assert np.float32(theirs) == np.round(np.float32(float32_value) * np.float32(100), 2)


def assert_per_class_matches(ours: list[float], theirs_f32: np.ndarray) -> None:
    expected = np.round(theirs_f32.astype(np.float32) * np.float32(100), 2)
    got = np.asarray(ours, dtype=np.float32)
    np.testing.assert_array_equal(got, expected)  # NaN == NaN for assert_array_equal


CASES = [(3, 4, False, False), (5, 6, True, False), (21, 5, False, True),
         (20, 4, True, True), (59, 3, True, False), (150, 3, True, True)]


@needs_mmseg
@pytest.mark.parametrize("num_classes,num_images,reduce,out_of_range", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_parity_with_mmseg(num_classes, num_images, reduce, out_of_range, seed):
    rng = np.random.default_rng(1000 * seed + num_classes)
    pairs = random_case(rng, num_classes, num_images, reduce, out_of_range)
    counts = IoUCounts(num_classes, device="cpu")
    for p, g in pairs:
        counts.update(p, g)
    ours = counts.compute()
    theirs, per_class = mmseg_reference(pairs, num_classes)

    assert_summary_matches(ours.miou, float(theirs["mIoU"]), np.nanmean(per_class["IoU"]))
    assert_summary_matches(ours.macc, float(theirs["mAcc"]), np.nanmean(per_class["Acc"]))
    assert_summary_matches(ours.aacc, float(theirs["aAcc"]), np.nanmean(per_class["aAcc"]))
    assert_per_class_matches(ours.iou, per_class["IoU"])
    assert_per_class_matches(ours.acc, per_class["Acc"])
    assert any(math.isnan(v) for v in ours.iou)          # classes absent from pred and GT
    assert 0.0 in ours.iou                                # a class predicted but never in GT


@needs_mmseg
def test_numpy2_last_digit_case():
    """A known value where installed mmseg (NumPy 2, float32 x 100) prints 0.01 more (NEP 50)."""
    # Class 0: I = 886, U = 1003 (117 GT-0 pixels predicted out of range); class 1 absent.
    gt = torch.zeros(1, 1003, dtype=torch.uint8)
    pred = torch.zeros(1, 1003, dtype=torch.int64)
    pred[0, 886:] = 2
    ours = filled([(pred, gt)], 2).compute()
    theirs, per_class = mmseg_reference([(pred, gt)], 2)
    assert ours.miou == 88.33                      # NumPy 1 arithmetic, as the papers ran it
    if int(np.__version__.split(".")[0]) >= 2:
        assert np.float32(theirs["mIoU"]) == np.float32(88.34)
    assert_summary_matches(ours.miou, float(theirs["mIoU"]), np.nanmean(per_class["IoU"]))


def same_summary(a: MetricSummary, b: MetricSummary) -> bool:
    """Dataclass equality with NaN == NaN in the per-class lists."""
    return (a.miou, a.aacc, a.macc) == (b.miou, b.aacc, b.macc) and all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in ((a.iou, b.iou), (a.acc, b.acc)))


@needs_mmseg
def test_mmseg_float32_mode_matches_mmseg_above_2_24():
    """With per-class totals past 2^24, float32 accumulation reproduces mmseg bit-for-bit."""
    rng = np.random.default_rng(7)
    n, images = 4, 40
    label = rng.integers(1_000_000, 3_000_000, size=(images, n))
    inter = (label * rng.uniform(0.3, 0.9, size=(images, n))).astype(np.int64)
    pred = inter + rng.integers(0, 500_000, size=(images, n))
    per_image = torch.from_numpy(np.stack([inter, pred + label - inter, pred, label], axis=1))

    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [f"c{i}" for i in range(n)]}
    results = [tuple(row.to(torch.float32)) for row in per_image]
    theirs = metric.compute_metrics(results)
    totals = [sum(r) for r in zip(*results)]
    ref = IoUMetric.total_area_to_metrics(*totals, ["mIoU"])

    f32 = mmseg_float32_totals(per_image)
    exact = per_image.sum(0)
    assert not torch.equal(f32["label"].to(torch.int64), exact[3])   # float32 really is inexact here
    for name, total in zip(("intersect", "union", "pred", "label"), totals):
        assert torch.equal(f32[name], total)
    ours = summarize(f32["intersect"], f32["union"], f32["label"])
    assert_summary_matches(ours.miou, float(theirs["mIoU"]), np.nanmean(ref["IoU"]))
    assert_summary_matches(ours.aacc, float(theirs["aAcc"]), np.nanmean(ref["aAcc"]))
    assert_per_class_matches(ours.iou, ref["IoU"])


def numpy_counts(pairs, n: int, ignore: int = 255) -> np.ndarray:
    """Independent per-class definition: int64 [4, N] totals."""
    out = np.zeros((4, n), dtype=np.int64)
    for p, g in pairs:
        p, g = p.numpy().astype(np.int64), g.numpy().astype(np.int64)
        valid = g != ignore
        for c in range(n):
            i = np.sum(valid & (p == c) & (g == c))
            pc, lc = np.sum(valid & (p == c)), np.sum(valid & (g == c))
            out[:, c] += [i, pc + lc - i, pc, lc]
    return out


@pytest.mark.parametrize("seed", range(3))
def test_counts_equal_numpy_definition(seed):
    rng = np.random.default_rng(seed)
    n = 7
    pairs = random_case(rng, n, 5, reduce=bool(seed % 2), out_of_range=True)
    counts = IoUCounts(n)
    for p, g in pairs:
        counts.update(p.to(torch.int32), g)   # any integer dtype is accepted
    expected = numpy_counts(pairs, n)
    got = torch.stack([counts.totals[k] for k in ("intersect", "union", "pred", "label")])
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)


def test_out_of_range_dropped_per_histogram():
    n = 3
    pred = torch.tensor([[0, 1, 5, 2]])
    gt = torch.tensor([[4, 1, 0, 255]], dtype=torch.uint8)
    counts = IoUCounts(n)
    counts.update(pred, gt)
    t = counts.totals
    assert t["pred"].tolist() == [1, 1, 0]       # GT 4 still counts its prediction 0
    assert t["label"].tolist() == [1, 1, 0]      # prediction 5 still counts its GT 0
    assert t["intersect"].tolist() == [0, 1, 0]
    assert t["union"].tolist() == [2, 1, 0]      # ignored pixel (pred 2) never counts


def filled(pairs, n: int, **kw) -> IoUCounts:
    counts = IoUCounts(n, **kw)
    for p, g in pairs:
        counts.update(p, g)
    return counts


def test_merge_equals_one_pass_and_state_round_trip():
    n = 9
    pairs = random_case(np.random.default_rng(3), n, 6, reduce=True, out_of_range=True)
    whole = filled(pairs, n)
    first, second = filled(pairs[:2], n), filled(pairs[2:], n)
    first.merge(second)
    assert first.num_images == whole.num_images == 6
    assert torch.equal(first.confusion, whole.confusion)
    assert torch.equal(first.per_image, whole.per_image)
    assert same_summary(first.compute(), whole.compute())

    restored = IoUCounts(n)
    restored.load_state_dict(whole.state_dict())
    assert torch.equal(restored.confusion, whole.confusion)
    assert torch.equal(restored.per_image, whole.per_image)
    assert same_summary(restored.compute(), whole.compute())
    restored.update(*pairs[0])          # resuming keeps counting
    assert restored.num_images == 7


def test_per_image_shape_and_sum():
    n = 6
    pairs = random_case(np.random.default_rng(4), n, 5, reduce=False, out_of_range=True)
    counts = filled(pairs, n)
    per_image = counts.per_image
    assert per_image.shape == (5, 4, n) and per_image.dtype == torch.int64
    assert per_image.device.type == "cpu"
    totals = torch.stack([counts.totals[k] for k in ("intersect", "union", "pred", "label")])
    assert torch.equal(per_image.sum(0), totals)
    counts.update(*pairs[0])               # appending after a consolidated read
    assert counts.per_image.shape == (6, 4, n)
    assert filled([], n).per_image.shape == (0, 4, n)


def test_float32_mode_equals_int64_on_small_data():
    pairs = random_case(np.random.default_rng(5), 8, 4, reduce=True, out_of_range=False)
    counts = filled(pairs, 8)
    assert same_summary(counts.compute(mmseg_float32=True), counts.compute())


def test_summary_type_and_nan():
    counts = IoUCounts(3)
    counts.update(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.uint8))
    s = counts.compute()
    assert isinstance(s, MetricSummary)
    assert s.miou == 100.0 and s.aacc == 100.0 and s.macc == 100.0
    assert s.iou[0] == 100.0 and math.isnan(s.iou[1]) and math.isnan(s.acc[2])


def test_misuse_raises_with_a_traceback_and_bad_states_a_data_error():
    counts = IoUCounts(3, keep_per_image=False)
    with pytest.raises((TypeError, ValueError)):
        counts.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises((TypeError, ValueError)):
        counts.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises((TypeError, ValueError)):
        counts.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(DataError):
        counts.compute()
    with pytest.raises((TypeError, ValueError)):
        counts.per_image
    with pytest.raises((TypeError, ValueError)):
        IoUCounts(0)
    with pytest.raises(DataError):
        IoUCounts(4).load_state_dict(counts.state_dict())
    with pytest.raises((TypeError, ValueError)):
        IoUCounts(3).merge(counts)
