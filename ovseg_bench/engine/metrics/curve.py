"""Counts of the label-conditioned track: one mmseg confusion matrix per background threshold.

A weakly-supervised method's pseudo masks depend on the background threshold t (the constant
plane before the CAMs); the references report mIoU over a grid of t (WeakTr's evaluation.py
``--curve True --start 40``: t = i / 100 for i = start, start+1, ...). Each image is counted at
every t of the grid, with exactly the semantic track's rule (:class:`~ovseg_bench.engine.metrics.IoUCounts`,
mmseg's ``IoUMetric``: ignored GT pixels dropped first, values outside [0, N-1] dropped per
histogram), so each threshold's summary is an mmseg mIoU. The per-image rows for the bootstrap
and paired compares are kept for one threshold only, the fixed one, so memory stays that of a
semantic run (COCO 2014 train: 82,081 images x 4 x 81 int64).

Differences from WeakTr's scan, on purpose: the whole grid is evaluated (WeakTr stops at the
first t whose mIoU is not strictly higher than the last one's; :func:`weaktr_scan` gives that
threshold too, and results record it as ``weaktr_scan``), and the metric is mmseg's
(WeakTr's ``nanmean`` over classes with a union agrees with it; CLIP-ES's eval_cam.py averages
over classes with GT pixels only). The best threshold is chosen on the split being evaluated,
as both references do, and is flagged so.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...errors import ConfigError, DataError
from .base import register_counts
from .semantic import IoUCounts, MetricSummary, _as_label_map, _check_num_classes, _counts_from_confusion, summarize


def threshold_grid(start: int, stop: int, *, scale: int = 100) -> tuple[float, ...]:
    """``start / scale, ..., stop / scale`` (both ends included), each computed as one division as
    WeakTr's curve does (``t = i / 100.0``), so 0.43 is the float literal 0.43."""
    if stop < start:
        raise ConfigError(f"threshold grid {start}..{stop}: the end is before the start")
    return tuple(i / scale for i in range(start, stop + 1))


def threshold_label(threshold: float) -> str:
    """The grid value as the result files write it: at most 6 decimals, at least 2 ("0.30", "0.425")."""
    text = f"{threshold:.6f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


@dataclasses.dataclass(frozen=True)
class CurveSummary:
    """mmseg summaries along the threshold grid.

    ``curve``: (threshold, summary) for every grid value in order; ``fixed``: the preset's
    threshold; ``best``: the grid value with the highest reported (2-decimal) mIoU, the lowest
    threshold among equal ones. ``best_chosen_on_evaluated_split``: the best threshold was picked
    on the data it is reported on (an optimistic number, as in the references' curves).
    """

    curve: tuple[tuple[float, MetricSummary], ...]
    fixed: tuple[float, MetricSummary]
    best: tuple[float, MetricSummary]
    best_chosen_on_evaluated_split: bool = True


