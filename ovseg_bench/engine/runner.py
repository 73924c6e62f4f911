"""The evaluation loop every track shares: blocks, resume, progress, the item bookkeeping.

reader (a track's torch Dataset: decode, check, resize in DataLoader workers) -> the track's
:class:`Scorer` (method calls, batching, post-processing) -> the track's counts (int64 on the
device). This module knows no track and no method kind: the track hands it the reader and the
scorer (tracks/), resolved once per dataset.

Blocks: the listing is cut into blocks of ``EngineOptions.save_every`` items. A scorer never
batches across a block boundary (:func:`evaluate` flushes it there), the state is saved at every
block end (resume) and torchrun deals whole blocks out to its ranks (engine/distributed.py). So
a resumed or sharded run makes exactly the forward passes of one uninterrupted process, and its
counts are bit-identical to it whatever the batch size and the device's kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..atomic import atomic_path
from ..errors import ConfigError, DataError
from .metrics import Counts, counts_from_state

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

    counts: Counts
    image_ids: list[str]
    skipped: list[dict[str, str]]
    num_windows: int
    seconds: float
    scored_at: list[int] = dataclasses.field(default_factory=list)
    skipped_at: list[int] = dataclasses.field(default_factory=list)
    processed_ids: list[str] = dataclasses.field(default_factory=list)
    # Items the method could not answer ({"image_id", "at": listing position, "rule": skip|empty}):
    # skipped ones are also in ``skipped``, empty ones were scored as empty answers.
    unanswered: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and CPU tensors (``torch.load(weights_only=True)`` reads them)."""
        return {"counts": self.counts.state_dict(), "image_ids": list(self.image_ids),
                "scored_at": list(self.scored_at), "skipped": [dict(s) for s in self.skipped],
                "skipped_at": list(self.skipped_at), "processed_ids": list(self.processed_ids),
                "num_windows": int(self.num_windows), "seconds": float(self.seconds),
                "unanswered": [dict(u) for u in self.unanswered]}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> "Evaluation":
        """Inverse of :meth:`state_dict`; counts go to ``device``. Raises DataError if malformed."""
        try:
            counts = counts_from_state(state["counts"], device)
            evaluation = cls(counts, list(state["image_ids"]), [dict(s) for s in state["skipped"]],
                             int(state["num_windows"]), float(state["seconds"]), list(state["scored_at"]),
                             list(state["skipped_at"]), list(state["processed_ids"]),
                             [dict(u) for u in state.get("unanswered", [])])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not an evaluation state: {exc!r}") from None
        if len({len(evaluation.scored_at), len(evaluation.image_ids), counts.num_items}) != 1 \
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
    on_block: called after every block end, nothing in flight, with the states so far, one per
        dataset the scorer serves (:meth:`Scorer.evaluations`), to save them.
    """

    indices: tuple[int, ...] | None = None
    start: Evaluation | None = None
    on_block: Callable[[list[Evaluation]], None] | None = None
    source: str = "the saved state"


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


# Called once per finished item, in dataset order: (index in the listing, item id, the method's
# answer on the device, GT). For saving predictions and pictures.
ImageHook = Callable[[int, str, torch.Tensor, torch.Tensor], None]


class Scorer:
    """What one evaluation loop holds whatever the track: the counts and the item bookkeeping.

    A track's scorer (tracks/<track>.py) subclasses it, takes items with :meth:`push`, runs the
    method on them (batching across items as it likes, finishing them in listing order) and
    calls :meth:`score` for each finished one. :meth:`flush` finishes everything in flight.
    """

    def __init__(self, counts: Counts, options: EngineOptions, *, on_item: ImageHook | None = None):
        if options.on_error not in ON_ERROR:
            raise ConfigError(f"--on-error '{options.on_error}' is not one of {ON_ERROR}")
        self.counts, self.options, self.on_item = counts, options, on_item
        self.image_ids: list[str] = []
        self.skipped: list[dict[str, str]] = []
        self.scored_at: list[int] = []
        self.skipped_at: list[int] = []
        self.processed_ids: list[str] = []
        self.unanswered: list[dict[str, Any]] = []
        self.num_windows = 0
        self._finished = 0

    def push(self, sample: Any) -> None:
        """Take one item from the track's reader (``sample.error`` set: an unreadable item)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Finish every item in flight."""

    def continue_from(self, start: Evaluation) -> None:
        """Take over the counts and lists of an interrupted evaluation (before any push)."""
        self.counts.merge(start.counts)
        self.image_ids += start.image_ids
        self.skipped += start.skipped
        self.scored_at += start.scored_at
        self.skipped_at += start.skipped_at
        self.processed_ids += start.processed_ids
        self.unanswered += start.unanswered
        self.num_windows += start.num_windows

    def evaluation(self, seconds: float) -> Evaluation:
        """A snapshot of the finished items (the counts object is shared, the lists copied)."""
        return Evaluation(self.counts, list(self.image_ids), list(self.skipped), self.num_windows, seconds,
                          list(self.scored_at), list(self.skipped_at), list(self.processed_ids),
                          list(self.unanswered))

    def evaluations(self, seconds: float) -> list[Evaluation]:
        """One snapshot per dataset this scorer serves (one, unless it serves a shared stream)."""
        return [self.evaluation(seconds)]

    def pop_finished_count(self) -> int:
        finished, self._finished = self._finished, 0
        return finished

    def handle_error(self, sample: Any) -> None:
        """An unreadable item: left out under ``--on-error skip`` when skippable, else a DataError."""
        if sample.skippable and self.options.on_error == "skip":
            self.skipped.append({"image_id": sample.image_id, "reason": sample.error})
            self.skipped_at.append(sample.index)
            self.processed_ids.append(sample.image_id)
            self._finished += 1
            return
        hint = " (use --on-error skip to leave unreadable images out)" if sample.skippable else ""
        raise DataError(sample.error + hint)

    def score(self, sample: Any, answer: torch.Tensor, gt: torch.Tensor, *, shown: torch.Tensor | None = None) -> None:
        """Count one finished item: ``counts.update(answer, gt)``, then the hook with ``shown``
        (what pictures show; default the answer itself)."""
        self.counts.update(answer, gt)
        if self.on_item is not None:
            self.on_item(sample.index, sample.image_id, answer if shown is None else shown, gt)
        self.image_ids.append(sample.image_id)
        self.scored_at.append(sample.index)
        self.processed_ids.append(sample.image_id)
        self._finished += 1


