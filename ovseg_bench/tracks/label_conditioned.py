"""The label-conditioned track: CAMs and pseudo masks given the image-level labels (WSSS).

Cards: :class:`~ovseg_bench.datasets.label_conditioned.LabelConditionedCard` (VOC train /
train_aug, COCO 2014). Each image comes with its label set, from the GT by default (the card's
first ``labels_from``). Rows of this track never share a table with zero-shot rows: the track
is part of every fingerprint and every leaderboard table key.

Scorers, by adapter base:

- :class:`CamMethod`: the CAMs of the present classes -> a pseudo mask at every background
  threshold of the method's grid (argmax over [threshold, CAMs], WeakTr's rule, see
  :func:`~ovseg_bench.datasets.cams.pseudo_masks`) -> one int64 confusion per threshold. The
  result reports the method's fixed threshold, the best one on the grid (flagged as chosen on
  the evaluated split) and the whole curve.
- :class:`LabelMethod`: pseudo masks a method already has, scored as the semantic track scores
  label maps (its :class:`~.semantic.LabelScorer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets.cams import pseudo_masks
from ..datasets.label_conditioned import LabelConditionedCard, LabelConditionedDataset, LabelledSample, \
    list_label_conditioned
from ..engine.metrics import IoUCounts, ThresholdCurveCounts, threshold_label
from ..engine.metrics.curve import weaktr_scan
from ..engine.runner import EngineOptions, Evaluation, ImageHook, Scorer, autocast_context
from ..errors import DataError
from ..methods.base import CamMethod, LabelMethod
from .base import Track
from .semantic import LabelScorer, dataset_info


def curve_counts(card: LabelConditionedCard, method: CamMethod, device: torch.device) -> ThresholdCurveCounts:
    grid, fixed = method.curve(card.name)
    return ThresholdCurveCounts(card.num_classes, grid, fixed, ignore_index=card.ignore_index, device=device)


class CamScorer(Scorer):
    """CAMs -> pseudo masks along the threshold grid -> one confusion per threshold."""

    new_counts = staticmethod(curve_counts)

    def __init__(self, method: CamMethod, card: LabelConditionedCard, settings: Any, counts: ThresholdCurveCounts,
                 options: EngineOptions, device: torch.device, *, on_item: ImageHook | None = None):
        super().__init__(counts, options, on_item=on_item)
        self.method, self.device, self.info = method, device, dataset_info(card)
        self.grid, self.fixed = method.curve(card.name)
        # --precision for the CAM forward passes (CLIP-ES ran fp16 on CUDA); pseudo masks and counts stay exact.
        self.autocast = autocast_context(device, options.precision)
        self.save_cams = getattr(on_item, "on_cams", None)  # the run's hook takes CAMs under --save-cams

    def push(self, sample: LabelledSample) -> None:
        if sample.error is not None:
            self.handle_error(sample)
            return
        with self.autocast:
            cams = self.method.cams(sample.image, sample.labels, self.info, image_id=sample.image_id,
                                    image_path=sample.image_path)
        if self.save_cams is not None:
            self.save_cams(sample.index, sample.image_id, cams)
        masks = pseudo_masks(cams, self.grid, sample.gt.shape)
        masks = self.method.refine_pseudo_masks(masks, cams, sample.image_path, sample.image)
        masks = torch.from_numpy(np.ascontiguousarray(masks)).to(self.device)
        shown = masks[self.grid.index(self.fixed)]  # pictures show the fixed threshold's mask
        self.score(sample, masks, torch.from_numpy(sample.gt), shown=shown)


def _mask_blocks(card: LabelConditionedCard, counts: IoUCounts) -> dict[str, Any]:
    from ..stats import metrics_block

    return {"metrics": metrics_block(counts.compute(), card.class_names(), per_image=counts.per_item),
            "counts": {key: value.tolist() for key, value in counts.totals.items()}}


def _curve_blocks(card: LabelConditionedCard, counts: ThresholdCurveCounts) -> dict[str, Any]:
    """The fixed threshold's metrics (and CI, from its per-image rows) with the best threshold
    and the whole curve beside them; the counts are the fixed threshold's totals."""
    from ..stats import metrics_block

    summary = counts.compute()
    (fixed, fixed_summary), (best, best_summary) = summary.fixed, summary.best
    metrics = metrics_block(fixed_summary, card.class_names(), per_image=counts.per_item)
    metrics["bg_threshold"] = threshold_label(fixed)
    metrics["best"] = {"bg_threshold": threshold_label(best), "mIoU": best_summary.miou,
                       "chosen_on_evaluated_split": summary.best_chosen_on_evaluated_split}
    scan, scan_summary = weaktr_scan(summary.curve)
    metrics["weaktr_scan"] = {"bg_threshold": threshold_label(scan), "mIoU": scan_summary.miou,
                              "rule": "WeakTr's --curve: stops at the first threshold not strictly better"}
    metrics["curve"] = [{"bg_threshold": threshold_label(t), "mIoU": s.miou, "aAcc": s.aacc, "mAcc": s.macc}
                        for t, s in summary.curve]
    rows = counts.per_item.sum(0)
    return {"metrics": metrics, "counts": dict(zip(("intersect", "union", "pred", "label"), rows.tolist()))}


# The result blocks of each kind of counts this track's scorers make.
RESULT_BLOCKS = {IoUCounts: _mask_blocks, ThresholdCurveCounts: _curve_blocks}


class LabelConditionedTrack(Track):
    name = "label-conditioned"
    metric_id = "wsss-pseudo-mask-iou/int64"
    default_protocol = "tcl"
    saves_predictions = True  # the pseudo mask at the fixed threshold, label ids
    console_columns = ("aAcc", "mAcc", "bg_threshold", "best")
    sidecar_layout = "counts[image, (intersect, union, pred, label), class] at the fixed background threshold"
    scorers = {CamMethod: CamScorer, LabelMethod: LabelScorer}  # saved pseudo masks: scored as labels are

    def list_items(self, card: LabelConditionedCard, data_root: Path) -> list[Any]:
        refs = list_label_conditioned(card, data_root)
        if not refs:
            raise DataError(f"{card.name}: {card.root_in(data_root) / card.split_file} lists no images")
        return refs

    def first_missing(self, card: LabelConditionedCard, data_root: Path) -> tuple[str, Path] | None:
        root = card.root_in(data_root)
        pieces = [("data root", Path(data_root)), ("dataset folder", root), ("image folder", root / card.img_dir),
                  ("split file", root / card.split_file)]
        return next(((what, path) for what, path in pieces if not path.exists()), None)

    def reader(self, card: LabelConditionedCard, items: list[Any], settings: Any,
               data_root: Path) -> LabelConditionedDataset:
        return LabelConditionedDataset(card, items, labels_from=settings.labels_from)

    def result_blocks(self, card: LabelConditionedCard, evaluation: Evaluation, settings: Any) -> dict[str, Any]:
        blocks = RESULT_BLOCKS[type(evaluation.counts)](card, evaluation.counts)
        blocks["metrics"]["labels_from"] = settings.labels_from or card.labels_from[0]
        return blocks


LABEL_CONDITIONED = LabelConditionedTrack()
