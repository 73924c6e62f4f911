"""A run plan: one or several methods over several datasets under one protocol preset.

The CLI builds a frozen :class:`RunRequest` and calls :func:`run_plan`; Python users can do the
same. Each (method, dataset) evaluation writes its result file as soon as it finishes. Tasks
that read the same images alike run as one stream (:mod:`ovseg_bench.streams`), each still
writing the result its run alone would.

Resume: while a dataset runs, its state is saved after every block of ``save_every`` images to
``<output>/<result stem>.partial.pt`` (``.partial.rank<R>-of-<W>.pt`` per torchrun rank), the
same key as the result file, with the run's identity (weights, method config, listing size,
block size, world size). ``resume=True`` returns finished results of the same run as they are,
continues a saved state after checking it belongs to this very run, and refuses when it does
not; without it a saved state is ignored and replaced. The state goes once the result is written.

Under torchrun (engine/distributed.py) each rank evaluates its shard, the counts are brought
together, and only rank 0 writes and reports; the other ranks return an empty list.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .datasets.cards import DATASET_GROUPS, DatasetCard, load_card
from .datasets.listing import SampleRef, require_datasets
from .atomic import check_writable
from .engine import distributed
from .engine.distributed import Ranks
from .engine.protocol import PRECISIONS, DatasetSettings, ProtocolPreset, fingerprint, image_rule, load_protocol, resolve_protocol
from .engine.runner import (EngineOptions, Evaluation, Scorer, Work, autocast_context, evaluate, evaluate_each,
                            load_partial, resolve_device, resolve_save_every, save_partial)
from .errors import ConfigError, DataError, TrackError
from .methods.base import Method, MethodInputs, WeightsOptions
from .identity import config_digest
from .registry import METHOD_GROUPS, get_method
from .streams import Task, plan_streams
from .datasets.loader import SharedImagesDataset
from .tracks.semantic import StreamScorer, WindowHead
from .tracks import get_track
from .results import SCHEMA, ResultKey, environment, image_ids_digest, read_result, run_digest, write_result

# on_result(result, path, replaced): replaced = an earlier result of the very same run was overwritten.
ResultCallback = Callable[[dict[str, Any], Path, bool], None]


@dataclasses.dataclass(frozen=True)
class RunRequest:
    method: str                      # a name, a comma list or a group (expand_methods)
    datasets: tuple[str, ...]
    protocol: str = "tcl"
    data_root: Path = Path("data")
    output: Path = Path("runs")
    weights: WeightsOptions = WeightsOptions()
    inputs: MethodInputs = MethodInputs()  # method inputs that are not weights (--predictions, ...)
    method_config: Path | None = None
    device: str = "auto"
    limit: int | None = None         # first N images of each listing (recorded in the fingerprint)
    engine: EngineOptions = EngineOptions()
    resume: bool = False             # skip finished datasets, continue saved states (module docstring)
    save_predictions: bool = False   # label PNGs under output/predictions/<method>/<dataset>/
    visualize: int = 0               # image | GT | prediction panels for the first N images
    save_cams: bool = False          # label-conditioned: CAMs under output/cams/<method>/<dataset>/<image_id>.npy
    labels_from: str | None = None   # label-conditioned track: image labels from gt | xml (default: the card's)


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every dataset of one plan shares."""

    request: RunRequest
    preset: ProtocolPreset
    method: Method
    engine: EngineOptions
    device: torch.device
    ranks: Ranks

    def settings(self, card: Any) -> DatasetSettings:
        """The preset's settings for ``card``, with the run's own choices (``--labels-from``)."""
        settings = self.preset.settings_for(card.name)
        if self.request.labels_from is not None:
            settings = dataclasses.replace(settings, labels_from=self.request.labels_from)
        return settings

    def fingerprint(self, card: Any) -> str:
        """The dataset's own fingerprint: its settings, the track's metric, precision and subset."""
        return fingerprint(self.settings(card), metric=get_track(card.track).metric_id,
                           precision=self.request.engine.precision, limit=self.request.limit)


def default_data_root() -> Path:
    return Path(os.environ.get("OVSEG_DATA", "data"))


