"""``ovseg-bench proposals``: compute a mask-proposal file for the images of a dataset split.

The file (format: :mod:`ovseg_bench.methods.proposals`) is what proposal-based methods (GLCF)
read; making it is a separate, resumable step so the slow generator runs once per split, not once
per evaluation. Images are those of the card's split in first-appearance order:

- referring cards: the distinct COCO image ids of the split's samples (ids as decimal text),
  decoded as the referring track decodes them (cv2, EXIF orientation ignored: the references read
  with PIL), each checked against ``instances.json``'s size;
- semantic cards: the listed images (split-file entries), decoded as the semantic track does
  (cv2, EXIF applied).

An existing ``--out`` of the same source and params is continued (images already there are kept
and skipped, new ones appended); one of another source or params is refused. The file is
rewritten atomically every ``save_every`` new images and when the run stops, also on an error or
an interruption, so a rerun continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import check_writable
from .errors import ConfigError, DataError
from .methods import proposals as props

SOURCES = ("sam",)
DECODING = {False: "cv2 RGB, EXIF orientation ignored (the referring track)",
            True: "cv2 RGB, EXIF orientation applied (the semantic track)"}


@dataclasses.dataclass(frozen=True)
class ProposalsRequest:
    """``ovseg-bench proposals --source sam --dataset NAME --out FILE``: what to compute, where."""

    source: str
    dataset: str
    out: Path
    model_type: str | props.SamArchitecture | None = None  # None: the config's (vit_h)
    checkpoint: Path | None = None                           # None: the published checkpoint, fetched once
    data_root: Path | None = None                            # None: $OVSEG_DATA, else ./data
    config: Path | None = None                               # None: configs/proposals/sam.yaml
    device: str = "auto"
    save_every: int = 50
    quiet: bool = False


@dataclasses.dataclass(frozen=True)
class ProposalsSummary:
    """What one ``precompute_proposals`` call did."""

    out: Path
    source: str
    dataset: str
    images: int           # images of the split
    computed: int         # computed by this call
    reused: int           # already in the file
    file_images: int      # images in the file afterwards (it may cover other splits too)
    file_proposals: int
    seconds: float

    def line(self) -> str:
        return (f"{self.source} proposals for {self.dataset}: {self.images} images ({self.computed} computed, "
                f"{self.reused} already there) -> {self.out} ({self.file_images} images, {self.file_proposals} "
                f"proposals, {self.seconds:.1f} s)")


@dataclasses.dataclass(frozen=True)
class SplitImage:
    """One image to make proposals for."""

    image_id: str
    path: Path
    size: tuple[int, int] | None  # (H, W) the annotations give, checked after decoding; None: not known


# ----------------------------------------------------------------------------- the split's images
def split_images(card: Any, data_root: Path) -> tuple[list[SplitImage], bool]:
    """The distinct images of ``card``'s split in first-appearance order, and whether EXIF is applied."""
    track = getattr(card, "track", None)
    if track == "referring":
        from .datasets.refer import read_referring

        refs, index = read_referring(card, data_root)
        seen: dict[str, SplitImage] = {}
        for ref in refs:
            if str(ref.image_id) not in seen:
                info = index.image(ref.image_id)
                seen[str(ref.image_id)] = SplitImage(str(ref.image_id), ref.image_path, (info.height, info.width))
        return list(seen.values()), False
    if track == "semantic":
        from .datasets.listing import list_samples

        return [SplitImage(s.image_id, s.image_path, None) for s in list_samples(card, data_root)], True
    raise ConfigError(f"--dataset {card.name}: proposals are made for referring and semantic cards; "
                      f"{card.name} is a {track} card")


def _check_present(images: list[SplitImage], dataset: str) -> None:
    gone = [im.path for im in images if not im.path.is_file()]
    if gone:
        first = ", ".join(str(p) for p in gone[:3]) + (", ..." if len(gone) > 3 else "")
        raise DataError(f"{dataset}: {len(gone)} of {len(images)} images missing (first: {first}); "
                        f"`ovseg-bench data check {dataset}` shows what is in place")


def _decoded(image: SplitImage, apply_exif: bool) -> np.ndarray:
    """[H, W, 3] uint8 RGB, decoded as the card's track decodes it (refer.py's decoder)."""
    from .datasets.refer import _decode_rgb

    rgb = _decode_rgb(image.path, apply_exif)
    if rgb is None:
        raise DataError(f"{image.path}: not a decodable image; replace it with the dataset's original file")
    if image.size is not None and rgb.shape[:2] != image.size:
        raise DataError(f"{image.path}: image is {rgb.shape[1]}x{rgb.shape[0]} (width x height, "
                        f"{DECODING[apply_exif]}) but the annotations say {image.size[1]}x{image.size[0]}; "
                        "replace it with the dataset's original file")
    return rgb


# ----------------------------------------------------------------------------- resuming
def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key (file X, now Y)`` for every leaf where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.') or 'params'} (file {old!r}, now {new!r})"]


