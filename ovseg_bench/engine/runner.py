"""The evaluation loop: the only module that wires the stages together (DESIGN.md data flow).

dataset -> DataLoader workers (decode, check, resize) -> normalise on the device -> windows of
several images batched together -> method.forward_windows -> count-averaged stitch -> bilinear
to the GT size -> method.postprocess -> int64 confusion counts on the device.
Images are finalised in dataset order, and at most a bounded number are in flight, so memory
does not grow with the split.

Blocks: the listing is cut into blocks of ``EngineOptions.save_every`` images. Windows are never
batched across a block boundary, the state is saved at every block end (resume) and torchrun
deals whole blocks out to its ranks (engine/distributed.py). So a resumed or sharded run makes
exactly the forward passes of one uninterrupted process, and its counts are bit-identical to
it whatever the batch size and the device's kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..datasets.cards import DatasetCard
from ..datasets.listing import SampleRef
from ..datasets.loader import Sample, SplitDataset
from ..errors import ConfigError, DataError, NumericsError
from ..methods.base import DatasetInfo, LabelMethod, Method, Vocabulary, WindowMethod
from .metrics import IoUCounts
from .protocol import DatasetSettings
from .sliding import Canvas, Window, image_windows
from .transforms import model_input
from ..atomic import atomic_path

ON_ERROR = ("fail", "skip")
SAVE_EVERY_ENV = "OVSEG_SAVE_EVERY"
DEFAULT_SAVE_EVERY = 25
PARTIAL_FORMAT = "ovseg-bench/partial/v1"


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    batch_size: int | None = None  # windows per forward pass, taken across images; None = device default
    workers: int | None = None     # DataLoader worker processes; None = device default
    precision: str = "fp32"
    on_error: str = "fail"
    quiet: bool = False
    save_every: int | None = None  # block size in images (module docstring); None = $OVSEG_SAVE_EVERY, else 25

    def for_device(self, device: torch.device) -> "EngineOptions":
        """Fill the defaults. On a CPU the forward pass is ~97% of the time and batching windows
        makes each one slower (activations leave the caches), and workers compete with the
        compute threads (benchmarks/README.md); on a GPU large batches and decoding in workers pay."""
        cuda = device.type == "cuda"
        batch = self.batch_size if self.batch_size is not None else (16 if cuda else 1)
        workers = self.workers if self.workers is not None else (min(4, max((os.cpu_count() or 1) - 1, 0)) if cuda else 0)
        return dataclasses.replace(self, batch_size=batch, workers=workers, save_every=resolve_save_every(self.save_every))


def resolve_save_every(value: int | None) -> int:
    """``value``, else ``$OVSEG_SAVE_EVERY``, else 25 images; at least 1."""
    source = "save_every"
    if value is None:
        raw = os.environ.get(SAVE_EVERY_ENV, "").strip()
        if not raw:
            return DEFAULT_SAVE_EVERY
        source = f"${SAVE_EVERY_ENV}"
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{source}={raw!r} is not a whole number of images; unset it or give e.g. 25") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source} must be a positive number of images, got {value!r}")
    return value


@dataclasses.dataclass
class Evaluation:
    """Counts of the images processed so far (every image of the work once :func:`evaluate` returns).

    ``image_ids``, ``scored_at`` and the rows of ``counts.per_image`` are parallel: the scored
    images in processing order and their positions in the listing. ``skipped``/``skipped_at``
    hold the images left out by ``--on-error skip``; ``processed_ids`` both kinds, in processing
    order. ``seconds`` adds up the evaluation time of every session of a resumed run.
    """

    counts: IoUCounts
    image_ids: list[str]
    skipped: list[dict[str, str]]
    num_windows: int
    seconds: float
    scored_at: list[int] = dataclasses.field(default_factory=list)
    skipped_at: list[int] = dataclasses.field(default_factory=list)
    processed_ids: list[str] = dataclasses.field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and CPU tensors (``torch.load(weights_only=True)`` reads them)."""
        return {"counts": self.counts.state_dict(), "image_ids": list(self.image_ids),
                "scored_at": list(self.scored_at), "skipped": [dict(s) for s in self.skipped],
                "skipped_at": list(self.skipped_at), "processed_ids": list(self.processed_ids),
                "num_windows": int(self.num_windows), "seconds": float(self.seconds)}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> "Evaluation":
        """Inverse of :meth:`state_dict`; counts go to ``device``. Raises DataError if malformed."""
        try:
            saved = state["counts"]
            counts = IoUCounts(saved["num_classes"], ignore_index=saved["ignore_index"], device=device)
            counts.load_state_dict(saved)
            evaluation = cls(counts, list(state["image_ids"]), [dict(s) for s in state["skipped"]],
                             int(state["num_windows"]), float(state["seconds"]), list(state["scored_at"]),
                             list(state["skipped_at"]), list(state["processed_ids"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not an evaluation state: {exc!r}") from None
        if len({len(evaluation.scored_at), len(evaluation.image_ids), counts.num_images}) != 1 \
                or len(evaluation.skipped_at) != len(evaluation.skipped):
            raise DataError("evaluation state with lists of different lengths")
        return evaluation


def save_partial(path: Path, evaluation: Evaluation, identity: dict[str, Any]) -> None:
    """Write the state of an unfinished dataset atomically (temporary file, then ``os.replace``).

    The file holds ``format`` (:data:`PARTIAL_FORMAT`), ``identity`` (a JSON string: what the
    run was, see plan.py) and :meth:`Evaluation.state_dict`; a kill at any moment leaves either
    the previous state or the new one.
    """
    state = {"format": PARTIAL_FORMAT, "identity": json.dumps(identity, sort_keys=True, default=str),
             **evaluation.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_partial(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Any], Evaluation]:
    """(identity, evaluation) from a file of :func:`save_partial`, loaded with ``weights_only=True``."""
    fix = "delete it, or run without --resume to start this dataset afresh"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: not a readable partial state ({exc}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != PARTIAL_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise DataError(f"{path}: format {found!r} is not {PARTIAL_FORMAT!r}; {fix}")
    try:
        identity = json.loads(state["identity"])
        evaluation = Evaluation.from_state(state, device)
    except (KeyError, TypeError, ValueError, DataError) as exc:
        raise DataError(f"{path}: damaged partial state ({exc}); {fix}") from None
    return identity, evaluation


@dataclasses.dataclass(frozen=True)
class Work:
    """Which images one :func:`evaluate` call runs and how it keeps its progress.

    indices: listing positions to run, increasing (a torchrun shard of whole blocks); None = all.
    start: the state of an interrupted call with the same indices, to continue from; its
        processed images must be the first of ``indices`` (checked, naming ``source``).
    on_block: called with the state after every block end, nothing in flight (saving it).
    """

    indices: tuple[int, ...] | None = None
    start: Evaluation | None = None
    on_block: Callable[[Evaluation], None] | None = None
    source: str = "the saved state"


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
             options: EngineOptions, device: torch.device, on_image: ImageHook | None = None,
             work: Work | None = None) -> Evaluation:
    """Run ``method`` over ``samples`` of ``card`` (or the part ``work`` names) and return the counts.

    ``samples`` is always the whole listing: ``Sample.index``, ``on_image`` and the block
    boundaries use listing positions, so a shard or a continuation runs exactly as its images
    would in one uninterrupted process.
    """
    clock = time.perf_counter()
    options = options.for_device(device)
    work = work or Work()
    indices = list(range(len(samples))) if work.indices is None else list(work.indices)
    done = 0 if work.start is None else _check_start(work.start, samples, indices, work.source)
    info = DatasetInfo(card.name, card.class_names(), card.background_class)
    classes = card.class_synonyms(settings.classnames)
    loop = _Loop(method, info, classes, settings, options, device, ignore_index=card.ignore_index, on_image=on_image)
    before = 0.0
    if work.start is not None:
        loop.continue_from(work.start)
        before = work.start.seconds
    loader = DataLoader(Subset(SplitDataset(card, samples, settings), indices[done:]), batch_size=None,
                        shuffle=False, num_workers=options.workers, collate_fn=None)
    bar = tqdm(total=len(indices), initial=done, desc=card.name, unit="img", disable=options.quiet, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for sample in loader:
            loop.push(sample)
            if (sample.index + 1) % options.save_every == 0:
                loop.flush()  # a block ends: no batch spans two blocks, nothing is in flight
                if work.on_block is not None:
                    work.on_block(loop.evaluation(before + time.perf_counter() - clock))
            bar.update(loop.pop_finished_count())
        loop.flush()
        bar.update(loop.pop_finished_count())
    return loop.evaluation(before + time.perf_counter() - clock)


def _check_start(start: Evaluation, samples: list[SampleRef], indices: list[int], source: str) -> int:
    """How many images ``start`` processed, after checking they are the first ones of ``indices``."""
    done = len(start.processed_ids)
    expected = [samples[i].image_id for i in indices[:done]]
    if done <= len(indices) and start.processed_ids == expected \
            and sorted(start.scored_at + start.skipped_at) == indices[:done]:
        return done
    position = next((k for k, (a, b) in enumerate(zip(start.processed_ids, expected)) if a != b), len(expected))
    saved = start.processed_ids[position] if position < done else "(nothing)"
    listed = expected[position] if position < len(expected) else "(the listing ends)"
    raise DataError(f"{source}: its {done} processed image(s) are not the first ones of this run's listing "
                    f"(at position {position}: saved '{saved}', listed '{listed}'); the split changed since "
                    "the state was saved. Run without --resume to start this dataset afresh")


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
    rgb = model_input(bgr, settings.short_side, settings.long_side)
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
        self.scored_at: list[int] = []
        self.skipped_at: list[int] = []
        self.processed_ids: list[str] = []
        self.num_windows = 0
        self._finished = 0

    def continue_from(self, start: Evaluation) -> None:
        """Take over the counts and lists of an interrupted evaluation (before any push)."""
        self.counts.merge(start.counts)
        self.image_ids += start.image_ids
        self.skipped += start.skipped
        self.scored_at += start.scored_at
        self.skipped_at += start.skipped_at
        self.processed_ids += start.processed_ids
        self.num_windows += start.num_windows

    def evaluation(self, seconds: float) -> Evaluation:
        """A snapshot of the finished images (the counts object is shared, the lists copied)."""
        return Evaluation(self.counts, list(self.image_ids), list(self.skipped), self.num_windows, seconds,
                          list(self.scored_at), list(self.skipped_at), list(self.processed_ids))

    def pop_finished_count(self) -> int:
        finished, self._finished = self._finished, 0
        return finished

    def push(self, sample: Sample) -> None:
        if sample.error is not None:
            self._handle_error(sample)
            return
        if isinstance(self.method, LabelMethod):
            labels = self.method.labels_for(sample.image_id, tuple(sample.gt.shape), self.info)
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
            self.skipped_at.append(sample.index)
            self.processed_ids.append(sample.image_id)
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
        self.scored_at.append(sample.index)
        self.processed_ids.append(sample.image_id)
        self._finished += 1
