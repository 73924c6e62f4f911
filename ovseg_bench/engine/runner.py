"""The evaluation loop: the only module that wires the stages together (DESIGN.md data flow).

dataset -> DataLoader workers (decode, check, resize) -> normalise on the device -> windows of
several images batched together -> method.forward_windows -> count-averaged stitch -> bilinear
to the GT size -> method.postprocess -> int64 confusion counts on the device.
Images are finalised in dataset order, and at most a bounded number are in flight, so memory
does not grow with the split.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..datasets.cards import DatasetCard
from ..datasets.listing import SampleRef
from ..datasets.loader import Sample, SplitDataset
from ..errors import ConfigError, DataError, NumericsError
from ..methods.base import DatasetInfo, LabelMethod, Method, Vocabulary, WindowMethod
from .metrics import IoUCounts
from .protocol import DatasetSettings
from .sliding import Canvas, Window, image_windows
from .transforms import resize_image

ON_ERROR = ("fail", "skip")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    batch_size: int | None = None  # windows per forward pass, taken across images; None = device default
    workers: int | None = None     # DataLoader worker processes; None = device default
    precision: str = "fp32"
    on_error: str = "fail"
    quiet: bool = False

    def for_device(self, device: torch.device) -> "EngineOptions":
        """Fill the defaults. On a CPU the forward pass is ~97% of the time and batching windows
        makes each one slower (activations leave the caches), and workers compete with the
        compute threads (benchmarks/README.md); on a GPU large batches and decoding in workers pay."""
        cuda = device.type == "cuda"
        batch = self.batch_size if self.batch_size is not None else (16 if cuda else 1)
        workers = self.workers if self.workers is not None else (min(4, max((os.cpu_count() or 1) - 1, 0)) if cuda else 0)
        return dataclasses.replace(self, batch_size=batch, workers=workers)


@dataclasses.dataclass
class Evaluation:
    counts: IoUCounts
    image_ids: list[str]
    skipped: list[dict[str, str]]
    num_windows: int
    seconds: float


@dataclasses.dataclass
class _InFlight:
    sample: Sample
    image: torch.Tensor           # [3,h,w] normalised model input
    canvas: Canvas


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"--device '{name}' is not one of auto, cpu, cuda[:N]")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass only; stitching, postprocess and metric stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("--precision fp16 needs CUDA; on the CPU use fp32 or bf16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


# Called once per finished image, in dataset order: (index in the sample list, image id,
# labels [H,W] int64 on the device, GT [H,W] uint8). For saving predictions and pictures.
ImageHook = Callable[[int, str, torch.Tensor, torch.Tensor], None]


def evaluate(method: Method, card: DatasetCard, samples: list[SampleRef], settings: DatasetSettings,
             options: EngineOptions, device: torch.device, on_image: ImageHook | None = None) -> Evaluation:
    """Run ``method`` over ``samples`` of ``card`` and return the accumulated counts."""
    start = time.perf_counter()
    options = options.for_device(device)
    info = DatasetInfo(card.name, card.class_names(), card.background_class)
    classes = card.class_synonyms(settings.classnames)
    loop = _Loop(method, info, classes, settings, options, device, ignore_index=card.ignore_index, on_image=on_image)
    loader = DataLoader(SplitDataset(card, samples, settings), batch_size=None, shuffle=False,
                        num_workers=options.workers, collate_fn=None)
    bar = tqdm(total=len(samples), desc=card.name, unit="img", disable=options.quiet, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for sample in loader:
            loop.push(sample)
            bar.update(loop.pop_finished_count())
        loop.flush()
        bar.update(loop.pop_finished_count())
    return Evaluation(loop.counts, loop.image_ids, loop.skipped, loop.num_windows, time.perf_counter() - start)


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
    loop = _Loop(method, info, classes, settings, options, device,
                 on_image=lambda index, image_id, labels, gt: found.append(labels))
    resized = resize_image(bgr, settings.short_side, settings.long_side)
    rgb = torch.from_numpy(np.ascontiguousarray(resized[:, :, ::-1].transpose(2, 0, 1)))
    unscored = torch.full(bgr.shape[:2], 255, dtype=torch.uint8)  # all ignored: no metric here
    with torch.inference_mode():
        loop.push(Sample(0, "image", rgb, unscored))
        loop.flush()
    return found[0]


class _Loop:
    """State of one evaluation: in-flight images, per-size window queues, counts."""

    def __init__(self, method: Method, info: DatasetInfo, classes: list[list[str]], settings: DatasetSettings,
                 options: EngineOptions, device: torch.device, *, ignore_index: int = 255,
                 on_image: ImageHook | None = None):
        if options.on_error not in ON_ERROR:
            raise ConfigError(f"--on-error '{options.on_error}' is not one of {ON_ERROR}")
        self.method, self.settings, self.options, self.device = method, settings, options, device
        self.info, self.on_image = info, on_image
        self.counts = IoUCounts(info.num_classes, ignore_index=ignore_index, device=device)
        self.vocab: Vocabulary | None = None
        if isinstance(method, WindowMethod):
            self.vocab = method.encode_classes(classes, self.info)
        self.autocast = autocast_context(device, options.precision)
        self.inflight: deque[_InFlight] = deque()
        self.queues: dict[tuple[int, int], deque[tuple[_InFlight, Window]]] = {}
        self.max_inflight = 2 * options.batch_size + 2
        self.image_ids: list[str] = []
        self.skipped: list[dict[str, str]] = []
        self.num_windows = 0
        self._finished = 0

    def pop_finished_count(self) -> int:
        finished, self._finished = self._finished, 0
        return finished

    def push(self, sample: Sample) -> None:
        if sample.error is not None:
            self._handle_error(sample)
            return
        if isinstance(self.method, LabelMethod):
            labels = self.method.labels_for(sample.image_id, tuple(sample.gt.shape))
            self._score(sample, torch.from_numpy(labels).to(self.device).long())
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

    def _handle_error(self, sample: Sample) -> None:
        if sample.skippable and self.options.on_error == "skip":
            self.skipped.append({"image_id": sample.image_id, "reason": sample.error})
            self._finished += 1
            return
        hint = " (use --on-error skip to leave unreadable images out)" if sample.skippable else ""
        raise DataError(sample.error + hint)

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
            self._score(state.sample, labels)

    def _score(self, sample: Sample, labels: torch.Tensor) -> None:
        self.counts.update(labels, sample.gt.to(self.device).long())
        if self.on_image is not None:
            self.on_image(sample.index, sample.image_id, labels, sample.gt)
        self.image_ids.append(sample.image_id)
        self._finished += 1
