"""ThresholdCurveCounts: one mmseg confusion per background threshold, against a plain numpy oracle."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_bench.datasets.cams import Cams, pseudo_masks
from ovseg_bench.engine.metrics.curve import CurveSummary, ThresholdCurveCounts, threshold_grid, threshold_label
from ovseg_bench.engine.metrics import COUNTS_KINDS, counts_from_state, summarize
from ovseg_bench.errors import ConfigError, DataError

N = 6
GRID = threshold_grid(30, 40, scale=100)   # 0.30 .. 0.40
FIXED = 0.35


def _oracle_counts(pred: np.ndarray, gt: np.ndarray, n: int, ignore: int = 255) -> np.ndarray:
    """int64 [4, N] (intersect, union, pred, label) the plain way: drop ignored GT pixels, then
    histogram each quantity over [0, N-1] separately (mmseg's IoUMetric.intersect_and_union)."""
    keep = gt != ignore
    p, g = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    inter = np.bincount(g[(p == g) & (g >= 0) & (g < n)], minlength=n)[:n]
    pred_h = np.bincount(p[(p >= 0) & (p < n)], minlength=n)[:n]
    label_h = np.bincount(g[(g >= 0) & (g < n)], minlength=n)[:n]
    return np.stack([inter, pred_h + label_h - inter, pred_h, label_h])


def _images(seed: int, count: int, t: int = len(GRID)) -> list[tuple[np.ndarray, np.ndarray]]:
    """(label maps [T, H, W], GT [H, W]) with ignored pixels and out-of-range values in both."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = rng.integers(3, 9, size=2)
        gt = rng.choice(np.array([0, 1, 2, 3, 4, 5, 9, 255]), size=(h, w)).astype(np.uint8)
        maps = rng.choice(np.array([0, 1, 2, 3, 4, 5, 7]), size=(t, h, w)).astype(np.uint8)
        out.append((maps, gt))
    return out


def _counted(images, **kw) -> ThresholdCurveCounts:
    counts = ThresholdCurveCounts(N, GRID, FIXED, **kw)
    for maps, gt in images:
        counts.update(torch.from_numpy(maps), torch.from_numpy(gt))
    return counts


def test_counts_match_a_per_threshold_numpy_oracle() -> None:
    images = _images(0, 5)
    counts = _counted(images)
    assert counts.num_items == 5 and counts.additive().shape == (len(GRID), N + 1, N + 1)
    assert counts.additive().dtype == torch.int64
    summary = counts.compute()
    for k, (threshold, result) in enumerate(summary.curve):
        totals = sum(_oracle_counts(maps[k], gt, N) for maps, gt in images)
        expected = summarize(*(torch.from_numpy(totals[i]) for i in (0, 1, 3)))
        assert threshold == GRID[k] and result == expected
    fixed_at = GRID.index(FIXED)
    rows = np.stack([_oracle_counts(maps[fixed_at], gt, N) for maps, gt in images])
    np.testing.assert_array_equal(counts.per_item.numpy(), rows)
    assert summary.fixed == summary.curve[fixed_at] and summary.best_chosen_on_evaluated_split


def test_pseudo_masks_feed_the_counts() -> None:
    rng = np.random.default_rng(5)
    maps = np.round(rng.random((2, 6, 8), dtype=np.float32), 3)
    cams = Cams((2, 4), maps, "weaktr", "float32")
    gt = rng.choice(np.array([0, 2, 4, 255]), size=(6, 8)).astype(np.uint8)
    counts = ThresholdCurveCounts(N, GRID, FIXED)
    counts.update(torch.from_numpy(pseudo_masks(cams, GRID, gt.shape)), torch.from_numpy(gt))
    for k, t in enumerate(GRID):
        stack = np.concatenate([np.full((1, 6, 8), t, np.float32), maps])
        labels = np.array([0, 2, 4])[np.argmax(stack, axis=0)]
        confusion = counts.additive()[k]
        assert confusion.diagonal()[:N].tolist() == _oracle_counts(labels, gt, N)[0].tolist()


def test_merge_of_shards_equals_one_run_and_rows_stay_in_order() -> None:
    images = _images(1, 6)
    whole = _counted(images)
    first, second = _counted(images[:4]), _counted(images[4:])
    first.merge(second)
    assert first.num_items == 6 and torch.equal(first.additive(), whole.additive())
    assert torch.equal(first.per_item, whole.per_item) and first.rows_agree()
    assert first.compute() == whole.compute()


def test_merge_refuses_other_grids_and_kinds() -> None:
    counts = ThresholdCurveCounts(N, GRID, FIXED)
    with pytest.raises((TypeError, ValueError), match="cannot combine"):
        counts.merge(ThresholdCurveCounts(N, GRID, 0.36))
    with pytest.raises((TypeError, ValueError), match="cannot combine"):
        counts.merge(ThresholdCurveCounts(N, GRID[:-1], FIXED))
    with pytest.raises((TypeError, ValueError), match="ThresholdCurveCounts"):
        counts.merge(object())


def test_state_dict_round_trip_through_torch_save() -> None:
    counts = _counted(_images(2, 4))
    state = counts.state_dict()
    assert {"kind", "num_items", "additive", "per_item", "thresholds", "fixed"} <= set(state)
    assert state["kind"] == "threshold-curve-iou" and COUNTS_KINDS[state["kind"]] is ThresholdCurveCounts
    assert state["threshold_labels"][:2] == ["0.30", "0.31"] and state["fixed"] == FIXED
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    again = counts_from_state(loaded)
    assert isinstance(again, ThresholdCurveCounts) and again.thresholds == GRID
    assert torch.equal(again.additive(), counts.additive()) and torch.equal(again.per_item, counts.per_item)
    assert again.compute() == counts.compute() and again.num_items == 4


@pytest.mark.parametrize("change,fragment", [
    ({"kind": "mmseg-iou"}, "kind"),
    ({"fixed": 0.355}, "fixed threshold"),
    ({"thresholds": [0.4, 0.3]}, "increasing"),
    ({"additive": torch.zeros((2, N + 1, N + 1), dtype=torch.int64)}, "additive"),
    ({"per_item": torch.zeros((4, 4, N), dtype=torch.float32)}, "per_item"),
    ({"num_items": 3}, "per_item"),
    ({"num_classes": None}, "ThresholdCurveCounts"),
])
def test_malformed_states_are_refused(change: dict, fragment: str) -> None:
    state = {**_counted(_images(3, 4)).state_dict(), **change}
    with pytest.raises(DataError, match=fragment):
        ThresholdCurveCounts.from_state(state)


def test_a_missing_key_is_refused() -> None:
    state = _counted(_images(3, 2)).state_dict()
    del state["per_item"]
    with pytest.raises(DataError, match="per_item"):
        ThresholdCurveCounts.from_state(state)


def test_rows_agree_sees_a_tampered_total() -> None:
    counts = _counted(_images(4, 3))
    assert counts.rows_agree()
    counts.additive()[GRID.index(FIXED), 0, 0] += 1
    assert not counts.rows_agree()
    other = _counted(_images(4, 3))
    other.additive()[0, 0, 0] += 1          # a non-fixed threshold is not covered by the rows
    assert other.rows_agree()


def _one_class_counts(hits: list[int]) -> ThresholdCurveCounts:
    """Counts where threshold k predicts ``hits[k]`` of four class-1 pixels right (N = 2)."""
    grid = threshold_grid(40, 39 + len(hits))
    counts = ThresholdCurveCounts(2, grid, grid[0])
    gt = torch.ones((1, 4), dtype=torch.uint8)
    maps = torch.zeros((len(hits), 1, 4), dtype=torch.uint8)
    for k, h in enumerate(hits):
        maps[k, 0, :h] = 1
    counts.update(maps, gt)
    return counts


def test_best_threshold_is_the_highest_miou_with_ties_to_the_lowest() -> None:
    summary = _one_class_counts([1, 3, 2, 3]).compute()
    assert isinstance(summary, CurveSummary)
    assert summary.best[0] == 0.41 and summary.best == summary.curve[1]
    assert summary.curve[3][1].miou == summary.best[1].miou      # 0.43 ties 0.41: the lower one wins
    assert summary.fixed[0] == 0.40 and summary.best_chosen_on_evaluated_split is True
    assert _one_class_counts([2, 2, 2]).compute().best[0] == 0.40


def test_grid_and_fixed_are_compared_exactly() -> None:
    grid = threshold_grid(30, 60)
    assert len(grid) == 31 and 0.43 in grid and grid[13] == 0.43
    assert threshold_label(0.3) == "0.30" and threshold_label(0.425) == "0.425" and threshold_label(1) == "1.00"
    ThresholdCurveCounts(21, grid, 0.43)
    multiplied = [0.1 * k for k in range(3, 7)]               # 0.1 * 3 is 0.30000000000000004, not 0.3
    with pytest.raises(ConfigError, match="not one of the grid"):
        ThresholdCurveCounts(21, multiplied, 0.3)
    with pytest.raises(ConfigError, match="increasing"):
        ThresholdCurveCounts(21, [0.3, 0.3], 0.3)
    with pytest.raises(ConfigError, match="labels collide"):
        ThresholdCurveCounts(21, [0.3, 0.3 + 1e-9], 0.3)
    with pytest.raises(ConfigError):
        threshold_grid(60, 30)


@pytest.mark.parametrize("maps,gt,fragment", [
    (torch.zeros((3, 4, 4), dtype=torch.uint8), torch.zeros((4, 4), dtype=torch.uint8), "T=11"),
    (torch.zeros((11, 4, 4)), torch.zeros((4, 4), dtype=torch.uint8), "integer"),
    (torch.zeros((11, 4, 4), dtype=torch.uint8), torch.zeros((4, 5), dtype=torch.uint8), "differ in size"),
    (np.zeros((11, 4, 4), np.uint8), torch.zeros((4, 4), dtype=torch.uint8), "tensor"),
])
def test_update_checks_its_inputs(maps, gt, fragment: str) -> None:
    with pytest.raises((TypeError, ValueError), match=fragment):
        ThresholdCurveCounts(N, GRID, FIXED).update(maps, gt)


def test_nothing_counted_cannot_be_summarised() -> None:
    counts = ThresholdCurveCounts(N, GRID, FIXED)
    assert counts.per_item.shape == (0, 4, N) and counts.rows_agree()
    with pytest.raises(DataError, match="no image"):
        counts.compute()


def test_an_image_without_scored_pixels_gives_nan_and_never_wins() -> None:
    counts = ThresholdCurveCounts(2, (0.4, 0.5), 0.4)
    counts.update(torch.zeros((2, 2, 2), dtype=torch.uint8), torch.full((2, 2), 255, dtype=torch.uint8))
    summary = counts.compute()
    assert math.isnan(summary.curve[0][1].miou) and summary.best[0] == 0.4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counts_on_cuda_equal_the_cpu() -> None:
    images = _images(6, 4)
    cpu = _counted(images)
    gpu = _counted([(m, g) for m, g in images], device="cuda")
    assert gpu.additive().device.type == "cuda" and gpu.per_item.device.type == "cpu"
    assert torch.equal(gpu.additive().cpu(), cpu.additive()) and gpu.compute() == cpu.compute()


def test_module_path_is_importable_from_the_engine(tmp_path: Path) -> None:
    # The class is found by its kind from a saved state (engine.metrics.counts_from_state).
    assert counts_from_state(_counted(_images(7, 1)).state_dict()).kind == ThresholdCurveCounts.kind


def test_weaktrs_scan_stops_at_the_first_threshold_that_is_not_strictly_better() -> None:
    from ovseg_bench.engine.metrics.curve import weaktr_scan

    class S:
        def __init__(self, miou):
            self.miou = miou

    # 0.40: 50, 0.41: 52, 0.42: 52 (a tie stops the scan), 0.43: 60 (the grid's best, never reached)
    curve = [(0.40, S(50.0)), (0.41, S(52.0)), (0.42, S(52.0)), (0.43, S(60.0))]
    assert weaktr_scan(curve)[0] == 0.41
    assert weaktr_scan([(0.40, S(55.0)), (0.41, S(54.0))])[0] == 0.40
