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

import dataclasses
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.cards import DatasetCard
from ..datasets.listing import first_missing, list_samples, split_file_used, split_path
from ..datasets.loader import ImageSamples, Sample, SplitDataset
from ..engine.metrics import IoUCounts
from ..engine.protocol import DatasetSettings
from ..engine.runner import EngineOptions, Evaluation, ImageHook, Scorer, autocast_context
from ..engine.sharing import SharedEmbedder
from ..engine.sliding import Canvas, Window, image_windows
from ..imaging import model_input
from ..errors import DataError, NumericsError
from ..methods.base import DatasetInfo, ImageLabelMethod, LabelMethod, Method, Vocabulary, WindowMethod
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


def iou_counts(card: Any, method: Method, device: torch.device) -> IoUCounts:
    return IoUCounts(card.num_classes, ignore_index=card.ignore_index, device=device)


@dataclass
class WindowHead:
    """One dataset scored by one window method on a stream of windows: its vocabulary,
    background rule and label mapping, and ``book``, the scorer that keeps its counts, ids and
    image hook. ``sample_at`` says which of the stream's per-dataset samples it scores."""

    method: WindowMethod
    info: DatasetInfo
    vocab: Vocabulary
    to_scored: torch.Tensor | None
    book: Scorer
    sample_at: int = 0

    @classmethod
    def build(cls, method: WindowMethod, card: Any, settings: DatasetSettings, book: Scorer, device: torch.device,
              *, info: DatasetInfo | None = None, classes: list[list[str]] | None = None,
              sample_at: int = 0) -> "WindowHead":
        info = info or dataset_info(card)
        vocab = method.encode_classes(classes or card.prediction_synonyms(settings.classnames), info)
        return cls(method, info, vocab, prediction_lut(card, device), book, sample_at)


@dataclass
class _InFlight:
    samples: list[Sample]         # one per dataset of the stream, all of the same image
    images: list[torch.Tensor]    # [3,h,w] normalised model input, one per method
    windows: list[Window]         # the image's windows in grid order
    features: list[dict[int, Any]]  # per method: window index -> its features (a batch of one)

    @property
    def complete(self) -> bool:
        return all(len(done) == len(self.windows) for done in self.features)


class WindowStream:
    """In-flight images, per-size window queues and the stitch, for the heads of one stream.

    Every head reads the same images, resized alike, so each window is cut and batched once;
    :class:`~ovseg_bench.engine.sharing.SharedEmbedder` embeds a batch once per method (each
    shared trunk once). An image's window features are kept (small: one map per window and
    method) until all its windows are embedded; then each head in turn scores its own
    vocabulary on them, stitches, post-processes and counts, so only one head's full-image
    scores are alive at a time.
    """

    def __init__(self, heads: list[WindowHead], settings: DatasetSettings, options: EngineOptions,
                 device: torch.device):
        self.heads, self.settings, self.options, self.device = heads, settings, options, device
        self.methods = list({id(head.method): head.method for head in heads}.values())
        self.method_at = [next(i for i, m in enumerate(self.methods) if m is head.method) for head in heads]
        self.embedder = SharedEmbedder(self.methods)
        self.autocast = autocast_context(device, options.precision)
        self.inflight: deque[_InFlight] = deque()
        self.queues: dict[tuple[int, int], deque[tuple[_InFlight, int]]] = {}
        self.max_inflight = 2 * options.batch_size + 2

    def push(self, samples: list[Sample]) -> None:
        """One image: a sample per dataset of the stream (the same image, each its own GT)."""
        failed = False
        for head in self.heads:
            if samples[head.sample_at].error is not None:
                head.book.handle_error(samples[head.sample_at])
                failed = True
        if failed:
            return
        pixels = samples[0].image[None].to(self.device)
        normalised = {norm: norm.apply(pixels)[0] for norm in {m.normalisation for m in self.methods}}
        images = [normalised[method.normalisation] for method in self.methods]
        windows = image_windows(*images[0].shape[-2:], self.settings.mode, self.settings.crop, self.settings.stride)
        state = _InFlight(samples, images, windows, [{} for _ in self.methods])
        self.inflight.append(state)
        for index, window in enumerate(windows):
            self.queues.setdefault(window.size, deque()).append((state, index))
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

    def _run_batch(self, queue: deque[tuple[_InFlight, int]]) -> None:
        items = [queue.popleft() for _ in range(min(self.options.batch_size, len(queue)))]
        boxes = [state.windows[index] for state, index in items]
        batches = [torch.stack([s.images[m][:, w.y1:w.y2, w.x1:w.x2] for (s, _), w in zip(items, boxes)])
                   for m in range(len(self.methods))]
        with self.autocast:
            features = self.embedder.embed(batches)
        for m, method_features in enumerate(features):
            for i, (state, index) in enumerate(items):
                state.features[m][index] = window_slice(method_features, i)
        for head in self.heads:
            head.book.num_windows += len(items)

    def _finish_ready(self) -> None:
        while self.inflight and self.inflight[0].complete:
            state = self.inflight.popleft()
            for h, head in enumerate(self.heads):
                self._finish_head(state, h, head)

    def _finish_head(self, state: _InFlight, h: int, head: WindowHead) -> None:
        """Score ``head``'s vocabulary on each window, stitch, resize to the GT, post-process, count."""
        features = state.features[self.method_at[h]]
        image = state.images[self.method_at[h]]
        canvas = Canvas(state.windows)
        for index, window in enumerate(state.windows):
            with self.autocast:
                scores = head.method.score(features[index], head.vocab, window.size)
            scores = scores.float()
            low, high = torch.aminmax(scores)  # NaN/inf show in the extremes; 20x cheaper than isfinite().all()
            if not (torch.isfinite(low) and torch.isfinite(high)):
                raise NumericsError(f"method '{head.method.name}' produced NaN/inf scores on image(s) "
                                    f"['{state.samples[0].image_id}']")
            canvas.add(window, scores[0], tuple(image.shape[-2:]))
        sample = state.samples[head.sample_at]
        scores = F.interpolate(canvas.average()[None], size=tuple(sample.gt.shape), mode="bilinear",
                               align_corners=False)[0]
        del canvas
        labels = head.method.postprocess(scores, image, head.vocab, head.info)
        if head.to_scored is not None:
            labels = head.to_scored[labels]
        head.book.score(sample, labels, sample.gt)


