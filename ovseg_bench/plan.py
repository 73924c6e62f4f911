"""A run plan: one method over several datasets under one protocol preset.

The CLI builds a frozen :class:`RunRequest` and calls :func:`run_plan`; Python users can do the
same. Each (method, dataset) evaluation writes its result file as soon as it finishes.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from .datasets.cards import ALL_BENCHMARKS, DatasetCard, load_card
from .datasets.listing import SampleRef, list_samples
from .engine.protocol import PRECISIONS, fingerprint, load_protocol
from .engine.runner import EngineOptions, Evaluation, autocast_context, evaluate, resolve_device
from .errors import ConfigError, DataError, TrackError
from .methods.base import WeightsOptions
from .registry import get_method
from .results import SCHEMA, environment, image_ids_digest, metrics_block, write_result


@dataclasses.dataclass(frozen=True)
class RunRequest:
    method: str
    datasets: tuple[str, ...]
    protocol: str = "tcl"
    data_root: Path = Path("data")
    output: Path = Path("runs")
    weights: WeightsOptions = WeightsOptions()
    method_config: Path | None = None
    device: str = "auto"
    limit: int | None = None
    engine: EngineOptions = EngineOptions()
    resume: bool = False
    save_predictions: bool = False   # label PNGs under output/predictions/<method>/<dataset>/
    visualize: int = 0               # image | GT | prediction panels for the first N images


def default_data_root() -> Path:
    return Path(os.environ.get("OVSEG_DATA", "data"))


def expand_datasets(names: list[str]) -> tuple[str, ...]:
    """``all`` -> the eight benchmarks in order; commas split; duplicates dropped, order kept."""
    expanded: list[str] = []
    for item in names:
        for name in filter(None, item.split(",")):
            expanded.extend(ALL_BENCHMARKS if name == "all" else [name])
    return tuple(dict.fromkeys(expanded))


def run_plan(request: RunRequest, on_result: Callable[[dict[str, Any], Path], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate ``request.method`` on each dataset; returns the result dicts in order."""
    _validate(request)
    preset = load_protocol(request.protocol)
    cards = [load_card(name) for name in request.datasets]  # unknown names fail before any work
    method_cls = get_method(request.method)
    for card in cards:
        if card.track not in method_cls.tracks:
            raise TrackError(f"method '{request.method}' serves {method_cls.tracks}, "
                             f"dataset '{card.name}' is a '{card.track}' benchmark")
    device = resolve_device(request.device)
    autocast_context(device, request.engine.precision)  # refuse fp16 on the CPU before loading weights
    engine = request.engine.for_device(device)
    listed = [_listed_samples(card, request) for card in cards]  # a missing later dataset fails up front
    method = method_cls(request.weights, device, request.method_config)
    fp = fingerprint(preset, precision=request.engine.precision, limit=request.limit)
    results = []
    for card, samples in zip(cards, listed):
        settings = preset.settings_for(card.name)
        hook = None
        if request.save_predictions or request.visualize:
            from .pictures import make_image_hook

            hook = make_image_hook(request.output, request.method, card, samples,
                                   save_predictions=request.save_predictions, visualize=request.visualize)
        evaluation = evaluate(method, card, samples, settings, engine, device, on_image=hook)
        _require_scored(card.name, evaluation, len(samples))
        result = _result(request, engine, method, card, settings, fp, evaluation, device, len(samples))
        path = write_result(result, request.output, evaluation.counts.per_image.numpy(), evaluation.image_ids)
        results.append(result)
        if on_result:
            on_result(result, path)
    return results


def _listed_samples(card: DatasetCard, request: RunRequest) -> list[SampleRef]:
    samples = list_samples(card, request.data_root)[: request.limit]
    if not samples:
        root = card.root_in(request.data_root)
        where = (f"split file {root / card.split_file} lists no images" if card.split_file
                 else f"no file ending in '{card.img_suffix}' under {root / card.img_dir}")
        raise DataError(f"{card.name}: {where}; check the layout with `ovseg-bench data check {card.name}`")
    return samples


def _require_scored(name: str, evaluation: Evaluation, num_listed: int) -> None:
    if evaluation.counts.num_images == 0:
        reasons = "; ".join(s["reason"] for s in evaluation.skipped[:3])
        raise DataError(f"{name}: all {num_listed} listed image(s) were skipped as unreadable, nothing to score: {reasons}")


def _validate(request: RunRequest) -> None:
    if not request.datasets:
        raise ConfigError("no dataset given; use --dataset NAME[,NAME] or --dataset all")
    if request.engine.precision not in PRECISIONS:
        raise ConfigError(f"--precision '{request.engine.precision}' is not one of {PRECISIONS}")
    batch, workers = request.engine.batch_size, request.engine.workers
    if (batch is not None and batch < 1) or (workers is not None and workers < 0):
        raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
    if request.limit is not None and request.limit < 1:
        raise ConfigError("--limit must be a positive number of images")
    if request.output.exists() and not request.output.is_dir():
        raise ConfigError(f"--output {request.output} exists and is not a folder; pass a folder for the result files")


def _result(request: RunRequest, engine: EngineOptions, method: Any, card: Any, settings: Any, fp: str, evaluation: Any,
            device: Any, num_listed: int) -> dict[str, Any]:
    counts = evaluation.counts
    totals = {key: value.tolist() for key, value in counts.totals.items()}
    seconds = evaluation.seconds
    return {
        "schema": SCHEMA,
        "method": {"name": request.method, "config": method.settings(card.name), "weights": method.weights()},
        "dataset": {"name": card.name, "title": card.title, "split": card.split, "track": card.track,
                    "card_version": card.card_version, "num_classes": card.num_classes,
                    "classes": list(card.class_names()), "classnames": settings.classnames,
                    "data_root": str(Path(request.data_root).resolve()) if not card.embedded else "(embedded)"},
        "protocol": {"preset": request.protocol, "fingerprint": fp, "settings": dataclasses.asdict(settings),
                     "precision": request.engine.precision, "limit": request.limit},
        "metrics": metrics_block(counts.compute(), card.class_names(), per_image=counts.per_image),
        "counts": totals,
        "images": {"seen": counts.num_images, "listed": num_listed, "expected": card.num_images,
                   "windows": evaluation.num_windows, "skipped": evaluation.skipped,
                   "ids_sha256": image_ids_digest(evaluation.image_ids)},
        "env": environment(str(device)),
        "timing": {"seconds": round(seconds, 3),
                   "images_per_s": round(counts.num_images / seconds, 3) if seconds > 0 else None,
                   "batch_size": engine.batch_size, "workers": engine.workers},
    }
