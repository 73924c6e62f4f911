"""The semantic track: every pixel gets a class; mmseg's IoUMetric (mIoU, aAcc, mAcc).

Reader: :class:`~ovseg_bench.datasets.loader.SplitDataset` (decode, check, resize in workers).
Scorers, by adapter base:

- :class:`WindowMethod`: normalise on the device -> windows of several images batched together
  -> ``forward_windows`` -> count-averaged stitch -> bilinear to the GT size -> ``postprocess``.
  Images are finished in listing order and at most a bounded number are in flight, so memory
  does not grow with the split.
- :class:`LabelMethod`: label maps the method already has (``predictions``), scored as they are.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.cards import DatasetCard
from ..datasets.listing import first_missing, list_samples, split_file_used, split_path
from ..datasets.loader import Sample, SplitDataset
from ..engine.metrics import IoUCounts
from ..engine.protocol import DatasetSettings
from ..engine.runner import EngineOptions, Evaluation, ImageHook, Scorer, autocast_context
from ..engine.sliding import Canvas, Window, image_windows
from ..imaging import model_input
from ..errors import DataError, NumericsError
from ..methods.base import DatasetInfo, ImageLabelMethod, LabelMethod, Method, WindowMethod
from .base import Track


def dataset_info(card: Any) -> DatasetInfo:
    """What an adapter may know of a card with classes (semantic and label-conditioned): the
    classes it predicts, which for a few cards are finer than the scored ones (coco_stuff27
    predicts COCO-Stuff's 171 and scores ReCo's 27)."""
    names = card.prediction_names() if isinstance(card, DatasetCard) else card.class_names()
    return DatasetInfo(card.name, names, card.background_class)


def scored_info(card: Any) -> DatasetInfo:
    """The scored classes, for label maps that are already in them (``predictions``)."""
    return DatasetInfo(card.name, card.class_names(), card.background_class)


def prediction_lut(card: Any, device: torch.device) -> torch.Tensor | None:
    """Predicted class -> scored class, applied after ``postprocess`` (and so after any CRF), or None."""
    table = card.prediction_map() if isinstance(card, DatasetCard) else None
    return None if table is None else torch.as_tensor(table, dtype=torch.long, device=device)


@dataclass
class _InFlight:
    sample: Sample
    image: torch.Tensor           # [3,h,w] normalised model input
    canvas: Canvas


def iou_counts(card: Any, method: Method, device: torch.device) -> IoUCounts:
    return IoUCounts(card.num_classes, ignore_index=card.ignore_index, device=device)


class WindowScorer(Scorer):
    """In-flight images, per-size window queues and the stitch, for a :class:`WindowMethod`."""

    new_counts = staticmethod(iou_counts)

    def __init__(self, method: WindowMethod, card: Any, settings: DatasetSettings, counts: IoUCounts,
                 options: EngineOptions, device: torch.device, *, on_item: ImageHook | None = None,
                 info: DatasetInfo | None = None, classes: list[list[str]] | None = None):
        super().__init__(counts, options, on_item=on_item)
        self.method, self.settings, self.device = method, settings, device
        self.info = info or dataset_info(card)
        self.vocab = method.encode_classes(classes or card.prediction_synonyms(settings.classnames), self.info)
        self.to_scored = prediction_lut(card, device)
        self.autocast = autocast_context(device, options.precision)
        self.inflight: deque[_InFlight] = deque()
        self.queues: dict[tuple[int, int], deque[tuple[_InFlight, Window]]] = {}
        self.max_inflight = 2 * options.batch_size + 2

    def push(self, sample: Sample) -> None:
        if sample.error is not None:
            self.handle_error(sample)
            return
        image = self.method.normalisation.apply(sample.image[None].to(self.device))[0]
        windows = image_windows(*image.shape[-2:], self.settings.mode, self.settings.crop, self.settings.stride)
        state = _InFlight(sample, image, Canvas(windows))
        self.inflight.append(state)
        for window in windows:
            self.queues.setdefault(window.size, deque()).append((state, window))
        self._run_full_batches()
        if len(self.inflight) > self.max_inflight:
            self.flush()
        self._finish_ready()

    def flush(self) -> None:
        """Run every queued window, even in partial batches, and finish all images."""
        for queue in self.queues.values():
            while queue:
                self._run_batch(queue)
        self._finish_ready()

    def _run_full_batches(self) -> None:
        for queue in self.queues.values():
            while len(queue) >= self.options.batch_size:
                self._run_batch(queue)

    def _run_batch(self, queue: deque[tuple[_InFlight, Window]]) -> None:
        items = [queue.popleft() for _ in range(min(self.options.batch_size, len(queue)))]
        batch = torch.stack([s.image[:, w.y1:w.y2, w.x1:w.x2] for s, w in items])
        with self.autocast:
            scores = self.method.forward_windows(batch, self.vocab)
        scores = scores.float()
        low, high = torch.aminmax(scores)  # NaN/inf show in the extremes; 20x cheaper than isfinite().all()
        if not (torch.isfinite(low) and torch.isfinite(high)):
            names = sorted({s.sample.image_id for s, _ in items})
            raise NumericsError(f"method '{self.method.name}' produced NaN/inf scores on image(s) {names}")
        for (state, window), window_scores in zip(items, scores):
            state.canvas.add(window, window_scores, tuple(state.image.shape[-2:]))
        self.num_windows += len(items)

    def _finish_ready(self) -> None:
        while self.inflight and self.inflight[0].canvas.complete:
            state = self.inflight.popleft()
            gt_shape = tuple(state.sample.gt.shape)
            scores = F.interpolate(state.canvas.average()[None], size=gt_shape, mode="bilinear",
                                   align_corners=False)[0]
            labels = self.method.postprocess(scores, state.image, self.vocab, self.info)
            if self.to_scored is not None:
                labels = self.to_scored[labels]
            self.score(state.sample, labels, state.sample.gt)


class LabelScorer(Scorer):
    """Label maps a :class:`LabelMethod` already has, scored as they are."""

    new_counts = staticmethod(iou_counts)

    def __init__(self, method: LabelMethod, card: Any, settings: DatasetSettings, counts: IoUCounts,
                 options: EngineOptions, device: torch.device, *, on_item: ImageHook | None = None):
        super().__init__(counts, options, on_item=on_item)
        self.method, self.device, self.info = method, device, scored_info(card)

    def push(self, sample: Sample) -> None:
        if sample.error is not None:
            self.handle_error(sample)
            return
        labels = self.method.labels_for(sample.image_id, tuple(sample.gt.shape), self.info)
        # The label-conditioned reader gives numpy GT, the semantic one tensors.
        self.score(sample, torch.from_numpy(np.asarray(labels)).to(self.device).long(), torch.as_tensor(sample.gt))


class ImageLabelScorer(Scorer):
    """Whole images labelled by an :class:`ImageLabelMethod`. The protocol's resized input is
    brought to the GT size (bilinear, rounded to uint8), the size its per-image state (e.g.
    proposals) lives at; predicted labels are mapped to the scored ones as for window methods."""

    new_counts = staticmethod(iou_counts)

    def __init__(self, method: ImageLabelMethod, card: Any, settings: DatasetSettings, counts: IoUCounts,
                 options: EngineOptions, device: torch.device, *, on_item: ImageHook | None = None):
        super().__init__(counts, options, on_item=on_item)
        self.method, self.device, self.info = method, device, dataset_info(card)
        self.vocab = method.encode_classes(card.prediction_synonyms(settings.classnames), self.info)
        self.to_scored = prediction_lut(card, device)

    def push(self, sample: Sample) -> None:
        if sample.error is not None:
            self.handle_error(sample)
            return
        pixels = F.interpolate(sample.image[None].float(), size=tuple(sample.gt.shape), mode="bilinear",
                               align_corners=False)[0].round().clamp(0, 255).byte()
        rgb = pixels.permute(1, 2, 0).numpy()
        labels = self.method.label_image(rgb, sample.image_id, self.vocab, self.info).to(self.device)
        if self.to_scored is not None:
            labels = self.to_scored[labels]
        self.score(sample, labels, sample.gt)


class SemanticTrack(Track):
    name = "semantic"
    metric_id = "mmseg-iou/int64"
    default_protocol = "tcl"
    console_columns = ("aAcc", "mAcc")
    label_pictures = True
    saves_predictions = True
    sidecar_layout = "counts[image, (intersect, union, pred, label), class]"
    scorers = {WindowMethod: WindowScorer, LabelMethod: LabelScorer, ImageLabelMethod: ImageLabelScorer}

    def list_items(self, card: DatasetCard, data_root: Path) -> list[Any]:
        samples = list_samples(card, data_root)
        if not samples:
            root = card.root_in(data_root)
            where = (f"split file {split_path(card, data_root)} lists no images" if card.split_file
                     else f"no file ending in '{card.img_suffix}' under {root / card.img_dir}")
            raise DataError(f"{card.name}: {where}; check the layout with `ovseg-bench data check {card.name}`")
        return samples

    def check(self, card: DatasetCard, data_root: Path, *, deep: bool = False) -> Any:
        from ..datasets.check import check_dataset

        return check_dataset(card, data_root, deep=deep)

    def first_missing(self, card: DatasetCard, data_root: Path) -> tuple[str, Path] | None:
        return first_missing(card, data_root)

    def reader(self, card: DatasetCard, items: list[Any], settings: DatasetSettings, data_root: Path) -> SplitDataset:
        return SplitDataset(card, items, settings)

    def dataset_fields(self, card: DatasetCard, settings: Any, data_root: Path) -> dict[str, Any]:
        """The classes, the predicted ones where they differ, and the split file read (path and sha256)."""
        fields = super().dataset_fields(card, settings, data_root)
        if card.predicted_classnames:
            fields["predicted_classes"] = list(card.prediction_names())
            fields["predicted_to_class"] = card.prediction_map().tolist()
        used = split_file_used(card, data_root)
        if used is not None:
            fields["split_file"] = {"path": str(used[0]), "sha256": used[1]}
        return fields

    def result_blocks(self, card: DatasetCard, evaluation: Evaluation, settings: Any) -> dict[str, Any]:
        from ..stats import metrics_block

        counts = evaluation.counts
        return {"metrics": metrics_block(counts.compute(), card.class_names(), per_image=counts.per_item),
                "counts": {key: value.tolist() for key, value in counts.totals.items()}}


SEMANTIC = SemanticTrack()


def segment_image(method: WindowMethod, bgr: np.ndarray, classes: list[list[str]], settings: DatasetSettings,
                  device: torch.device, *, precision: str = "fp32", background_class: bool = False) -> torch.Tensor:
    """Labels [H,W] (int64) of one decoded HxWx3 uint8 BGR image for a free vocabulary.

    The same windows, stitching and postprocess as a benchmark run; ``classes`` are lists of
    synonyms, label k is ``classes[k]``.
    """
    names = tuple(synonyms[0] for synonyms in classes)
    info = DatasetInfo("custom", names, background_class)
    options = EngineOptions(precision=precision, quiet=True).for_device(device)
    found: list[torch.Tensor] = []
    counts = IoUCounts(len(names), device=device, keep_per_image=False)
    scorer = WindowScorer(method, None, settings, counts, options, device, info=info, classes=classes,
                          on_item=lambda index, image_id, labels, gt: found.append(labels))
    rgb = model_input(bgr, settings.short_side, settings.long_side, rule=settings.resize,
                      interpolation=settings.interpolation)
    unscored = torch.full(bgr.shape[:2], 255, dtype=torch.uint8)  # all ignored: no metric here
    with torch.inference_mode():
        scorer.push(Sample(0, "image", rgb, unscored))
        scorer.flush()
    return found[0]
