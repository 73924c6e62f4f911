"""MMSegmentation ``IoUMetric`` semantics with exact int64 counts.

Counting follows ``mmseg.evaluation.metrics.IoUMetric.intersect_and_union`` (mmseg 1.2.2,
open-mmlab/mmsegmentation@v1.2.2:mmseg/evaluation/metrics/iou_metric.py):

* pixels whose GT equals ``ignore_index`` are removed first (predictions there never count);
* three histograms over the remaining pixels: intersect (``pred == gt``), pred and label;
* a value outside ``[0, N-1]`` is dropped **per histogram**: a pixel with GT >= N still counts
  its prediction in the pred histogram (and so in the union), and vice versa;
* union = pred + label - intersect.

mmseg counts with ``torch.histc`` on float32 and sums float32 per-image vectors; we count with
``torch.bincount`` in int64, so totals are exact at any dataset size. The summary arithmetic
(float32 ratios, ``np.nanmean``, float64 x 100, ``np.round`` half-to-even) is mmseg's as it ran
under NumPy 1. :func:`mmseg_float32_totals` reproduces mmseg's float32 accumulation for the rare
case where its last printed digit must be matched (float32 totals stop being exact integers
above 2^24 pixels per class).

The state is a ``(N+1) x (N+1)`` int64 confusion matrix on the device (rows GT, columns
prediction, index N = "outside [0, N-1]"), from which all four histograms follow.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ...errors import DataError
from .base import register_counts

COUNT_NAMES = ("intersect", "union", "pred", "label")


@dataclasses.dataclass(frozen=True)
class MetricSummary:
    """Dataset-level result in percent, rounded to 2 decimals exactly as mmseg reports it.

    ``miou``/``macc``/``aacc``: ``np.round(float64(nanmean(float32 values)) * 100, 2)``.
    ``iou``/``acc``: per class, the value of mmseg's per-class table (float32 x 100 rounded in
    float32), as the shortest decimal that round-trips that float32; ``nan`` where the class has
    no union (IoU) or no GT pixel (Acc).
    """

    miou: float
    aacc: float
    macc: float
    iou: list[float]
    acc: list[float]


def _percent_summary(value: np.floating) -> float:
    """mmseg's summary rounding as run under NumPy 1: float64(value) * 100, half-to-even."""
    # NumPy 2 keeps np.float32 * 100 in float32 (NEP 50); NumPy 1 promoted to float64. The
    # published numbers were made under NumPy 1, so the cast is explicit (mmseg's compute_metrics
    # rounds np.nanmean(iou) * 100 with np.round(., 2)).
    return float(np.round(np.float64(value) * 100, 2))


def _percent_per_class(values: np.ndarray) -> list[float]:
    """mmseg's per-class table: float32 array x 100 and np.round, both in float32."""
    rounded = np.round(values.astype(np.float32) * np.float32(100), 2)
    # str() of a float32 is its shortest round-trip decimal, i.e. what mmseg's table prints.
    return [float(str(v)) for v in rounded]


def _nanmean(values: np.ndarray) -> np.floating:
    """np.nanmean without the all-NaN RuntimeWarning (the result is then NaN, as in mmseg)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values)


def summarize(intersect: Tensor, union: Tensor, label: Tensor) -> MetricSummary:
    """Turn dataset totals into a :class:`MetricSummary`.

    Args:
        intersect, union, label: [N] totals, int64 (exact counts) or float32 (mmseg's float32
            accumulation, see :func:`mmseg_float32_totals`); any device.

    IoU_c = I_c / U_c and Acc_c = I_c / L_c in float32 (NaN for 0/0); aAcc = sum(I) / sum(L)
    with the sums taken in the totals' own dtype, then divided in float32.
    """
    inter, uni, lab = (t.detach().cpu() for t in (intersect, union, label))
    iou = (inter.to(torch.float32) / uni.to(torch.float32)).numpy()
    acc = (inter.to(torch.float32) / lab.to(torch.float32)).numpy()
    # int64 sums are exact; float32 sums go through torch.sum exactly as mmseg's do.
    aacc = (inter.sum().to(torch.float32) / lab.sum().to(torch.float32)).numpy()
    return MetricSummary(
        miou=_percent_summary(_nanmean(iou)),
        aacc=_percent_summary(_nanmean(aacc)),
        macc=_percent_summary(_nanmean(acc)),
        iou=_percent_per_class(iou),
        acc=_percent_per_class(acc),
    )


def mmseg_float32_totals(per_image: Tensor) -> dict[str, Tensor]:
    """mmseg's float32 dataset totals: per-image float32 vectors added one at a time from zero.

    Args:
        per_image: int64 [num_images, 4, N] (intersect, union, pred, label), in dataset order.

    Returns:
        float32 [N] tensors keyed like :data:`COUNT_NAMES`. Above 2^24 pixels per class these
        differ from the exact totals in the last bits (float32 has a 24-bit significand); only
        dataset order reproduces them.
    """
    if per_image.dim() != 3 or per_image.shape[1] != 4:
        raise ValueError(f"per-image counts must have shape [num_images, 4, N], got {tuple(per_image.shape)}")
    acc = torch.zeros(per_image.shape[1:], dtype=torch.float32)
    # Sequential elementwise adds reproduce Python's sum() over mmseg's results list exactly.
    for counts in per_image.to(torch.float32):
        acc = acc + counts
    return dict(zip(COUNT_NAMES, acc.unbind(0)))


def _as_label_map(x: Tensor, name: str) -> Tensor:
    """Validate one [H, W] integer map."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [H, W], got {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer label map, got dtype {x.dtype}")
    return x


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TypeError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _counts_from_confusion(conf: Tensor, num_classes: int) -> Tensor:
    """int64 [4, N] (intersect, union, pred, label) from an (N+1) x (N+1) confusion matrix."""
    n = num_classes
    intersect = conf.diagonal()[:n]
    # Column sums over every row, the out-of-range GT row included: per-histogram dropping.
    pred = conf[:, :n].sum(0)
    label = conf[:n, :].sum(1)
    return torch.stack([intersect, pred + label - intersect, pred, label])


