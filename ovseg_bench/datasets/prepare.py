"""`ovseg-bench data prepare`: from the published archives (or raw files in place) to a verified tree.

One plan per prepare target (voc, context, coco_stuff, coco_object, cityscapes, ade20k, and the
ReCo benchmarks coco_stuff27 and cityscapes27, which read the trees of coco_stuff and cityscapes);
each runs the same stages, in order:

1. place: move a tree extracted one level off (``<root>/ADEChallengeData2016``) where the card
   expects it;
2. obtain: for every archive in ``datasets/manifests/<name>.json`` whose files are not already
   in place under the data root, take the ``--from-archive`` file or the one in the download
   folder, else download it (resumable, checksummed), then extract only the members the
   benchmark needs. An archive read only by the conversion (Context's ``trainval_merged.json``)
   is not fetched when the converted files are already complete;
3. convert (context, coco_stuff, coco_object, cityscapes and the two ReCo targets): the pure
   functions of :mod:`.converters` over every file, in a process pool with a progress bar. A
   file whose existing output already holds exactly the converted labels is kept (cityscapes27
   never rewrites a shipped label-id PNG); a target whose inputs and outputs are unchanged since the last prepare (sizes and mtimes, recorded in
   ``ovseg_prepare.json``) is skipped outright;
4. record: ``ovseg_gt_sha256.json`` (sha256 of each converted val GT file, read by
   ``data check --deep``) and ``ovseg_prepare.json`` (what was used: archives and their
   checksums, Cityscapes polygons or label-id PNGs, oddities met) in the dataset's root;
5. verify: the deep ``data check`` of the target's cards.

ADE20K and VOC need no conversion: their GT files are used as published (verify and place).
Only the val split the benchmark reads is converted, except Context, whose train split is
converted too so that the tree is exactly what MMSegmentation's converter leaves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..errors import ConfigError, DataError, OvsegError
from ..registry import unknown_name_message
from . import converters
from .cards import load_card
from .check import DatasetCheck, atomic_write, check_dataset, format_checks, write_gt_manifest
from .download import (ArchiveSpec, download, extract, extraction_marker, find_archive, load_archive_manifest,
                       unmatched_archives, verify_file)
from .listing import list_samples, read_split_file
from ..atomic import atomic_path

TARGETS = ("voc", "context", "coco_stuff", "coco_object", "cityscapes", "ade20k")  # `all`: the trees of --dataset all
# Named only: the ReCo benchmarks, prepared from the archives of coco_stuff and cityscapes.
EXTRA_TARGETS = ("coco_stuff27", "cityscapes27")
_ALIASES = {"voc20": "voc", "context59": "context"}
REPORT_NAME = "ovseg_prepare.json"
REPORT_SCHEMA = "ovseg-bench/prepare-report/1"
CONVERTER_VERSION = 1  # part of the up-to-date fingerprint: bump when a conversion rule changes

Task = tuple[Any, ...]
Result = tuple[str, dict[str, Any]]  # ("written" | "kept", facts about the file)


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    data_root: Path
    download_dir: Path
    from_archives: tuple[Path, ...] = ()
    workers: int = 1
    quiet: bool = False


@dataclasses.dataclass(frozen=True)
class Conversion:
    """How a target turns raw files under its dataset root into the cards' GT files."""

    inputs: Callable[[Path], list[Path]]                      # raw files (sorted)
    outputs: Callable[[Path], list[Path]]                     # converted files on disk (sorted)
    tasks: Callable[[Path, list[Path]], tuple[list[Task], dict[str, Any]]]  # worker tasks, report facts
    worker: Callable[[Task], Result]                          # top-level, so the pool can pickle it
    summarise: Callable[[list[Result]], tuple[dict[str, Any], list[str]]]  # report facts, warnings
    # Whether the converted files are all there already, so archives read only by the
    # conversion (Plan.raw_archives) need not be fetched; None: always fetch them.
    complete: Callable[[Path], bool] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    target: str
    cards: tuple[str, ...]
    manifest: str
    conversion: Conversion | None = None
    moves: tuple[tuple[str, str], ...] = ()  # (misplaced, expected), relative to the data root
    raw_archives: tuple[str, ...] = ()       # archives only the conversion reads (see Conversion.complete)


@dataclasses.dataclass
class Log:
    """What a target's preparation did (one line each) and what the user should look at."""

    done: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outcome:
    target: str
    checks: list[DatasetCheck]
    log: Log


# --------------------------------------------------------------------------- command

@dataclasses.dataclass
class PrepareRun:
    """What ``data prepare`` did: lines for stdout, one ``error:`` line per failed target, exit code."""

    lines: list[str]
    errors: list[str]
    code: int