def _existing(out: Path, source: str, params: dict[str, Any]) -> tuple[dict[str, list], dict[str, Any]]:
    """(images, extra keys) of an existing ``out`` made by the same source and params; ({}, {}) if none."""
    if not out.exists():
        return {}, {}
    previous = props.ProposalFile(out)
    if previous.source != source:
        raise DataError(f"{out}: holds '{previous.source}' proposals, not '{source}'; pass another --out or "
                        "delete it")
    changed = _differences(previous.params, params)
    if changed:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise DataError(f"{out}: made with other {source} params ({shown}); pass another --out, or delete it to "
                        "start over")
    return {i: previous.entries(i) for i in previous.image_ids()}, previous.extra


# ----------------------------------------------------------------------------- SAM
def _sam_params(weights: props.SamWeights, settings: props.SamSettings, apply_exif: bool) -> dict[str, Any]:
    """Everything that decides SAM's proposals, as JSON values (compared on resume)."""
    params = {"model_type": weights.architecture.name, "architecture": weights.architecture.shape(),
              "checkpoint_sha256": weights.sha256, "generator": dataclasses.asdict(settings),
              "output_mode": "coco_rle", "image_decoding": DECODING[apply_exif]}
    return json.loads(json.dumps(params))


def _run_entry(dataset: str, device: Any) -> dict[str, Any]:
    import importlib.metadata

    import torch

    try:
        version = importlib.metadata.version("segment-anything")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"dataset": dataset, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": str(device),
            "segment_anything": version, "torch": torch.__version__, "images_computed": 0}


# ----------------------------------------------------------------------------- the command
@dataclasses.dataclass
class _Store:
    """The proposal file being written: its content so far, saved whole and atomically."""

    out: Path
    source: str
    params: dict[str, Any]
    entries: dict[str, list]
    extra: dict[str, Any]

    def save(self) -> None:
        props.write_proposals(self.out, self.source, self.params, self.entries, self.extra)


def precompute_proposals(request: ProposalsRequest, *, log: Callable[[str], None] = print) -> ProposalsSummary:
    """Compute ``request.source``'s proposals for every image of ``request.dataset`` into ``request.out``.

    Resumes an existing file of the same source and params (module docstring); ``log`` gets one
    line when there is nothing to compute. Raises ConfigError for an unknown source, model type
    or card kind, a missing ``sam`` extra or an unwritable ``--out``; DataError for missing,
    undecodable or mis-sized images or a file of other params; WeightsError for a checkpoint that
    cannot be fetched or does not fit.
    """
    from .datasets.cards import load_card
    from .engine.runner import resolve_device
    from .plan import default_data_root

    start = time.perf_counter()
    if request.source not in SOURCES:
        raise ConfigError(f"--source '{request.source}' is not one of {', '.join(SOURCES)}")
    out = Path(request.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass the proposal file to write, e.g. {out}/proposals.json")
    check_writable(out.parent, option="--out")
    props.require_sam()
    card = load_card(request.dataset)
    images, apply_exif = split_images(card, Path(request.data_root or default_data_root()))
    _check_present(images, card.name)
    config = props.load_sam_config(request.config)
    weights = props.sam_weights(request.model_type or config.model_type, request.checkpoint)
    params = _sam_params(weights, config.generator, apply_exif)
    store = _Store(out, request.source, params, *_existing(out, request.source, params))
    todo = [im for im in images if im.image_id not in store.entries]
    if todo:
        device = resolve_device(request.device)
        generator = props.sam_generator(props.load_sam(weights, device), config.generator)
        store.extra = {**store.extra, "checkpoint": weights.record(),
                       "runs": [*store.extra.get("runs", []), _run_entry(card.name, device)]}
        _compute(generator, todo, apply_exif, store, request, reused=len(images) - len(todo))
    else:
        log(f"{out}: already holds proposals for all {len(images)} images of {card.name}; nothing to compute")
    return ProposalsSummary(out, request.source, card.name, len(images), len(todo), len(images) - len(todo),
                            len(store.entries), sum(len(v) for v in store.entries.values()),
                            time.perf_counter() - start)


def _compute(generator: Any, todo: list[SplitImage], apply_exif: bool, store: _Store, request: ProposalsRequest,
             *, reused: int) -> None:
    """Add each image's proposals to ``store``, saving every ``save_every`` images and on the way out
    (an error or an interruption included), so a rerun continues from there."""
    from tqdm import tqdm

    run = store.extra["runs"][-1]
    unsaved = 0
    bar = tqdm(total=reused + len(todo), initial=reused, desc=f"{request.source} proposals {run['dataset']}",
               unit="img", disable=request.quiet, file=sys.stderr, dynamic_ncols=True)
    try:
        for image in todo:
            store.entries[image.image_id] = props.sam_proposals(generator, _decoded(image, apply_exif))
            run["images_computed"] += 1
            unsaved += 1
            bar.update(1)
            if unsaved >= max(1, request.save_every):
                store.save()
                unsaved = 0
    finally:
        bar.close()
        if unsaved:
            store.save()
