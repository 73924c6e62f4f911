"""Counts of the referring track: int64 intersection and union per sample, oIoU / mIoU / P@t.

Definitions, as the references evaluate (GLCF: Seonghoon-Yu/Zero-shot-RIS@75ff6ed85e1c99e4ae01be5d7f15e78e690823c0
:utils.py ``Compute_IoU`` and Our_method_with_free_solo.py ``main``; LAVT:
yz93/LAVT-RIS@1da0af9f21b637c0cae9ea1363d2dd9b40e19628:test.py ``evaluate``/``computeIoU``):

* per sample, I = |pred AND gt| and U = |pred OR gt| over the pixels at the original size;
* a sample with U = 0 (empty prediction and empty GT) has IoU 0, not 1 and not left out: both
  set ``this_iou = 0.0`` when ``U == 0`` and still append it to the mean and add its I, U;
* oIoU = 100 * sum(I) / sum(U); mIoU = 100 * mean over samples of I / U;
* precision@t = 100 * (number of samples with IoU >= t) / (number of samples) for t in
  0.5, 0.6, 0.7, 0.8, 0.9 (LAVT's ``seg_correct += (this_iou >= eval_seg_iou)``; GLCF reports
  no precision).

Samples a reference skips (GLCF: an image with no proposal) are simply never ``update``-d.

Arithmetic. I and U are int64, so the counts are exact at any size. The summary (default) is
LAVT's: float64 ``I / U`` per sample, ``np.mean`` over them, ``sum(I) * 100.0 / sum(U)`` and
``correct * 100.0 / n`` in float64, the same operations in the same order, so the values are
LAVT's bit for bit. GLCF computes in float32 (torch: ``I * 1.0 / U`` per sample,
``torch.mean`` of those, ``cum_I * 100.0 / cum_U``); ``glcf_float32=True`` runs exactly those
torch operations on the CPU, for matching GLCF's printed digits (its last digit can differ from
the float64 value; torch's float32 reduction order may vary between versions and devices).
Values are kept at full precision; printing them with ``f"{value:.2f}"`` is how both
references display them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ...errors import DataError
from .base import register_counts

PRECISION_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)  # LAVT test.py eval_seg_iou_list


@dataclasses.dataclass(frozen=True)
class ReferringSummary:
    """Dataset-level referring metrics in percent, full precision (see the module docstring).

    ``precision[k]`` is the percentage of samples with IoU >= ``thresholds[k]``.
    """

    oiou: float
    miou: float
    precision: tuple[float, ...]
    num_samples: int
    thresholds: tuple[float, ...] = PRECISION_THRESHOLDS

    def as_dict(self) -> dict[str, float | int]:
        """Flat mapping for result files and tables: oIoU, mIoU, P@0.5 ... P@0.9, num_samples."""
        out: dict[str, float | int] = {"oIoU": self.oiou, "mIoU": self.miou}
        out.update({f"P@{t:g}": p for t, p in zip(self.thresholds, self.precision)})
        out["num_samples"] = self.num_samples
        return out


def _check_rows(rows: Any, what: str) -> np.ndarray:
    """int64 [n, 2] (I, U) rows with 0 <= I <= U; DataError otherwise."""
    array = np.asarray(rows)
    if array.ndim != 2 or array.shape[1] != 2 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{what} must be integer (I, U) rows of shape [n, 2], got {array.dtype} {list(array.shape)}")
    array = array.astype(np.int64, copy=False)
    if array.size and ((array[:, 0] < 0).any() or (array[:, 0] > array[:, 1]).any()):
        raise DataError(f"{what}: every row needs 0 <= I <= U")
    return array


def _glcf_float32(rows: np.ndarray) -> tuple[float, float]:
    """(oIoU, mIoU) with GLCF's torch float32 operations (Compute_IoU and main's summary)."""
    inter, union = torch.from_numpy(rows[:, 0].copy()), torch.from_numpy(rows[:, 1].copy())
    # int64 * 1.0 promotes to float32 (torch's default dtype), then / int64 stays float32.
    iou = torch.where(union == 0, torch.zeros((), dtype=torch.float32), (inter * 1.0) / union)
    miou = torch.mean(iou) * 100.0
    oiou = (inter.sum() * 100.0) / union.sum()
    return float(oiou), float(miou)


def summary_of_rows(rows: np.ndarray, *, glcf_float32: bool = False) -> ReferringSummary:
    """The summary of per-sample (I, U) rows (e.g. resampled ones, for the bootstrap).

    Args:
        rows: integer [n, 2] (I, U) per sample, n >= 1.
        glcf_float32: oIoU and mIoU in GLCF's float32 arithmetic instead of LAVT's float64.
            Precision is always LAVT's (GLCF has none).

    oIoU is NaN when every union is 0 (the references would divide 0 by 0).
    """
    rows = _check_rows(rows, "referring counts")
    if rows.shape[0] == 0:
        raise DataError("no referring sample was counted; cannot compute oIoU / mIoU")
    inter, union = rows[:, 0], rows[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        # LAVT: this_iou = I * 1.0 / U in float64, 0.0 where U == 0.
        iou = np.where(union == 0, 0.0, inter.astype(np.float64) / union.astype(np.float64))
        oiou = float(np.float64(inter.sum()) * 100.0 / np.float64(union.sum()))
    miou = float(np.mean(iou) * 100.0)
    if glcf_float32:
        oiou, miou = _glcf_float32(rows)
    precision = tuple(float(np.count_nonzero(iou >= t) * 100.0 / rows.shape[0]) for t in PRECISION_THRESHOLDS)
    return ReferringSummary(oiou=oiou, miou=miou, precision=precision, num_samples=int(rows.shape[0]))


def _as_binary(x: Tensor, name: str) -> Tensor:
    """[H, W] bool, or integer 0/1 (checked later, on the device), as a bool-able tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [H, W], got {tuple(x.shape)}")
    if x.dtype != torch.bool and (x.dtype.is_floating_point or x.dtype.is_complex):
        raise TypeError(f"{name} must be a bool or 0/1 integer mask, got dtype {x.dtype}")
    return x