def prepare_options(data_root: Path, *, download_dir: Path | None = None, from_archives: Sequence[Path] = (),
                    workers: int | None = None, quiet: bool = False) -> PrepareOptions:
    return PrepareOptions(data_root=data_root, download_dir=Path(download_dir or data_root / "downloads"),
                          from_archives=tuple(Path(p) for p in from_archives), workers=_workers(workers), quiet=quiet)


def prepare(names: Sequence[str], options: PrepareOptions) -> PrepareRun:
    """Prepare each named target (the others still run when one fails) and check the results.

    Exit code 0 when every target was prepared and its check found no problem (an image count
    that differs from the card's is reported, not fatal), 1 when a check found problems, 2 when
    a target failed.
    """
    local, targets = split_local_targets(names)
    _refuse_unknown_archives(targets, options.from_archives)
    lines: list[str] = []
    outcomes, failed, errors = [], [], []
    for target in local:
        try:
            lines += [f"{target}: {line}" for line in LOCAL_TARGETS[target](options.data_root)]
        except OvsegError as exc:
            failed.append(target)
            errors.append(f"error: {target}: {exc}")
    for target in targets:
        try:
            outcomes.append(prepare_target(PLANS[target], options))
        except OvsegError as exc:
            failed.append(target)
            errors.append(f"error: {target}: {exc}")
    if outcomes:
        lines.append(format_outcomes(outcomes))
    if failed:
        errors.append(f"failed: {', '.join(failed)} (see the errors above)")
        return PrepareRun(lines, errors, 2)
    return PrepareRun(lines, errors, 1 if any(c.problems for o in outcomes for c in o.checks) else 0)


# --------------------------------------------------------------------------- in-place conversions
# Referring and COCO 2014 data have no download here (the refer toolkit's zips and COCO's
# annotations are fetched by hand); prepare converts them in place under the data root.

def _prepare_refer(dataset: str, split_by: str) -> Callable[[Path], list[str]]:
    def prepare(data_root: Path) -> list[str]:
        from .refer import convert_refs

        said: list[str] = []
        path = convert_refs(data_root, dataset, split_by, report=said.append)
        return said or [f"wrote {path}"]

    return prepare


def _prepare_coco2014(data_root: Path) -> list[str]:
    from .label_conditioned import read_instances, render_coco2014_gt, write_coco2014_split

    root, lines = Path(data_root) / "COCO2014", []
    for split in ("train", "val"):
        instances = root / "annotations" / f"instances_{split}2014.json"
        if not instances.is_file():
            raise DataError(f"{instances} not found; put COCO's annotations_trainval2014.zip contents under "
                            f"{root / 'annotations'}")
        data = read_instances(instances)
        report = render_coco2014_gt(data, root / "SegmentationClass")
        listed = write_coco2014_split(data, root / "ImageSets" / f"{split}2014.txt")
        lines.append(f"{split}2014: {report.written} GT PNG(s) written, {report.skipped} already there; "
                     f"{listed} image(s) listed in {root / 'ImageSets' / f'{split}2014.txt'}")
    return lines


LOCAL_TARGETS: dict[str, Callable[[Path], list[str]]] = {
    "refcoco": _prepare_refer("refcoco", "unc"), "refcoco+": _prepare_refer("refcoco+", "unc"),
    "refcocog": _prepare_refer("refcocog", "umd"), "coco2014": _prepare_coco2014}
LOCAL_GROUPS = {"referring": ("refcoco", "refcoco+", "refcocog")}