def evaluate(scorer: Scorer, reader: Dataset, item_ids: list[str], options: EngineOptions, *,
             desc: str, work: Work | None = None) -> Evaluation:
    """Push the items of ``reader`` (the part ``work`` names) through ``scorer``; the counts.

    ``reader`` covers the whole listing, whose item ids are ``item_ids``: ``sample.index``,
    the hook and the block boundaries use listing positions, so a shard or a continuation runs
    exactly as its items would in one uninterrupted process. ``options`` are device-resolved.
    """
    return evaluate_each(scorer, reader, item_ids, options, desc=desc, work=work)[0]


def evaluate_each(scorer: Scorer, reader: Dataset, item_ids: list[str], options: EngineOptions, *,
                  desc: str, work: Work | None = None) -> list[Evaluation]:
    """:func:`evaluate` for a scorer that serves several datasets from one reader (a shared
    stream: each item holds one sample per dataset); one evaluation per dataset."""
    clock = time.perf_counter()
    work = work or Work()
    indices = list(range(len(item_ids))) if work.indices is None else list(work.indices)
    done = 0 if work.start is None else _check_start(work.start, item_ids, indices, work.source)
    before = 0.0
    if work.start is not None:
        scorer.continue_from(work.start)
        before = work.start.seconds
    loader = DataLoader(Subset(reader, indices[done:]), batch_size=None, shuffle=False,
                        num_workers=options.workers, collate_fn=None)
    bar = tqdm(total=len(indices), initial=done, desc=desc, unit="img", disable=options.quiet, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for sample in loader:
            scorer.push(sample)
            if (sample.index + 1) % options.save_every == 0:
                scorer.flush()  # a block ends: no batch spans two blocks, nothing is in flight
                if work.on_block is not None:
                    work.on_block(scorer.evaluations(before + time.perf_counter() - clock))
            bar.update(scorer.pop_finished_count())
        scorer.flush()
        bar.update(scorer.pop_finished_count())
    return scorer.evaluations(before + time.perf_counter() - clock)


def _check_start(start: Evaluation, item_ids: list[str], indices: list[int], source: str) -> int:
    """How many items ``start`` processed, after checking they are the first ones of ``indices``."""
    done = len(start.processed_ids)
    expected = [item_ids[i] for i in indices[:done]]
    if done <= len(indices) and start.processed_ids == expected \
            and sorted(start.scored_at + start.skipped_at) == indices[:done]:
        return done
    position = next((k for k, (a, b) in enumerate(zip(start.processed_ids, expected)) if a != b), len(expected))
    saved = start.processed_ids[position] if position < done else "(nothing)"
    shown = expected[position] if position < len(expected) else "(the listing ends)"
    raise DataError(f"{source}: its {done} processed image(s) are not the first ones of this run's listing "
                    f"(at position {position}: saved '{saved}', listed '{shown}'); the split changed since "
                    "the state was saved. Run without --resume to start this dataset afresh")