ARITHMETICS = ("float64", "float32")


@register_counts
class ReferringCounts:
    """Per-sample int64 (I, U) of the referring track: the track's ``Counts``.

    State: ``additive()`` = int64 [2] (sum I, sum U) on ``device``, which torchrun all_reduces;
    ``per_item`` = int64 [n, 2] (I, U) rows on the CPU in update/merge order, which mIoU and
    precision need and the bootstrap resamples.
    """

    kind: ClassVar[str] = "referring-iou"

    def __init__(self, *, device: torch.device | str = "cpu", arithmetic: str = "float64") -> None:
        if arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic {arithmetic!r} is not one of {ARITHMETICS}")
        self.arithmetic = arithmetic  # how compute() divides: LAVT's float64 or GLCF's float32
        self._device = torch.device(device)
        self._totals = torch.zeros(2, dtype=torch.int64, device=self._device)
        self._rows: list[Tensor] = []   # int64 [2] rows or [k, 2] blocks, CPU
        self._num = 0

    @property
    def num_items(self) -> int:
        """Samples counted so far (merged ones included)."""
        return self._num

    @property
    def per_item(self) -> Tensor:
        """int64 [num_items, 2] (I, U) on the CPU, in update/merge order."""
        if len(self._rows) != 1 or self._rows[0].dim() != 2:
            blocks = [b if b.dim() == 2 else b[None] for b in self._rows]
            self._rows = [torch.cat(blocks) if blocks else torch.zeros((0, 2), dtype=torch.int64)]
        return self._rows[0]

    def additive(self) -> Tensor:
        """int64 [2] (sum I, sum U) on the device: the live state (clone before an in-place all_reduce)."""
        return self._totals

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Count one sample.

        Args:
            pred: [H, W] bool (or integer 0/1) predicted mask, ideally on ``device``.
            gt: [H, W] bool (or integer 0/1) GT mask of the same size.

        Raises DataError for other shapes or dtypes, different sizes, or values other than 0/1.
        """
        pred, gt = _as_binary(pred, "pred"), _as_binary(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and GT {tuple(gt.shape)} differ in size")
        pred, gt = pred.to(self._device), gt.to(self._device)
        bad = _non_binary(pred) + _non_binary(gt)
        p, g = pred.bool(), gt.bool()
        row = torch.stack([(p & g).sum(), (p | g).sum(), bad])
        host = row.cpu()   # one device-to-host copy per sample: the row and the 0/1 check
        if int(host[2]):
            raise ValueError("masks must hold only 0 and 1 (or be bool); found other values")
        self._totals += row[:2]
        self._rows.append(host[:2].clone())
        self._num += 1

    def rows_agree(self) -> bool:
        """Whether ``additive()`` equals the column sums of ``per_item``."""
        return bool(torch.equal(self.per_item.sum(0), self._totals.cpu()))

    def merge(self, other: ReferringCounts) -> None:
        """Add another shard's counts; its rows are appended after ours."""
        if not isinstance(other, ReferringCounts):
            raise TypeError(f"can only merge ReferringCounts, got {type(other).__name__}")
        self._totals += other._totals.to(self._device)
        self._rows.append(other.per_item.clone())
        self._num += other._num

    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors (``torch.load(weights_only=True)`` reads them)."""
        return {"kind": self.kind, "num_items": self._num, "arithmetic": self.arithmetic,
                "additive": self._totals.cpu().clone(), "per_item": self.per_item.clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> ReferringCounts:
        """Counts from :meth:`state_dict` on ``device``; DataError for a malformed state.

        Shapes and dtypes are checked; whether the rows add up to ``additive`` is
        :meth:`rows_agree`'s question (torchrun merging asks it).
        """
        if not isinstance(state, dict) or state.get("kind") != cls.kind:
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"not a {cls.kind} counts state (kind {kind!r})")
        num, additive, rows = state.get("num_items"), state.get("additive"), state.get("per_item")
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise DataError(f"saved referring counts: num_items must be a whole number, got {num!r}")
        if not isinstance(additive, Tensor) or additive.dtype != torch.int64 or tuple(additive.shape) != (2,):
            raise DataError("saved referring counts: 'additive' must be an int64 tensor of shape [2]")
        if not isinstance(rows, Tensor) or rows.dtype != torch.int64 or tuple(rows.shape) != (num, 2):
            raise DataError(f"saved referring counts: 'per_item' must be an int64 tensor of shape [{num}, 2]")
        arithmetic = state.get("arithmetic", "float64")  # states saved before the field: LAVT's
        if arithmetic not in ARITHMETICS:
            raise DataError(f"saved referring counts: arithmetic {arithmetic!r} is not one of {ARITHMETICS}")
        counts = cls(device=device, arithmetic=arithmetic)
        counts._totals = additive.to(counts._device).clone()
        counts._rows = [rows.cpu().clone()]
        counts._num = num
        return counts

    def compute(self, *, glcf_float32: bool | None = None) -> ReferringSummary:
        """oIoU, mIoU and precision over every sample counted (see :func:`summary_of_rows`), in
        the counts' own arithmetic unless ``glcf_float32`` says otherwise."""
        if glcf_float32 is None:
            glcf_float32 = self.arithmetic == "float32"
        return summary_of_rows(self.per_item.numpy(), glcf_float32=glcf_float32)


def _non_binary(x: Tensor) -> Tensor:
    """int64 count of values other than 0 and 1 (0 for bool tensors), kept on the device."""
    if x.dtype == torch.bool:
        return torch.zeros((), dtype=torch.int64, device=x.device)
    return ((x != 0) & (x != 1)).sum()