def split_local_targets(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(in-place targets, download targets) of the named ones; ``all`` means the downloads."""
    local: list[str] = []
    rest: list[str] = []
    for item in names:
        for name in filter(None, (part.strip() for part in item.split(","))):
            group = LOCAL_GROUPS.get(name, (name,))
            (local if all(n in LOCAL_TARGETS for n in group) else rest).extend(group)
    return list(dict.fromkeys(local)), resolve_targets(rest) if rest else []


def resolve_targets(names: Sequence[str]) -> list[str]:
    """``all`` -> every target; card names voc20/context59 -> their tree; unknown names fail."""
    chosen: list[str] = []
    for item in names:
        for name in filter(None, item.split(",")):
            if name == "all":
                chosen.extend(TARGETS)
            elif _ALIASES.get(name, name) in (*TARGETS, *EXTRA_TARGETS):
                chosen.append(_ALIASES.get(name, name))
            else:
                raise ConfigError(unknown_name_message("prepare target", name, [*TARGETS, *EXTRA_TARGETS,
                                                                                *LOCAL_TARGETS, *LOCAL_GROUPS, "all"]))
    return list(dict.fromkeys(chosen))


def _workers(requested: int | None) -> int:
    if requested is None:
        return max(1, min(os.cpu_count() or 1, 32))
    if requested < 0:
        raise ConfigError(f"--workers {requested}: expected 0 or more (0 and 1 convert in this process)")
    return max(1, requested)


def _refuse_unknown_archives(targets: list[str], from_archives: tuple[Path, ...]) -> None:
    specs = [s for t in targets for s in load_archive_manifest(PLANS[t].manifest).archives]
    unknown = unmatched_archives(from_archives, specs)
    if unknown:
        raise DataError(f"--from-archive {unknown[0]}: not an archive of {', '.join(targets)}; expected one of "
                        f"{', '.join(sorted({s.name for s in specs}))} (keep the published file name)")


def format_outcomes(outcomes: list[Outcome]) -> str:
    """What each target did, its warnings, then one check table over all their cards."""
    lines = []
    for outcome in outcomes:
        lines += [f"{outcome.target}: {step}" for step in outcome.log.done]
        lines += [f"{outcome.target}: warning: {w}" for w in outcome.log.warnings]
    checks = [c for o in outcomes for c in o.checks]
    if checks:
        lines.append(format_checks(checks))
    short = [f"{c.name} {c.num_images}/{c.num_expected}" for c in checks if not c.problems and not c.count_matches]
    if short:
        lines.append(f"note: image counts differ from the cards' ({', '.join(short)}): fine for a subset, but "
                     "such numbers are not comparable with published ones")
    return "\n".join(lines)


# --------------------------------------------------------------------------- one target

def prepare_target(plan: Plan, options: PrepareOptions) -> Outcome:
    """Run the stages of the module docstring for one target; raises DataError on failure."""
    root = load_card(plan.cards[0]).root_in(options.data_root)
    log = Log()
    _move_misplaced(plan, options.data_root, log)
    archives = _obtain(plan, options, log)
    previous = read_report(root).get(plan.target, {})
    section: dict[str, Any] = {"prepared_with": f"ovseg-bench {__version__}", "cards": list(plan.cards),
                               "split": "val", "archives": archives or previous.get("archives", [])}
    if plan.conversion is not None:
        section["conversion"] = _convert(plan, root, options, previous=previous.get("conversion", {}), log=log)
    else:
        log.done.append("GT files used as published (no conversion)")
    for name in plan.cards:
        _record_gt_checksums(name, options.data_root)
    checks = [check_dataset(load_card(name), options.data_root, deep=True) for name in plan.cards]
    section["warnings"] = log.warnings
    section["prepared_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_report(root, plan.target, section)
    log.done.append(f"recorded {REPORT_NAME} and GT checksums in {root}")
    return Outcome(plan.target, checks, log)


def _move_misplaced(plan: Plan, data_root: Path, log: Log) -> None:
    for misplaced, expected in plan.moves:
        source, target = data_root / misplaced, data_root / expected
        if source.is_dir() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            log.done.append(f"moved {source} to {target}, where the card expects it")


def _obtain(plan: Plan, options: PrepareOptions, log: Log) -> list[dict[str, Any]]:
    """Bring every archive of the plan's manifest into place; records of those handled now."""
    manifest = load_archive_manifest(plan.manifest)
    records = []
    for spec in manifest.archives:
        if _in_place(spec, options.data_root):
            continue
        if _already_converted(plan, spec, options.data_root):
            log.done.append(f"{spec.name} not fetched: the files converted from it are already complete")
            continue
        path, digests, origin = _archive_file(spec, options, manifest.notes)
        dest = options.data_root / spec.dest
        if spec.kind == "file":
            dest.mkdir(parents=True, exist_ok=True)
            if path.resolve() != (dest / spec.name).resolve():
                shutil.copyfile(path, dest / spec.name)
            log.done.append(f"placed {spec.name} in {dest}")
        else:
            count = extract(path, dest, include=spec.include, quiet=options.quiet)
            log.done.append(f"extracted {count} files from {spec.name} into {dest}")
        verified = [a for a in ("sha256", "md5") if getattr(spec, a)]
        if not verified:
            log.warnings.append(f"{spec.name} has no published checksum here; its sha256 {digests['sha256']} "
                                f"is recorded in {REPORT_NAME}: compare it with a trusted copy")
        records.append({"name": spec.name, "from": origin, "md5": digests["md5"], "sha256": digests["sha256"],
                        "verified": verified[0] if verified else "unknown checksum: not verified"})
    return records


def _in_place(spec: ArchiveSpec, data_root: Path) -> bool:
    """Everything the archive provides exists and no extraction of it was left unfinished."""
    if extraction_marker(data_root / spec.dest, spec.name).exists():
        return False
    return bool(spec.provides) and all((data_root / p).exists() for p in spec.provides)


def _already_converted(plan: Plan, spec: ArchiveSpec, data_root: Path) -> bool:
    """Whether ``spec`` feeds only the conversion and every converted file already exists.

    Idempotency without the raw input: a tree converted before (by us or by MMSegmentation's
    converter) needs no annotation download to be checked again.
    """
    complete = plan.conversion.complete if plan.conversion is not None else None
    if spec.name not in plan.raw_archives or complete is None:
        return False
    return complete(load_card(plan.cards[0]).root_in(data_root))


def _archive_file(spec: ArchiveSpec, options: PrepareOptions, notes: str) -> tuple[Path, dict[str, str], str]:
    """(verified file, its digests, where it came from) for an archive that is not in place."""
    found = find_archive(spec, options.from_archives, options.download_dir)
    if found is not None:
        origin = "--from-archive" if found in options.from_archives else "download folder"
        return found, verify_file(found, spec), origin
    if spec.manual:
        missing = ", ".join(str(options.data_root / p) for p in spec.provides)
        raise DataError(f"{missing} not found and {spec.name} cannot be downloaded automatically. {notes} "
                        f"Pass --from-archive PATH/{spec.name} (or put it in {options.download_dir}).")
    path, digests = download(spec, options.download_dir, quiet=options.quiet)
    return path, digests, spec.url or "download"


# --------------------------------------------------------------------------- conversion

def _convert(plan: Plan, root: Path, options: PrepareOptions, *, previous: dict[str, Any], log: Log) -> dict[str, Any]:
    """Run the plan's conversion unless its inputs and outputs are unchanged since the last prepare.

    Returns the report's "conversion" section; ``previous`` is that section from the last run.
    """
    conv = plan.conversion
    if conv is None:
        raise ValueError(f"target {plan.target} has no conversion")
    inputs, outputs = conv.inputs(root), conv.outputs(root)
    if not inputs:
        if outputs:
            log.done.append("raw annotations absent: checked the converted files already there")
            return {"skipped": "raw annotations absent; existing converted files kept"}
        raise DataError(f"no raw annotations to convert under {root}; the archive manifest "
                        f"{plan.manifest}.json says which archives and folders the target needs")
    fp_in, fp_out = fingerprint(root, inputs, target=plan.target), fingerprint(root, outputs, target=plan.target)
    if outputs and previous.get("inputs", {}).get("fingerprint") == fp_in \
            and previous.get("outputs", {}).get("fingerprint") == fp_out:
        log.done.append(f"up to date: {len(inputs)} raw files and {len(outputs)} converted files unchanged since "
                    "the last prepare; conversion skipped")
        log.warnings.extend(previous.get("warnings", []))
        return previous
    tasks, facts = conv.tasks(root, inputs)
    results = run_parallel(conv.worker, tasks, workers=options.workers, desc=f"{plan.target}: converting",
                           quiet=options.quiet)
    summary, found = conv.summarise(results)
    found = facts.pop("warnings", []) + found
    log.warnings.extend(found)
    statuses = Counter(status for status, _ in results)
    log.done.append(f"converted {len(results)} files: {statuses['written']} written, {statuses['kept']} already "
                "identical and kept")
    outputs = conv.outputs(root)
    return {**facts, **summary, "files": dict(sorted(statuses.items())), "warnings": found,
            "inputs": {"files": len(inputs), "fingerprint": fp_in},
            "outputs": {"files": len(outputs), "fingerprint": fingerprint(root, outputs, target=plan.target)}}


def run_parallel(worker: Callable[[Task], Result], tasks: Sequence[Task], *, workers: int, desc: str,
                 quiet: bool) -> list[Result]:
    """``worker`` over ``tasks`` in order, in a spawn-started pool when ``workers > 1``, with a bar."""
    from tqdm import tqdm

    results: list[Result] = []
    with tqdm(total=len(tasks), desc=desc, unit="file", disable=quiet, file=sys.stderr, leave=False) as bar:
        if workers <= 1 or len(tasks) < 2:
            for task in tasks:
                results.append(worker(task))
                bar.update()
            return results
        import multiprocessing

        # spawn, not fork: the CLI process may hold torch's thread pools, which fork can deadlock.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            chunk = max(1, min(64, len(tasks) // (workers * 8)))
            for result in pool.imap(worker, tasks, chunksize=chunk):
                results.append(result)
                bar.update()
    return results


def fingerprint(root: Path, files: Sequence[Path], *, target: str) -> str:
    """sha256 over (path relative to root, size, mtime) of ``files``: cheap change detection."""
    digest = hashlib.sha256(f"{target} v{CONVERTER_VERSION}\n".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def write_label(path: Path, label: np.ndarray) -> str:
    """Save a uint8 label map as an 8-bit L PNG unless ``path`` already holds exactly it.

    Returns "kept" or "written". The new file is written beside the target and renamed over
    it, so an interrupted prepare never leaves a truncated PNG under the final name.
    """
    if path.is_file():
        try:
            with Image.open(path) as img:
                if img.mode == "L" and np.array_equal(np.asarray(img), label):
                    return "kept"
        except (OSError, ValueError):
            pass  # unreadable: rewrite it
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(tmp, format="PNG")
    return "written"


def write_text_if_changed(path: Path, text: str) -> str:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return "kept"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return "written"


def read_label_png(path: Path) -> np.ndarray:
    """A raw label PNG as stored (no conversion), 2-D uint8; DataError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            label = np.array(img)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable PNG ({exc}); delete it and extract the archive again") from None
    if label.dtype != np.uint8 or label.ndim != 2:
        raise DataError(f"{path}: expected an 8-bit single-channel label map, found {label.dtype} {label.shape}")
    return label


# --------------------------------------------------------------------------- Pascal Context

CONTEXT_JSON = "trainval_merged.json"
CONTEXT_PHASES = ("train", "val")


def _context_inputs(root: Path) -> list[Path]:
    path = root / CONTEXT_JSON
    return [path] if path.is_file() else []


def _context_outputs(root: Path) -> list[Path]:
    labels = sorted((root / "SegmentationClassContext").glob("*.png"))
    splits = [root / "ImageSets" / "SegmentationContext" / f"{p}.txt" for p in CONTEXT_PHASES]
    return labels + [p for p in splits if p.is_file()]


def _context_complete(root: Path) -> bool:
    """Both split files exist, list images, and every listed image has its label PNG."""
    labels = root / "SegmentationClassContext"
    for phase in CONTEXT_PHASES:
        split = root / "ImageSets" / "SegmentationContext" / f"{phase}.txt"
        if not split.is_file():
            return False
        try:
            stems = read_split_file(split)
        except DataError:
            return False  # unreadable: converting again rewrites it
        if not stems or not all((labels / f"{stem}.png").is_file() for stem in stems):
            return False
    return True


def _context_tasks(root: Path, inputs: list[Path]) -> tuple[list[Task], dict[str, Any]]:
    """One task per train/val image of the Detail JSON, plus one per split file (as mmseg's converter)."""
    data = _load_detail_json(inputs[0])
    try:
        return _context_tasks_from(root, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{inputs[0]}: unexpected content ({type(exc).__name__}: {exc}); expected the PASCAL in "
                        "Detail annotation file: delete it and fetch it again") from None


def _context_tasks_from(root: Path, data: dict[str, Any]) -> tuple[list[Task], dict[str, Any]]:
    by_image = context_annotations(data)
    tasks: list[Task] = []
    stems: dict[str, list[str]] = {p: [] for p in CONTEXT_PHASES}
    for image in data["images"]:
        if image.get("phase") not in CONTEXT_PHASES:
            continue
        stem = Path(str(image["file_name"])).stem
        stems[image["phase"]].append(stem)
        anns = by_image.get(image["image_id"], [])
        tasks.append(("label", str(root / "SegmentationClassContext" / f"{stem}.png"),
                      int(image["height"]), int(image["width"]), anns))
    for phase, names in stems.items():
        text = "".join(f"{n}\n" for n in sorted(names))
        tasks.append(("split", str(root / "ImageSets" / "SegmentationContext" / f"{phase}.txt"), text))
    unlisted = Counter(c for anns in by_image.values() for c, _ in anns if c not in _CONTEXT_IDS)
    facts = {"rule": "Detail getMask painting in annotation order, then rank in the 60 sorted ids; other ids -> 0",
             "images": {p: len(n) for p, n in stems.items()},
             "unlisted_categories": {str(c): n for c, n in sorted(unlisted.items())},
             "warnings": _context_warnings(unlisted)}
    return tasks, facts


_CONTEXT_IDS = frozenset(converters.CONTEXT_CATEGORY_IDS)


def _load_detail_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data.get("images"), list) or not isinstance(data.get("annos_segmentation"), list):
            raise ValueError("expected the lists 'images' and 'annos_segmentation'")
        return data
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: not the PASCAL in Detail annotation file ({exc}); delete it and fetch it "
                        "again") from None


def context_annotations(data: dict[str, Any]) -> dict[Any, list[tuple[int, Any]]]:
    """image_id -> [(category_id, segmentation), ...] in the order the Detail API paints them.

    The API indexes annotations by their 'id' in a dict filled in file order, so a repeated id
    keeps its first position and its last content; painting follows that order.
    """
    by_id: dict[Any, dict[str, Any]] = {}
    for ann in data["annos_segmentation"]:
        by_id[ann["id"]] = ann
    by_image: dict[Any, list[tuple[int, Any]]] = {}
    for ann in by_id.values():
        by_image.setdefault(ann["image_id"], []).append((int(ann["category_id"]), ann["segmentation"]))
    return by_image


def _context_worker(task: Task) -> Result:
    if task[0] == "split":
        return write_text_if_changed(Path(task[1]), task[2]), {}
    _, out, height, width, anns = task
    try:
        label = converters.context_label_map(height, width, anns)
    except DataError as exc:
        raise DataError(f"{CONTEXT_JSON}, image {Path(out).stem}: {exc}") from None
    return write_label(Path(out), label), {}


def _no_summary(results: list[Result]) -> tuple[dict[str, Any], list[str]]:
    return {}, []


def _context_warnings(unlisted: Counter) -> list[str]:
    if not unlisted:
        return []
    ids = ", ".join(str(c) for c in sorted(unlisted)[:8])
    return [f"{sum(unlisted.values())} annotations of {len(unlisted)} Detail categories outside the 59 classes "
            f"(ids {ids}) were painted and mapped to background 0; MMSegmentation's converter stops on such "
            "annotations"]


# --------------------------------------------------------------------------- COCO-Stuff / COCO-Object

def _coco_inputs(root: Path) -> list[Path]:
    # The raw maps: PNGs without "TrainIds" in the name, as the reference converters select them.
    folder = root / "annotations" / "val2017"
    return sorted(p for p in folder.glob("*.png") if "TrainIds" not in p.name) if folder.is_dir() else []


def _coco_outputs_for(suffix: str) -> Callable[[Path], list[Path]]:
    def outputs(root: Path) -> list[Path]:
        return sorted((root / "annotations" / "val2017").glob(f"*{suffix}"))
    return outputs


COCO_RULES = {
    "stuff": "raw value (COCO id - 1) -> rank among the 171 used values (0..170); 255 and unused values -> 255",
    "object": "raw thing values 0..89 -> rank among the 80 used ones + 1 (1..80); stuff, 255 and anything else -> 0 "
              "(the TCL-lineage convert_coco_object.py rule)",
}


def _coco_tasks_for(kind: str, suffix: str) -> Callable[[Path, list[Path]], tuple[list[Task], dict[str, Any]]]:
    def tasks(root: Path, inputs: list[Path]) -> tuple[list[Task], dict[str, Any]]:
        return [(kind, str(p), str(p.with_name(p.stem + suffix))) for p in inputs], {"rule": COCO_RULES[kind]}
    return tasks


def _coco_worker(task: Task) -> Result:
    kind, raw_path, out = task
    raw = read_label_png(Path(raw_path))
    label = converters.coco_stuff_train_ids(raw) if kind == "stuff" else converters.coco_object_ids(raw)
    return write_label(Path(out), label), {"unexpected": converters.unexpected_coco_values(raw)}


def _coco_summary(results: list[Result]) -> tuple[dict[str, Any], list[str]]:
    odd = sorted({v for _, facts in results for v in facts["unexpected"]})
    files = sum(1 for _, facts in results if facts["unexpected"])
    if not odd:
        return {"unexpected_raw_values": []}, []
    return {"unexpected_raw_values": odd}, [
        f"{files} raw maps hold values the published maps never hold ({', '.join(map(str, odd[:10]))}); they "
        "were mapped to 255 (coco_stuff) or 0 (coco_object)"]


# --------------------------------------------------------------------------- Cityscapes

CITYSCAPES_POLYGONS = "_gtFine_polygons.json"
CITYSCAPES_LABEL_IDS = "_gtFine_labelIds.png"
CITYSCAPES_TRAIN_IDS = "_gtFine_labelTrainIds.png"


def _cityscapes_inputs(root: Path) -> list[Path]:
    folder = root / "gtFine" / "val"
    if not folder.is_dir():
        return []
    return sorted([*folder.rglob(f"*{CITYSCAPES_POLYGONS}"), *folder.rglob(f"*{CITYSCAPES_LABEL_IDS}")])


def _cityscapes_outputs(root: Path) -> list[Path]:
    folder = root / "gtFine" / "val"
    return sorted(folder.rglob(f"*{CITYSCAPES_TRAIN_IDS}")) if folder.is_dir() else []


def _cityscapes_tasks(root: Path, inputs: list[Path]) -> tuple[list[Task], dict[str, Any]]:
    """One task per image stem: its polygons if present (preferred, as mmseg's converter), else its label ids."""
    sources: dict[str, tuple[str, Path]] = {}
    for path in inputs:
        for suffix, kind in ((CITYSCAPES_POLYGONS, "polygons"), (CITYSCAPES_LABEL_IDS, "label_ids")):
            if path.name.endswith(suffix):
                stem = str(path)[: -len(suffix)]
                if stem not in sources or kind == "polygons":
                    sources[stem] = (kind, path)
    return [(kind, str(path), stem + CITYSCAPES_TRAIN_IDS) for stem, (kind, path) in sorted(sources.items())], {}


def _cityscapes_worker(task: Task) -> Result:
    kind, source, out = task
    if kind == "polygons":
        try:
            annotation = json.loads(Path(source).read_text(encoding="utf-8"))
            label = converters.cityscapes_train_ids_from_polygons(annotation)
        except (OSError, ValueError, DataError) as exc:
            raise DataError(f"{source}: {exc}") from None
    else:
        label = converters.cityscapes_train_ids_from_label_ids(read_label_png(Path(source)))
    return write_label(Path(out), label), {"source": kind}


def _cityscapes_summary(results: list[Result]) -> tuple[dict[str, Any], list[str]]:
    used = Counter(facts["source"] for _, facts in results)
    summary = {"gt_source": {"polygons": used["polygons"], "label_ids": used["label_ids"]},
               "gt_source_note": "train ids rendered from *_gtFine_polygons.json as cityscapesscripts' "
                                 "json2labelImg does; where only *_gtFine_labelIds.png existed, remapped from it"}
    warnings = []
    if used["label_ids"]:
        warnings.append(f"{used['label_ids']} of {len(results)} Cityscapes GT files were remapped from "
                        "_gtFine_labelIds.png (no polygon file); they differ from the reference along some "
                        "object edges (cityscapesScripts#29)")
    return summary, warnings


# --------------------------------------------------------------------------- Cityscapes-27 (label ids)
# ReCo reads the label-id PNGs that ship with gtFine. They are never rewritten; only where a stem has
# polygons and no label-id PNG are label ids rendered (json2labelImg, encoding 'ids'). Which files were
# rendered is recorded, so reruns count them as rendered, re-render them when the polygons change and
# leave them out of the inputs' fingerprint (they are outputs).

CITYSCAPES27 = "cityscapes27"


def _rendered_label_ids(root: Path) -> set[str]:
    """Label-id PNGs (relative to the dataset root) an earlier prepare rendered from polygons."""
    conversion = read_report(root).get(CITYSCAPES27, {}).get("conversion", {})
    rendered = conversion.get("rendered_from_polygons", []) if isinstance(conversion, dict) else []
    return {str(p) for p in rendered} if isinstance(rendered, list) else set()


def _cityscapes27_inputs(root: Path) -> list[Path]:
    """The polygon files and the shipped label-id PNGs (not those rendered by an earlier prepare)."""
    rendered = _rendered_label_ids(root)
    return [p for p in _cityscapes_inputs(root) if p.relative_to(root).as_posix() not in rendered]


def _cityscapes27_outputs(root: Path) -> list[Path]:
    folder = root / "gtFine" / "val"
    return sorted(folder.rglob(f"*{CITYSCAPES_LABEL_IDS}")) if folder.is_dir() else []


def _cityscapes27_tasks(root: Path, inputs: list[Path]) -> tuple[list[Task], dict[str, Any]]:
    """Per stem: keep its label-id PNG if shipped; else render one from its polygons."""
    rendered = _rendered_label_ids(root)
    polygons = {str(p)[: -len(CITYSCAPES_POLYGONS)]: p for p in inputs if p.name.endswith(CITYSCAPES_POLYGONS)}
    stems = sorted({*polygons, *(str(p)[: -len(CITYSCAPES_LABEL_IDS)] for p in _cityscapes27_outputs(root))})
    tasks: list[Task] = []
    for stem in stems:
        out = Path(stem + CITYSCAPES_LABEL_IDS)
        rel = out.relative_to(root).as_posix()
        if stem in polygons and (rel in rendered or not out.is_file()):
            tasks.append(("polygons", str(polygons[stem]), str(out), rel))
        else:  # shipped (or rendered before from polygons that are gone): left as it is
            tasks.append(("keep", "", str(out), rel if rel in rendered else None))
    return tasks, {"rule": "label ids as shipped in *_gtFine_labelIds.png; where absent, rendered from "
                           "*_gtFine_polygons.json as cityscapesscripts' json2labelImg does with encoding 'ids'"}


def _cityscapes27_worker(task: Task) -> Result:
    kind, source, out, rel = task
    if kind == "keep":
        return "kept", {"source": "polygons" if rel else "label_ids", "rendered": rel}
    try:
        annotation = json.loads(Path(source).read_text(encoding="utf-8"))
        label = converters.cityscapes_label_ids_from_polygons(annotation)
    except (OSError, ValueError, DataError) as exc:
        raise DataError(f"{source}: {exc}") from None
    return write_label(Path(out), label), {"source": "polygons", "rendered": rel}


def _cityscapes27_summary(results: list[Result]) -> tuple[dict[str, Any], list[str]]:
    used = Counter(facts["source"] for _, facts in results)
    rendered = sorted(facts["rendered"] for _, facts in results if facts["rendered"])
    summary = {"gt_source": {"label_ids": used["label_ids"], "polygons": used["polygons"]},
               "gt_source_note": "label ids as shipped in *_gtFine_labelIds.png (never rewritten); where only "
                                 "*_gtFine_polygons.json existed, rendered from it (listed in rendered_from_polygons)",
               "rendered_from_polygons": rendered}
    warnings = []
    if rendered:
        warnings.append(f"{len(rendered)} of {len(results)} Cityscapes label-id files were rendered from "
                        "_gtFine_polygons.json (no shipped _gtFine_labelIds.png); the shipped files ReCo reads differ "
                        "from such renderings along some object edges (cityscapesScripts#29)")
    return summary, warnings


# --------------------------------------------------------------------------- GT checksums and the report

def _record_gt_checksums(card_name: str, data_root: Path) -> None:
    """Write the sha256 of every listed GT file of ``card_name`` into its root's manifest."""
    card = load_card(card_name)
    try:
        samples = list_samples(card, data_root)
    except DataError:
        return  # the check that follows names what is missing
    root = card.root_in(data_root)
    files = {s.gt_path.relative_to(root).as_posix(): hashlib.sha256(s.gt_path.read_bytes()).hexdigest()
             for s in samples if s.gt_path.is_file()}
    write_gt_manifest(root, card, files)


def read_report(root: Path) -> dict[str, dict[str, Any]]:
    """target -> its section of ``ovseg_prepare.json`` in a dataset root ({} if absent or foreign)."""
    path = Path(root) / REPORT_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("targets", {}) if isinstance(data, dict) and data.get("schema") == REPORT_SCHEMA else {}


def write_report(root: Path, target: str, section: dict[str, Any]) -> None:
    targets = read_report(root)
    targets[target] = section
    payload = {"schema": REPORT_SCHEMA, "targets": dict(sorted(targets.items()))}
    atomic_write(Path(root) / REPORT_NAME, json.dumps(payload, indent=1) + "\n")


# --------------------------------------------------------------------------- the plans

_COCO_STUFF_CONVERSION = Conversion(
    _coco_inputs, _coco_outputs_for("_labelTrainIds.png"), _coco_tasks_for("stuff", "_labelTrainIds.png"),
    _coco_worker, _coco_summary)

PLANS: dict[str, Plan] = {
    "voc": Plan("voc", ("voc", "voc20"), "voc", moves=(("VOC2012", "VOCdevkit/VOC2012"),)),
    "context": Plan("context", ("context", "context59"), "context", Conversion(
        _context_inputs, _context_outputs, _context_tasks, _context_worker, _no_summary, _context_complete),
        moves=(("VOC2010", "VOCdevkit/VOC2010"),), raw_archives=(CONTEXT_JSON,)),
    "coco_stuff": Plan("coco_stuff", ("coco_stuff",), "coco_stuff", _COCO_STUFF_CONVERSION),
    "coco_object": Plan("coco_object", ("coco_object",), "coco_stuff", Conversion(
        _coco_inputs, _coco_outputs_for("_instanceTrainIds.png"), _coco_tasks_for("object", "_instanceTrainIds.png"),
        _coco_worker, _coco_summary)),
    "cityscapes": Plan("cityscapes", ("cityscapes",), "cityscapes", Conversion(
        _cityscapes_inputs, _cityscapes_outputs, _cityscapes_tasks, _cityscapes_worker, _cityscapes_summary)),
    "ade20k": Plan("ade20k", ("ade20k",), "ade20k", moves=(("ADEChallengeData2016", "ade/ADEChallengeData2016"),)),
    # The ReCo benchmarks: coco_stuff's train ids (the card maps them to 27 classes), Cityscapes' label ids.
    "coco_stuff27": Plan("coco_stuff27", ("coco_stuff27",), "coco_stuff", _COCO_STUFF_CONVERSION),
    CITYSCAPES27: Plan(CITYSCAPES27, (CITYSCAPES27,), "cityscapes", Conversion(
        _cityscapes27_inputs, _cityscapes27_outputs, _cityscapes27_tasks, _cityscapes27_worker, _cityscapes27_summary)),
}
