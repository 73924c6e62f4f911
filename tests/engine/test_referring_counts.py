"""Referring counts: per-sample int64 (I, U), oIoU / mIoU / precision as GLCF and LAVT compute them."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from ovseg_bench.engine.metrics.referring import (PRECISION_THRESHOLDS, ReferringCounts, ReferringSummary,
                                                 summary_of_rows)
from ovseg_bench.errors import DataError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_pairs(seed: int = 0, n: int = 30) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random (pred, gt) bool masks of varying sizes, plus the edge cases:
    U = 0 (both empty), a perfect prediction, and IoUs exactly at 0.5 and 0.7."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        h, w = rng.integers(3, 40, size=2)
        pairs.append((rng.random((h, w)) < rng.random(), rng.random((h, w)) < rng.random()))
    empty = np.zeros((5, 6), dtype=bool)
    pairs.append((empty, empty.copy()))
    gt = np.zeros((4, 5), dtype=bool)
    gt[1:3, 1:4] = True
    pairs.append((gt.copy(), gt))
    half_pred, half_gt = np.zeros((1, 4), bool), np.zeros((1, 4), bool)
    half_pred[0, :1], half_gt[0, :2] = True, True            # I = 1, U = 2
    seven_pred, seven_gt = np.zeros((1, 10), bool), np.zeros((1, 10), bool)
    seven_pred[0, :7], seven_gt[0, :10] = True, True          # I = 7, U = 10
    return pairs + [(half_pred, half_gt), (seven_pred, seven_gt)]


def independent_summary(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Straightforward Python: I, U as ints, IoU = I / U (0 when U = 0), percent summaries."""
    inter = [int(np.logical_and(p, g).sum()) for p, g in pairs]
    union = [int(np.logical_or(p, g).sum()) for p, g in pairs]
    ious = [i / u if u else 0.0 for i, u in zip(inter, union)]
    out = {"oIoU": 100 * sum(inter) / sum(union), "mIoU": 100 * sum(ious) / len(ious)}
    out.update({f"P@{t:g}": 100 * sum(iou >= t for iou in ious) / len(ious) for t in PRECISION_THRESHOLDS})
    return out


def counted(pairs, device: str = "cpu") -> ReferringCounts:
    counts = ReferringCounts(device=device)
    for pred, gt in pairs:
        counts.update(torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device))
    return counts


@pytest.mark.parametrize("device", DEVICES)
def test_summary_matches_an_independent_computation(device: str) -> None:
    pairs = random_pairs()
    summary = counted(pairs, device).compute()
    expected = independent_summary(pairs)
    got = summary.as_dict()
    assert got["num_samples"] == summary.num_samples == len(pairs)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_u_zero_scores_zero_and_thresholds_are_inclusive() -> None:
    rows = np.array([[0, 0], [1, 2], [7, 10], [9, 10]])
    summary = summary_of_rows(rows)
    assert summary.miou == pytest.approx(100 * (0 + 0.5 + 0.7 + 0.9) / 4)
    assert summary.oiou == pytest.approx(100 * 17 / 22)
    # IoU >= t (LAVT): 0.5 counts at 0.5, 0.7 at 0.7.
    assert summary.precision == (75.0, 50.0, 50.0, 25.0, 25.0)
    assert summary.thresholds == PRECISION_THRESHOLDS


def test_all_unions_zero_give_nan_oiou_and_zero_miou() -> None:
    summary = summary_of_rows(np.zeros((3, 2), dtype=np.int64))
    assert math.isnan(summary.oiou) and summary.miou == 0.0


def test_glcf_float32_arithmetic() -> None:
    pairs = random_pairs(seed=3)
    counts = counted(pairs)
    rows = counts.per_item.numpy()
    f32 = counts.compute(glcf_float32=True)
    f64 = counts.compute()
    # oIoU: float32(sum I) * 100 in float32, / float32(sum U), as torch promotes GLCF's tensors.
    expected_oiou = np.float32(np.float32(rows[:, 0].sum()) * np.float32(100.0)) / np.float32(rows[:, 1].sum())
    assert f32.oiou == float(expected_oiou)
    assert f32.miou == pytest.approx(f64.miou, rel=1e-5)
    assert f32.precision == f64.precision   # GLCF has no precision: always LAVT's float64