def _checked_grid(thresholds: Sequence[float], fixed: float) -> tuple[tuple[float, ...], int]:
    """The grid as floats and the index of ``fixed`` in it (compared exactly)."""
    grid = tuple(float(t) for t in thresholds)
    if not grid or not all(math.isfinite(t) for t in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ConfigError(f"thresholds must be a non-empty, strictly increasing list of finite numbers, got {list(grid)}")
    if len({threshold_label(t) for t in grid}) != len(grid):
        raise ConfigError(f"thresholds {list(grid)} are closer than 1e-6: their written labels collide")
    if float(fixed) not in grid:
        raise ConfigError(f"the fixed threshold {fixed!r} is not one of the grid's values {list(grid)} (compared "
                          "exactly; build both with threshold_grid, i.e. i / 100)")
    return grid, grid.index(float(fixed))


@register_counts
class ThresholdCurveCounts:
    """Streaming int64 confusion matrices, one per background threshold (a :class:`Counts`).

    State: int64 [T, N+1, N+1] on ``device`` (rows GT, columns prediction, index N = out of
    range), and int64 [4, N] CPU rows per image for the fixed threshold.

    Args:
        num_classes: N, background included.
        thresholds: the grid, strictly increasing; stored as given and compared exactly.
        fixed: the threshold reported as the track's number; must be one of ``thresholds``.
        ignore_index: GT value whose pixels are not scored.
        device: where the confusion matrices live; put the label maps there.
    """

    kind: ClassVar[str] = "threshold-curve-iou"

    def __init__(self, num_classes: int, thresholds: Sequence[float], fixed: float, *,
                 ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self._n = _check_num_classes(num_classes)
        self._grid, self._fixed_at = _checked_grid(thresholds, fixed)
        self._ignore = int(ignore_index)
        self._device = torch.device(device)
        # The semantic counts' per-image rule, used as is (one code path for both tracks).
        self._rule = IoUCounts(self._n, ignore_index=self._ignore, device=self._device, keep_per_image=False)
        side = self._n + 1
        self._confusion = torch.zeros((len(self._grid), side, side), dtype=torch.int64, device=self._device)
        self._rows: list[Tensor] = []   # int64 [4, N] or stacked [k, 4, N] blocks, CPU
        self._num_items = 0

    @property
    def num_classes(self) -> int:
        return self._n

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self._grid

    @property
    def threshold_labels(self) -> tuple[str, ...]:
        return tuple(threshold_label(t) for t in self._grid)

    @property
    def fixed(self) -> float:
        return self._grid[self._fixed_at]

    @property
    def num_items(self) -> int:
        """Images counted so far (merged ones included)."""
        return self._num_items

    def additive(self) -> Tensor:
        """int64 [T, N+1, N+1] on the device, the sum over images (what torchrun all_reduces)."""
        return self._confusion

    @property
    def per_item(self) -> Tensor:
        """int64 [num_items, 4, N] on the CPU for the fixed threshold, rows in update/merge order;
        axis 1 is (intersect, union, pred, label)."""
        if len(self._rows) != 1 or self._rows[0].dim() != 3:
            blocks = [b if b.dim() == 3 else b[None] for b in self._rows]
            self._rows = [torch.cat(blocks) if blocks else torch.zeros((0, 4, self._n), dtype=torch.int64)]
        return self._rows[0]

    def update(self, label_maps: Tensor, gt: Tensor) -> None:
        """Count one image at every threshold.

        Args:
            label_maps: [T, H, W] integer pseudo masks, one per threshold in grid order.
            gt: [H, W] integer GT with ``ignore_index`` for unscored pixels.
        """
        if not isinstance(label_maps, Tensor) or label_maps.dim() != 3 or label_maps.shape[0] != len(self._grid):
            raise ValueError(f"label_maps must be a [T={len(self._grid)}, H, W] tensor, got "
                            f"{tuple(getattr(label_maps, 'shape', ())) or type(label_maps).__name__}")
        gt = _as_label_map(gt, "gt").to(self._device, torch.int64)
        if tuple(label_maps.shape[1:]) != tuple(gt.shape):
            raise ValueError(f"pseudo masks {tuple(label_maps.shape[1:])} and GT {tuple(gt.shape)} differ in size")
        confusions = torch.stack([
            self._rule._image_confusion(_as_label_map(m, "pseudo mask").to(self._device, torch.int64), gt)
            for m in label_maps])
        self._confusion += confusions
        self._num_items += 1
        # One device-to-host copy per image, for the fixed threshold only.
        self._rows.append(_counts_from_confusion(confusions[self._fixed_at], self._n).cpu())

    def rows_agree(self) -> bool:
        """Whether the fixed threshold's totals equal the sum of the per-image rows."""
        totals = _counts_from_confusion(self._confusion[self._fixed_at], self._n).cpu()
        return bool(torch.equal(self.per_item.sum(0), totals))

    def merge(self, other: ThresholdCurveCounts) -> None:
        """Add another shard's counts; its rows are appended after ours."""
        if not isinstance(other, ThresholdCurveCounts):
            raise TypeError(f"can only merge ThresholdCurveCounts, got {type(other).__name__}")
        mine, theirs = self._settings(), other._settings()
        if mine != theirs:
            raise ValueError(f"cannot combine curve counts {theirs} with counts {mine}")
        self._confusion += other._confusion.to(self._device)
        self._rows.append(other.per_item.clone())
        self._num_items += other._num_items

    def _settings(self) -> dict[str, Any]:
        return {"num_classes": self._n, "ignore_index": self._ignore, "thresholds": list(self._grid),
                "fixed": self.fixed}

    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors (``torch.load(weights_only=True)`` reads them back)."""
        return {"kind": self.kind, **self._settings(), "threshold_labels": list(self.threshold_labels),
                "num_items": self._num_items, "additive": self._confusion.cpu().clone(),
                "per_item": self.per_item.clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> ThresholdCurveCounts:
        """Counts from :meth:`state_dict`; DataError when the state is malformed."""
        try:
            if state["kind"] != cls.kind:
                raise DataError(f"saved counts are of kind {state['kind']!r}, not {cls.kind!r}")
            counts = cls(state["num_classes"], state["thresholds"], state["fixed"],
                         ignore_index=state["ignore_index"], device=device)
            num_items, additive, rows = int(state["num_items"]), state["additive"], state["per_item"]
        except (KeyError, TypeError, ValueError, ConfigError, DataError) as exc:
            raise DataError(f"not a ThresholdCurveCounts state: {exc}") from None
        side = counts._n + 1
        expected = {"additive": (additive, (len(counts._grid), side, side)), "per_item": (rows, (num_items, 4, counts._n))}
        for key, (value, shape) in expected.items():
            if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.dtype != torch.int64:
                raise DataError(f"saved curve counts: '{key}' must be int64 {list(shape)}")
        counts._confusion = additive.to(counts._device).clone()
        counts._rows, counts._num_items = [rows.cpu().clone()], num_items
        return counts

    def compute(self) -> CurveSummary:
        """mmseg summaries at every threshold (:func:`~ovseg_bench.engine.metrics.summarize` of the
        exact int64 totals), the fixed threshold's and the best one's."""
        if self._num_items == 0:
            raise DataError("no image was counted; cannot compute IoU metrics")
        curve = []
        for threshold, confusion in zip(self._grid, self._confusion):
            intersect, union, _, label = _counts_from_confusion(confusion, self._n).unbind(0)
            curve.append((threshold, summarize(intersect, union, label)))
        best = _best_of(curve)
        return CurveSummary(tuple(curve), curve[self._fixed_at], best)


def weaktr_scan(curve: Sequence[tuple[float, MetricSummary]]) -> tuple[float, MetricSummary]:
    """WeakTr's own scan (hustvl/WeakTr@3457ad3:evaluation.py, ``--curve``): from the lowest
    threshold up, stop at the first one whose mIoU is not strictly higher than the previous one's
    and report the last improving one. Where the curve has several peaks it can stop before the
    grid's best; the harness reports both."""
    chosen = curve[0]
    for entry in curve[1:]:
        if not entry[1].miou > chosen[1].miou:
            break
        chosen = entry
    return chosen


def _best_of(curve: Sequence[tuple[float, MetricSummary]]) -> tuple[float, MetricSummary]:
    """The entry with the highest reported mIoU; the lowest threshold wins a tie (and NaN never wins)."""
    best = curve[0]
    for entry in curve[1:]:
        if entry[1].miou > best[1].miou or (math.isnan(best[1].miou) and not math.isnan(entry[1].miou)):
            best = entry
    return best