def expand_datasets(names: list[str]) -> tuple[str, ...]:
    """``all`` -> the eight benchmarks, ``referring`` -> the eight referring splits, in order;
    commas split, spaces around names dropped;
    duplicates dropped, order kept (names differing in case are resolved, then deduplicated, by
    :func:`run_plan`)."""
    expanded: list[str] = []
    for item in names:
        for name in filter(None, (part.strip() for part in item.split(","))):
            expanded.extend(DATASET_GROUPS.get(name.lower(), [name]))
    return tuple(dict.fromkeys(expanded))


def run_plan(request: RunRequest, on_result: ResultCallback | None = None,
             on_note: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate each method of ``request.method`` (a name, a comma list or a group such as
    ``clip-family``) on each dataset; returns the result dicts, method by method, in order.

    Datasets that read the same images alike, and methods that share a trunk, run as one
    stream (:mod:`ovseg_bench.streams`); ``on_note`` gets one line per sharing decision.
    Under torchrun only rank 0 returns them (and calls ``on_result``); other ranks return [].
    """
    _validate(request)
    method_names = expand_methods(request.method)
    if len(method_names) > 1 and request.method_config is not None:
        raise ConfigError(f"--config replaces the config of one method; {len(method_names)} were given "
                          f"({', '.join(method_names)}): run the variant in a command of its own")
    check_writable(request.output, option=f"--output {request.output}")  # before any weights load
    cards = _unique_cards(request.datasets)  # unknown names fail before any work
    names = tuple(card.name for card in cards)
    classes = [get_method(name) for name in method_names]
    _refuse_undeclared_inputs(request.inputs, classes)
    for name, method_cls in zip(method_names, classes):
        _refuse_mismatches(dataclasses.replace(request, method=name), cards, method_cls)
    presets = [load_protocol(resolve_protocol(request.protocol, cls, request.method_config)) for cls in classes]
    device = resolve_device(request.device)
    autocast_context(device, request.engine.precision)  # refuse fp16 on the CPU before loading weights
    # Every missing dataset named at once, before any work; each track knows its own layout.
    require_datasets(cards, request.data_root, missing=lambda card, root: get_track(card.track).first_missing(card, root))
    listed = [_listed_samples(card, request) for card in cards]
    ranks, device = distributed.init(device)
    try:
        engine = request.engine.for_device(device)
        engine = engine if ranks.main else dataclasses.replace(engine, quiet=True)
        jobs = []
        for name, method_cls, preset in zip(method_names, classes, presets):
            with distributed.main_first(ranks):  # one download into the shared cache
                method = method_cls(request.weights, device, request.method_config, inputs=request.inputs)
            method.check_datasets(names)
            jobs.append(_Job(dataclasses.replace(request, method=name), preset, method, engine, device, ranks))
        tasks = [Task(job, card, samples) for job in jobs for card, samples in zip(cards, listed)]
        done: dict[int, dict[str, Any]] = {}
        for group in plan_streams(tasks, alone=_resume_reason, on_note=on_note if ranks.main else None):
            for task, (result, path, replaced) in zip(group, _run_group(group, on_note)):
                if ranks.main:
                    done[tasks.index(task)] = result
                    if on_result:
                        on_result(result, path, replaced)
        return [done[i] for i in sorted(done)]
    finally:
        distributed.shutdown(ranks)


def expand_methods(name: str) -> tuple[str, ...]:
    """``--method``: one name, a comma list, or a group (``clip-family``: the five CLIP
    baselines); spaces dropped, repeats removed, order kept."""
    expanded: list[str] = []
    for part in filter(None, (piece.strip() for piece in name.split(","))):
        expanded.extend(METHOD_GROUPS.get(part.lower(), (part,)))
    if not expanded:
        raise ConfigError("--method names no method; pass a registered name (`ovseg-bench list methods`), a comma "
                          f"list, or a group ({', '.join(METHOD_GROUPS)})")
    return tuple(dict.fromkeys(get_method(part).name for part in expanded))


def _resume_reason(task: Task) -> str | None:
    """Under --resume, a task with a finished result or a saved state runs on its own."""
    request = task.job.request
    if not request.resume:
        return None
    stem = result_key(task.job, task.card).stem
    if (request.output / f"{stem}.json").is_file() or any(request.output.glob(f"{stem}.partial*.pt")):
        return "it has a finished result or a saved state to take up (--resume)"
    return None


def _run_group(group: list[Task], on_note: Callable[[str], None] | None) -> list[tuple[dict[str, Any], Path, bool]]:
    """One task on its own, or a stream of several, each writing its result."""
    if len(group) == 1:
        return [_run_dataset(group[0].job, group[0].card, group[0].samples)]
    return _run_stream(group, on_note)


def _refuse_undeclared_inputs(inputs: MethodInputs, classes: list[type[Method]]) -> None:
    """Inputs none of the methods takes; each method reads only the ones it declares."""
    undeclared = [name for name in inputs.given() if not any(name in cls.inputs for cls in classes)]
    if undeclared:
        options = ", ".join("--" + name.replace("_", "-") for name in undeclared)
        if len(classes) == 1:
            takers = "takes none" if not classes[0].inputs else f"takes only {', '.join(classes[0].inputs)}"
            subject = f"method '{classes[0].name}', which {takers}"
        else:
            subject = f"any of the methods {', '.join(cls.name for cls in classes)}"
        raise ConfigError(f"{options}: not an input of {subject}; "
                          "drop it, or pick the method it belongs to (e.g. --method predictions)")


def _refuse_mismatches(request: RunRequest, cards: list[Any], method_cls: type[Method]) -> None:
    """Before any weights load: pictures off the semantic track, and datasets of a track the
    method does not serve."""
    unpictured = [card.name for card in cards if not get_track(card.track).label_pictures]
    if request.visualize and unpictured:
        raise ConfigError(f"--visualize draws semantic label maps; {', '.join(unpictured)} is not on the semantic "
                          "track: run it without that option")
    unsaved = [card.name for card in cards if not get_track(card.track).saves_predictions]
    uncams = [card.name for card in cards if card.track != "label-conditioned"]
    if request.save_cams and uncams:
        raise ConfigError(f"--save-cams writes the CAMs of the label-conditioned track; {', '.join(uncams)} is on "
                          "another track: run it without that option")
    if request.save_predictions and unsaved:
        raise ConfigError(f"--save-predictions writes semantic labels or referring masks; {', '.join(unsaved)} is "
                          "on another track: run it without that option")
    for card in cards:
        if card.track not in method_cls.tracks:
            raise TrackError(f"method '{request.method}' serves {method_cls.tracks}, "
                             f"dataset '{card.name}' is a '{card.track}' benchmark")


def _unique_cards(datasets: tuple[str, ...]) -> list[DatasetCard]:
    """The cards of ``datasets`` (names resolved: ``VOC`` is voc), each once, in order."""
    cards: dict[str, DatasetCard] = {}
    for name in datasets:
        card = load_card(name)
        cards.setdefault(card.name, card)
    return list(cards.values())


def _run_dataset(job: _Job, card: DatasetCard, samples: list[SampleRef]) -> tuple[dict[str, Any], Path, bool]:
    """Evaluate one dataset (or take its finished result under resume); rank 0 writes it."""
    request, ranks = job.request, job.ranks
    stem = result_key(job, card).stem
    if request.resume:
        finished = ranks.broadcast(_finished_result(job, card, samples, stem) if ranks.main else None)
        if finished is not None:
            _remove_partials(job, stem)
            return (*finished, False)
    evaluation = distributed.combine(_evaluate(job, card, samples, stem), ranks)
    return _finish(job, card, samples, stem, evaluation)


def _finish(job: _Job, card: DatasetCard, samples: list[SampleRef], stem: str, evaluation: Evaluation,
            shared: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path, bool]:
    """Write one dataset's result (rank 0), then drop its saved states; ``shared``: the stream it ran in."""
    request, ranks = job.request, job.ranks
    _require_scored(card.name, evaluation, len(samples))
    result, path = {}, request.output / f"{stem}.json"
    replaced = path.is_file()
    if ranks.main:
        settings = job.settings(card)
        result = _result(job, card, settings, evaluation, len(samples))
        if shared is not None:
            result["timing"]["shared"] = shared
        path = write_result(result, request.output, evaluation.counts.per_item.numpy(), evaluation.image_ids,
                            layout=get_track(card.track).sidecar_layout)
    ranks.barrier()  # the result is on disk before any rank drops its saved state
    _remove_partials(job, stem)
    return result, path, replaced


def _run_stream(group: list[Task], on_note: Callable[[str], None] | None) -> list[tuple[dict[str, Any], Path, bool]]:
    """Several (method, dataset) tasks on one stream of images: each image decoded, resized and
    cut into windows once, each trunk run once per window; each dataset's result as if alone."""
    first = group[0]
    job, request, ranks = first.job, first.job.request, first.job.ranks
    cards = list({task.card.name: task.card for task in group}.values())
    track = get_track(first.card.track)
    owner = {card.name: next(t for t in group if t.card is card) for card in cards}
    settings = {name: task.job.settings(task.card) for name, task in owner.items()}
    reader = SharedImagesDataset([track.reader(card, owner[card.name].samples, settings[card.name], request.data_root)
                                  for card in cards])
    heads, stems = [], []
    for task in group:
        stem = result_key(task.job, task.card).stem
        hook = _image_hook(task.job.request, task.card, task.samples)
        book = Scorer(track.new_counts(task.card, task.job.method, job.device), job.engine, on_item=hook)
        heads.append(WindowHead.build(task.job.method, task.card, task.job.settings(task.card), book, job.device,
                                      sample_at=cards.index(task.card)))
        stems.append(stem)
        partial_path(request.output, stem, ranks).unlink(missing_ok=True)  # a stream always starts afresh
    identities = [_identity(task.job, task.card, task.samples) for task in group]

    def save_states(states: list[Evaluation]) -> None:
        for stem, state, identity in zip(stems, states, identities):
            save_partial(partial_path(request.output, stem, ranks), state, identity)

    scorer = StreamScorer(heads, settings[cards[0].name], job.engine, job.device)
    work = Work(indices=distributed.shard(len(first.samples), job.engine.save_every, ranks), on_block=save_states)
    names = "+".join(card.name for card in cards)
    methods = list(dict.fromkeys(task.job.request.method for task in group))
    evaluations = evaluate_each(scorer, reader, [track.item_id(s) for s in first.samples], job.engine,
                                desc=f"{names} ({len(methods)} method{'s' * (len(methods) > 1)})", work=work)
    passes = distributed.sum_over_ranks(scorer.passes, ranks)
    shared = {"stream": [f"{t.job.request.method}/{t.card.name}" for t in group], **passes}
    if on_note is not None and ranks.main:
        on_note(f"{names} x {', '.join(methods)}: {passes['trunk_windows']} window passes through trunks and "
                f"{passes['branch_windows']} through last parts, where separate runs make "
                f"{passes['separate_windows']} full passes")
    return [_finish(task.job, task.card, task.samples, stem, distributed.combine(evaluation, ranks), shared)
            for task, stem, evaluation in zip(group, stems, evaluations)]


def _image_hook(request: RunRequest, card: DatasetCard, samples: list[SampleRef]) -> Any:
    """The hook writing what the run asked for (label PNGs, pictures, CAMs), or None."""
    if not (request.save_predictions or request.visualize or request.save_cams):
        return None
    from .pictures import make_image_hook

    return make_image_hook(request.output, request.method, card, samples, save_predictions=request.save_predictions,
                           visualize=request.visualize, save_cams=request.save_cams)


def result_key(job: _Job, card: DatasetCard) -> ResultKey:
    """The key (file name) of this run's result on ``card``; equal to ``ResultKey.of`` its result."""
    method = job.method
    return ResultKey(job.request.method, method.variant, card.name, job.preset.name, job.fingerprint(card),
                     run_digest(_plain(method.weights()), _plain(method.settings(card.name))))


def _evaluate(job: _Job, card: DatasetCard, samples: list[SampleRef], stem: str) -> Evaluation:
    """This rank's shard of one dataset, continued from its saved state under resume."""
    request = job.request
    settings = job.settings(card)
    hook = _image_hook(request, card, samples)
    partial = partial_path(request.output, stem, job.ranks)
    identity = _identity(job, card, samples)
    start = None
    if request.resume:
        _refuse_other_world_sizes(request.output, stem, job.ranks)
        if partial.is_file():
            start = _saved_start(partial, identity, job.device)
    else:
        partial.unlink(missing_ok=True)  # without --resume a saved state is ignored and replaced
    work = Work(indices=distributed.shard(len(samples), job.engine.save_every, job.ranks), start=start,
                on_block=lambda states: save_partial(partial, states[0], identity), source=str(partial))
    track = get_track(card.track)
    scorer = track.scorer(job.method, card, settings, job.engine, job.device, on_item=hook)
    reader = track.reader(card, samples, settings, request.data_root)
    return evaluate(scorer, reader, [track.item_id(s) for s in samples], job.engine, desc=card.name, work=work)


def partial_path(output: Path, stem: str, ranks: Ranks) -> Path:
    """Where a dataset's state is saved: ``<stem>.partial.pt``, per rank under torchrun."""
    suffix = f".rank{ranks.rank}-of-{ranks.world_size}" if ranks.active else ""
    return Path(output) / f"{stem}.partial{suffix}.pt"


def _identity(job: _Job, card: DatasetCard, samples: list[SampleRef]) -> dict[str, Any]:
    """What a saved state must share with the run that continues it (JSON values)."""
    return _plain({"method": job.request.method, "weights": job.method.weights(),
                   "config": job.method.settings(card.name), "dataset": card.name,
                   "card_version": card.card_version, "preset": job.preset.name,
                   "fingerprint": job.fingerprint(card), "listed": len(samples),
                   "save_every": job.engine.save_every, "batch_size": job.engine.batch_size,
                   "device": job.device.type, "world_size": job.ranks.world_size, "rank": job.ranks.rank})


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _saved_start(partial: Path, identity: dict[str, Any], device: torch.device) -> Evaluation:
    saved, evaluation = load_partial(partial, device)
    differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differ:
        raise DataError(f"{partial}: saved by a different run ({', '.join(differ)} differ); use the same "
                        "settings to resume it, or run without --resume to start this dataset afresh")
    return evaluation


def _refuse_other_world_sizes(output: Path, stem: str, ranks: Ranks) -> None:
    """A state saved with another number of processes covers other shards: refuse, do not guess."""
    ours = {partial_path(output, stem, Ranks(rank, ranks.world_size)).name for rank in range(ranks.world_size)}
    others = sorted(p.name for p in Path(output).glob(f"{stem}.partial*.pt") if p.name not in ours)
    if others:
        raise DataError(f"{output}: saved state(s) {others} come from a run with another number of processes "
                        f"than this one ({ranks.world_size}); resume with the same torchrun process count, or "
                        "run without --resume to start the dataset afresh")


def _remove_partials(job: _Job, stem: str) -> None:
    """Each rank drops its own state; rank 0 also any left by runs of another process count."""
    partial_path(job.request.output, stem, job.ranks).unlink(missing_ok=True)
    if job.ranks.main:
        for stale in Path(job.request.output).glob(f"{stem}.partial*.pt"):
            stale.unlink(missing_ok=True)


def _finished_result(job: _Job, card: DatasetCard, samples: list[SampleRef],
                     stem: str) -> tuple[dict[str, Any], Path] | None:
    """The existing result of this very run (same key, weights, config, listing), if complete."""
    path = job.request.output / f"{stem}.json"
    if not path.is_file():
        return None
    result = read_result(path)
    sidecar = result.get("per_image", {}).get("file")
    if not sidecar or not (path.parent / sidecar).is_file():
        return None  # no per-image counts: evaluate again
    now = {"method weights": job.method.weights(), "method config": job.method.settings(card.name),
           "fingerprint": job.fingerprint(card), "card version": card.card_version, "listed images": len(samples)}
    saved = {"method weights": result.get("method", {}).get("weights"),
             "method config": result.get("method", {}).get("config"),
             "fingerprint": result.get("protocol", {}).get("fingerprint"),
             "card version": result.get("dataset", {}).get("card_version"),
             "listed images": result.get("images", {}).get("listed")}
    differ = [key for key in now if _plain(now[key]) != saved[key]]
    if differ:
        raise DataError(f"{path}: a finished result of another run ({', '.join(differ)} differ); use another "
                        "--output, or run without --resume to replace it")
    return result, path


def _listed_samples(card: DatasetCard, request: RunRequest) -> list[SampleRef]:
    """The track's listing (it refuses an empty one, saying why), cut to ``--limit``."""
    return get_track(card.track).list_items(card, request.data_root)[: request.limit]


def _require_scored(name: str, evaluation: Evaluation, num_listed: int) -> None:
    if evaluation.counts.num_items == 0:
        reasons = "; ".join(s["reason"] for s in evaluation.skipped[:3])
        raise DataError(f"{name}: all {num_listed} listed image(s) were skipped as unreadable, nothing to score: {reasons}")


def _validate(request: RunRequest) -> None:
    if not request.datasets:
        raise ConfigError("no dataset given; use --dataset NAME[,NAME] or --dataset all")
    if request.engine.precision not in PRECISIONS:
        raise ConfigError(f"--precision '{request.engine.precision}' is not one of {PRECISIONS}")
    batch, workers = request.engine.batch_size, request.engine.workers
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch-size {batch}: must be at least 1 window per forward pass")
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers {workers}: must be 0 (decode in the main process) or more")
    resolve_save_every(request.engine.save_every)
    if request.limit is not None and request.limit < 1:
        raise ConfigError("--limit must be a positive number of images")
    if request.visualize < 0:
        raise ConfigError("--visualize must be a number of images >= 0")


def _result(job: _Job, card: DatasetCard, settings: Any, evaluation: Evaluation, num_listed: int) -> dict[str, Any]:
    request, engine, method = job.request, job.engine, job.method
    counts = evaluation.counts
    track = get_track(card.track)
    blocks = track.result_blocks(card, evaluation, settings)
    seconds = evaluation.seconds
    config = _plain(method.settings(card.name))
    return {
        "schema": SCHEMA,
        "method": {"name": request.method, "variant": method.variant, "config": config,
                   "config_sha256": config_digest(config), "weights": _plain(method.weights())},
        "dataset": {"name": card.name, "title": card.title, "split": card.split, "track": card.track,
                    "card_version": card.card_version, **track.dataset_fields(card, settings, Path(request.data_root)),
                    "data_root": "(embedded)" if getattr(card, "embedded", False)
                    else str(Path(request.data_root).resolve())},
        "protocol": {"preset": job.preset.name, "requested": request.protocol, "fingerprint": job.fingerprint(card),
                     "settings": dataclasses.asdict(settings), "precision": request.engine.precision,
                     "limit": request.limit, "images": image_rule(request.limit)},
        "metrics": blocks["metrics"],
        "counts": blocks["counts"],
        "images": {"seen": counts.num_items, "listed": num_listed, "expected": track.expected_items(card),
                   "windows": evaluation.num_windows, "skipped": evaluation.skipped,
                   "unanswered": evaluation.unanswered,
                   "ids_sha256": image_ids_digest(evaluation.image_ids)},
        "env": environment(str(job.device)),
        "timing": {"seconds": round(seconds, 3),
                   "images_per_s": round(counts.num_items / seconds, 3) if seconds > 0 else None,
                   "batch_size": engine.batch_size, "workers": engine.workers,
                   "world_size": job.ranks.world_size, "save_every": engine.save_every},
    }


def reference_classes(*, classes_file: Path | None = None, datasets: str | None = None,
                      scheme: str = "mmseg") -> tuple[list[str], str]:
    """The class names to build references for (``reco build-references``) and where they came
    from: a file of one name per line, or every name (synonyms included) that the datasets'
    methods predict under the naming ``scheme``, in dataset order without repeats."""
    if classes_file is not None:
        from .methods.reco_references import read_class_file

        return read_class_file(classes_file), f"file {Path(classes_file).resolve()}"
    cards = [load_card(name) for name in expand_datasets([datasets or ""])]
    if not cards:
        raise ConfigError("--dataset names no dataset; pass dataset names (`ovseg-bench list datasets`) or `all`")
    names = [name for card in cards for synonyms in card.prediction_synonyms(scheme) for name in synonyms]
    return list(dict.fromkeys(names)), f"datasets {', '.join(card.name for card in cards)} ({scheme} names)"