def test_update_accepts_bool_and_integer_masks_and_checks_them() -> None:
    pred = torch.tensor([[1, 0], [1, 1]], dtype=torch.uint8)
    gt = torch.tensor([[True, True], [False, True]])
    counts = ReferringCounts()
    counts.update(pred, gt)
    counts.update(pred.bool(), gt.to(torch.int64))
    assert counts.per_item.tolist() == [[2, 4], [2, 4]]
    assert counts.additive().tolist() == [4, 8] and counts.additive().dtype == torch.int64
    with pytest.raises((TypeError, ValueError), match="only 0 and 1"):
        counts.update(pred * 2, gt)
    with pytest.raises((TypeError, ValueError), match="differ in size"):
        counts.update(pred, gt[:1])
    with pytest.raises((TypeError, ValueError), match="bool or 0/1"):
        counts.update(pred.float(), gt)
    with pytest.raises((TypeError, ValueError), match=r"\[H, W\]"):
        counts.update(pred[None], gt[None])
    assert counts.num_items == 2   # failed updates count nothing


@pytest.mark.parametrize("device", DEVICES)
def test_merge_equals_one_pass(device: str) -> None:
    pairs = random_pairs(seed=1)
    whole = counted(pairs, device)
    first, second = counted(pairs[:10], device), counted(pairs[10:], device)
    first.merge(second)
    assert first.num_items == whole.num_items
    assert torch.equal(first.per_item, whole.per_item) and torch.equal(first.additive(), whole.additive())
    assert first.additive().device.type == device and first.per_item.device.type == "cpu"
    assert first.rows_agree()
    assert first.compute() == whole.compute()
    with pytest.raises(TypeError):
        first.merge(object())


def test_state_round_trip_through_torch_save() -> None:
    counts = counted(random_pairs(seed=2))
    state = counts.state_dict()
    assert set(state) == {"kind", "num_items", "arithmetic", "additive", "per_item"} and state["kind"] == "referring-iou"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = ReferringCounts.from_state(torch.load(buffer, weights_only=True))
    assert loaded.num_items == counts.num_items
    assert torch.equal(loaded.per_item, counts.per_item) and torch.equal(loaded.additive(), counts.additive())
    assert loaded.rows_agree() and loaded.compute() == counts.compute()


@pytest.mark.parametrize("change", [
    {"kind": "mmseg-iou"}, {"num_items": -1}, {"num_items": 5},
    {"additive": torch.zeros(3, dtype=torch.int64)}, {"additive": torch.zeros(2, dtype=torch.float32)},
    {"per_item": torch.zeros((4, 3), dtype=torch.int64)}, {"per_item": [[1, 2]] * 4},
])
def test_malformed_state_is_a_data_error(change: dict) -> None:
    state = counted(random_pairs(n=2)[:4]).state_dict()
    with pytest.raises(DataError):
        ReferringCounts.from_state({**state, **change})


def test_rows_agree_detects_a_tampered_total() -> None:
    state = counted(random_pairs(n=3)).state_dict()
    state["additive"] = state["additive"] + torch.tensor([1, 0])
    assert not ReferringCounts.from_state(state).rows_agree()


def test_summary_of_resampled_rows_equals_counting_those_samples() -> None:
    pairs = random_pairs(seed=4)
    rows = counted(pairs).per_item.numpy()
    pick = np.random.default_rng(0).integers(0, len(pairs), size=len(pairs))
    assert summary_of_rows(rows[pick]) == counted([pairs[k] for k in pick]).compute()


def test_nothing_counted_or_bad_rows_are_data_errors() -> None:
    with pytest.raises(DataError, match="no referring sample"):
        ReferringCounts().compute()
    with pytest.raises(DataError, match="0 <= I <= U"):
        summary_of_rows(np.array([[3, 2]]))
    with pytest.raises(DataError, match=r"\[n, 2\]"):
        summary_of_rows(np.array([[0.5, 1.0]]))


def test_summary_is_a_frozen_dataclass() -> None:
    summary = summary_of_rows(np.array([[1, 2]]))
    assert isinstance(summary, ReferringSummary)
    with pytest.raises(AttributeError):
        summary.oiou = 0.0  # type: ignore[misc]


def test_the_arithmetic_travels_with_the_counts_and_their_state():
    counts = ReferringCounts(arithmetic="float32")
    counts.update(torch.tensor([[1, 0], [1, 1]]).bool(), torch.tensor([[1, 1], [0, 1]]).bool())
    restored = ReferringCounts.from_state(counts.state_dict())
    assert restored.arithmetic == "float32"
    assert restored.compute().miou == counts.compute(glcf_float32=True).miou
    old = {k: v for k, v in counts.state_dict().items() if k != "arithmetic"}
    assert ReferringCounts.from_state(old).arithmetic == "float64"
    with pytest.raises(ValueError, match="arithmetic"):
        ReferringCounts(arithmetic="float16")