@register_counts
class IoUCounts:
    """Streaming int64 counts for mmseg's ``IoUMetric`` (mIoU, mAcc, aAcc): the semantic track's
    :class:`Counts` (items are images; ``per_image``/``num_images`` name ``per_item``/``num_items``).

    Call :meth:`update` once per image, :meth:`compute` at the end. The running state is a
    (N+1) x (N+1) int64 confusion matrix on ``device`` (rows GT, columns prediction; index N
    collects values outside [0, N-1]). Per-image counts, if kept, live on the CPU.

    Args:
        num_classes: N, the number of classes the predictions index (after reduce_zero_label).
        ignore_index: GT value whose pixels are not scored (mmseg default 255).
        device: where the running confusion matrix lives; put ``pred`` there.
        keep_per_image: keep int64 [4, N] counts per image (for bootstrap statistics and
            :func:`mmseg_float32_totals`).
    """

    kind: ClassVar[str] = "mmseg-iou"

    def __init__(self, num_classes: int, *, ignore_index: int = 255,
                 device: torch.device | str = "cpu", keep_per_image: bool = True) -> None:
        self._n = _check_num_classes(num_classes)
        self._ignore = int(ignore_index)
        self._device = torch.device(device)
        self._keep = bool(keep_per_image)
        side = self._n + 1
        self._confusion = torch.zeros((side, side), dtype=torch.int64, device=self._device)
        self._per_image: list[Tensor] = []   # int64 [4, N] or stacked [k, 4, N] blocks, CPU
        self._num_images = 0

    @property
    def num_classes(self) -> int:
        return self._n

    @property
    def num_images(self) -> int:
        """Number of images counted so far (merged ones included)."""
        return self._num_images

    @property
    def num_items(self) -> int:
        return self._num_images

    @property
    def per_item(self) -> Tensor:
        return self.per_image

    def additive(self) -> Tensor:
        """The (N+1) x (N+1) int64 confusion matrix (a sum over images)."""
        return self._confusion

    def rows_agree(self) -> bool:
        totals = _counts_from_confusion(self._confusion, self._n).cpu()
        return bool(torch.equal(self.per_image.sum(0), totals))

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> "IoUCounts":
        try:
            counts = cls(state["num_classes"], ignore_index=state["ignore_index"], device=device,
                         keep_per_image=state.get("per_item", state.get("per_image")) is not None)
        except (KeyError, TypeError) as exc:
            raise DataError(f"not an IoUCounts state: {exc!r}") from None
        counts.load_state_dict(state)
        return counts

    @property
    def confusion(self) -> Tensor:
        """int64 [N+1, N+1] on the device: rows GT, columns prediction, index N = out of range."""
        return self._confusion

    @property
    def totals(self) -> dict[str, Tensor]:
        """Dataset totals: 'intersect', 'union', 'pred', 'label' -> int64 [N] on the device."""
        return dict(zip(COUNT_NAMES, _counts_from_confusion(self._confusion, self._n).unbind(0)))

    @property
    def per_image(self) -> Tensor:
        """int64 [num_images, 4, N] on the CPU, rows in update/merge order.

        Axis 1 is (intersect, union, pred, label), as ``IoUMetric.intersect_and_union`` returns.
        """
        if not self._keep:
            raise ValueError("per-image counts were not kept (IoUCounts(keep_per_image=False))")
        if len(self._per_image) != 1 or self._per_image[0].dim() != 3:
            # Consolidate once so repeated access does not re-stack everything.
            blocks = [b if b.dim() == 3 else b[None] for b in self._per_image]
            empty = torch.zeros((0, 4, self._n), dtype=torch.int64)
            self._per_image = [torch.cat(blocks) if blocks else empty]
        return self._per_image[0]

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Count one image.

        Args:
            pred: [H, W] integer class indices, ideally already on ``device``.
            gt: [H, W] integer GT, already reduce_zero_label'ed by the loader (mmseg 1.x
                convention), with ``ignore_index`` for unscored pixels.
        """
        pred, gt = _as_label_map(pred, "pred"), _as_label_map(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and GT {tuple(gt.shape)} differ in size")
        conf = self._image_confusion(pred.to(self._device, torch.int64), gt.to(self._device, torch.int64))
        self._confusion += conf
        self._num_images += 1
        if self._keep:
            # One device-to-host copy per image; nothing per image stays on the GPU.
            self._per_image.append(_counts_from_confusion(conf, self._n).cpu())

    def _image_confusion(self, pred: Tensor, gt: Tensor) -> Tensor:
        """(N+1) x (N+1) int64 confusion of one image; ignored pixels are dropped."""
        n, side = self._n, self._n + 1
        gt_bin = torch.where((gt >= 0) & (gt < n), gt, n)
        pred_bin = torch.where((pred >= 0) & (pred < n), pred, n)
        # Ignored pixels go to one extra bin that is cut off, instead of a boolean index that
        # would need a data-dependent size (and a device sync).
        flat = torch.where(gt == self._ignore, side * side, gt_bin * side + pred_bin)
        counts = torch.bincount(flat.reshape(-1), minlength=side * side + 1)
        return counts[: side * side].view(side, side)

    def compute(self, *, mmseg_float32: bool = False) -> MetricSummary:
        """Summary over everything counted.

        Args:
            mmseg_float32: use mmseg's float32 accumulation of per-image vectors in update order
                (needs ``keep_per_image``; matches mmseg's last digit only in dataset order).
                Default: exact int64 totals.
        """
        if self._num_images == 0:
            raise DataError("no image was counted; cannot compute IoU metrics")
        if mmseg_float32:
            totals = mmseg_float32_totals(self.per_image)
        else:
            totals = self.totals
        return summarize(totals["intersect"], totals["union"], totals["label"])

    def _check_compatible(self, num_classes: int, ignore_index: int, what: str) -> None:
        if num_classes != self._n or ignore_index != self._ignore:
            raise DataError(
                f"cannot combine {what} (num_classes={num_classes}, ignore_index={ignore_index}) with "
                f"counts for num_classes={self._n}, ignore_index={self._ignore}")

    def merge(self, other: IoUCounts) -> None:
        """Add another shard's counts; its per-image rows are appended after ours."""
        if not isinstance(other, IoUCounts):
            raise TypeError(f"can only merge IoUCounts, got {type(other).__name__}")
        self._check_compatible(other._n, other._ignore, "merged counts")
        if self._keep and not other._keep:
            raise ValueError("cannot merge counts without per-image rows into counts that keep them")
        self._confusion += other._confusion.to(self._device)
        if self._keep:
            self._per_image.append(other.per_image.clone())
        self._num_images += other._num_images

    def state_dict(self) -> dict:
        """Plain ints and CPU tensors, e.g. for ``torch.save`` when resuming a run."""
        return {
            "kind": self.kind,
            "num_classes": self._n,
            "ignore_index": self._ignore,
            "num_items": self._num_images,
            "additive": self._confusion.cpu().clone(),  # the confusion matrix
            "per_item": self.per_image.clone() if self._keep else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the counts by ``state`` (from :meth:`state_dict` of compatible counts)."""
        try:  # "additive"/"per_item"/"num_items" (the Counts names) win over the older keys
            n, ignore = state["num_classes"], state["ignore_index"]
            num_images = int(state.get("num_items", state.get("num_images")))
            confusion = state.get("additive", state.get("confusion"))
            per_image = state.get("per_item", state.get("per_image"))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not an IoUCounts state: {exc!r}") from exc
        self._check_compatible(n, ignore, "a saved state")
        side = self._n + 1
        if not isinstance(confusion, Tensor) or confusion.shape != (side, side) \
                or confusion.dtype != torch.int64:
            raise DataError(f"saved confusion must be int64 [{side}, {side}]")
        if self._keep:
            expected = (num_images, 4, self._n)
            if not isinstance(per_image, Tensor) or tuple(per_image.shape) != expected \
                    or per_image.dtype != torch.int64:
                raise DataError(f"saved per-image counts must be int64 {list(expected)}; "
                                "was the state saved with keep_per_image=False?")
            self._per_image = [per_image.cpu().clone()]
        self._confusion = confusion.to(self._device).clone()
        self._num_images = num_images