def window_slice(features: Any, index: int) -> Any:
    """Window ``index`` of a batch's features, as a batch of one: every tensor in them is cut
    along dim 0 (the window batch; ``DenseFeatureMethod.embed_windows``'s contract); dicts,
    lists, tuples and dataclasses are followed, other values kept."""
    if isinstance(features, torch.Tensor):
        return features[index:index + 1]
    if isinstance(features, dict):
        return {key: window_slice(value, index) for key, value in features.items()}
    if isinstance(features, (list, tuple)):
        return type(features)(window_slice(value, index) for value in features)
    if dataclasses.is_dataclass(features) and not isinstance(features, type):
        return dataclasses.replace(features, **{f.name: window_slice(getattr(features, f.name), index)
                                                for f in dataclasses.fields(features) if f.init})
    return features


class WindowScorer(Scorer):
    """One :class:`WindowMethod` on one dataset: a stream with a single head, this scorer its book."""

    new_counts = staticmethod(iou_counts)

    def __init__(self, method: WindowMethod, card: Any, settings: DatasetSettings, counts: IoUCounts,
                 options: EngineOptions, device: torch.device, *, on_item: ImageHook | None = None,
                 info: DatasetInfo | None = None, classes: list[list[str]] | None = None):
        super().__init__(counts, options, on_item=on_item)
        self.method = method
        head = WindowHead.build(method, card, settings, self, device, info=info, classes=classes)
        self.stream = WindowStream([head], settings, options, device)

    def push(self, sample: Sample) -> None:
        self.stream.push([sample])

    def flush(self) -> None:
        self.stream.flush()


class StreamScorer(Scorer):
    """Several (method, dataset) heads on one stream of images (paired datasets, several methods):
    each head's book keeps that dataset's counts, ids and hook; :meth:`evaluations` gives one
    evaluation per head. A shared stream never continues a saved state (plan.py runs a dataset
    with one on its own)."""

    def __init__(self, heads: list[WindowHead], settings: DatasetSettings, options: EngineOptions,
                 device: torch.device):
        super().__init__(heads[0].book.counts, options)  # progress and errors are the books'
        self.heads = heads
        self.stream = WindowStream(heads, settings, options, device)

    def push(self, item: ImageSamples) -> None:
        self.stream.push(item.samples)

    def flush(self) -> None:
        self.stream.flush()

    def continue_from(self, start: Any) -> None:
        raise RuntimeError("a shared stream does not continue saved states")

    def evaluations(self, seconds: float) -> list[Evaluation]:
        return [head.book.evaluation(seconds) for head in self.heads]

    def pop_finished_count(self) -> int:
        counts = [head.book.pop_finished_count() for head in self.heads]
        return counts[0]

    @property
    def passes(self) -> dict[str, int]:
        """Windows through trunks and branches, and what separate runs would have passed."""
        embedder = self.stream.embedder
        return {"trunk_windows": embedder.trunk_windows, "branch_windows": embedder.branch_windows,
                "separate_windows": sum(head.book.num_windows for head in self.heads)}


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
