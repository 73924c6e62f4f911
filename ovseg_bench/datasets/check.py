"""`data check`: is each dataset where its card says, and complete?

The quick check looks at existence and counts only (no decoding), so it takes seconds on the
real datasets. It never raises for missing data: everything it finds goes into
``DatasetCheck.problems``.

``deep=True`` (``data check --deep``) also reads every listed pair once: the image's size from
its header with the EXIF Orientation applied (images whose Orientation is not 1 are counted and
named), the GT's size, that the GT is a single-channel 8-bit map whose values lie in
0..``raw_label_max`` (plus 255 only where the card's ``gt_has_ignore``; on Pascal Context, whose
card has none, a 255 is reported as information, since the run ignores it like mmseg), and the
GT's sha256 against a checksum manifest: one shipped as ``datasets/manifests/gt/<card>.json`` if
it exists (the reference conversion), else the ``ovseg_gt_sha256.json`` that ``data prepare``
writes in the dataset's root folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..resources import cards_dir
from .cards import DatasetCard
from .listing import SampleRef, data_root_hint, layout_paths, list_samples, missing_gt, path_exists, split_path
from ..atomic import atomic_write

SHOW_FIRST = 5  # missing file names shown per problem; the count is always given

GT_MANIFEST_NAME = "ovseg_gt_sha256.json"
GT_MANIFEST_SCHEMA = "ovseg-bench/gt-sha256/1"
EXIF_ORIENTATION = 0x0112

# Cards whose GT should hold no ignore value, yet where some published or converted copies do
# (Pascal Context label sets from other converters mark unlabelled pixels 255). The run ignores
# 255 on every card as mmseg does (loader and metrics), so here it is information, not an error;
# the other cards without ignore keep refusing it (a 255 there means a wrong conversion).
IGNORE_NOTED = frozenset({"context", "context59"})


@dataclass(frozen=True)
class DatasetCheck:
    """What ``check_dataset`` found for one card."""

    name: str
    root: Path                 # the split's root folder under the data root
    found: bool                # whether that folder exists
    problems: list[str]        # missing pieces; empty when the layout is complete
    num_images: int            # images found on disk
    num_expected: int          # images the split should have (the card's num_images)
    notes: tuple[str, ...] = ()         # facts that are not problems (EXIF rotations, checksum source)
    exif_rotated: tuple[str, ...] = ()  # image ids whose EXIF Orientation is not 1 (deep check only)
    deep: bool = False                  # whether the deep checks ran

    @property
    def count_matches(self) -> bool:
        return self.num_images == self.num_expected

    @property
    def ok(self) -> bool:
        """Usable for a comparable run: complete layout and the expected number of images."""
        return self.found and not self.problems and self.count_matches

    @property
    def status(self) -> str:
        """One word for the table: ok, missing, problems, or count mismatch."""
        if not self.found:
            return "missing"
        if self.problems:
            return "problems"
        return "ok" if self.count_matches else "count mismatch"


Step = Callable[[DatasetCard, Path, list[SampleRef]], list[str]]


def check_dataset(card: DatasetCard, data_root: Path, *, num_expected: int | None = None,
                  deep: bool = False) -> DatasetCheck:
    """Check that ``card``'s split is on disk under ``data_root``: folders, split file, files.

    ``num_expected`` overrides the card's image count (e.g. for a known subset or a synthetic
    tree). Images are counted whenever they can be listed, even if other pieces are missing.
    ``deep`` adds the per-file checks of the module docstring (it decodes every GT file).
    """
    data_root = Path(data_root)
    root = card.root_in(data_root)
    problems = _layout_problems(card, data_root, root)
    samples = _try_listing(card, data_root, problems)
    # A scan lists only existing images; a split file may name absent ones.
    gone = [s for s in samples if not s.image_path.is_file()] if card.split_file else []
    if gone:
        problems.append(_summarise(gone, len(samples), "images", root / card.img_dir, lambda s: s.image_path))
    if not samples and not problems:
        problems.append(_nothing_listed(card, data_root, root))
    if samples:
        for step in _STEPS:
            problems.extend(step(card, root, samples))
    findings = _deep_check(card, root, samples) if deep and samples else DeepFindings()
    problems.extend(findings.problems)
    expected = card.num_images if num_expected is None else num_expected
    notes = _split_note(card, data_root) + findings.notes
    return DatasetCheck(card.name, root, root.is_dir(), problems, len(samples) - len(gone), expected,
                        notes=notes, exif_rotated=findings.exif_rotated, deep=deep)


def _split_note(card: DatasetCard, data_root: Path) -> tuple[str, ...]:
    """A note when listing reads the card's shipped copy of its split file (none under the data root)."""
    split, local = split_path(card, data_root), card.root_in(data_root) / (card.split_file or "")
    if split is None or split == local:
        return ()
    return (f"split list read from the copy shipped with the card, {split} (no {local})",)


def _layout_problems(card: DatasetCard, data_root: Path, root: Path) -> list[str]:
    """Missing folders and split file, each named with its full path.

    A missing data root or dataset folder is reported alone: everything inside is missing too.
    """
    pieces = layout_paths(card, data_root) + [("GT folder", root / card.ann_dir)]
    missing = [(what, path) for what, path in pieces if not path_exists(what, path)]
    if missing and missing[0][0] == "data root":
        return [f"data root {data_root} does not exist; {data_root_hint(data_root)}"]
    if missing and missing[0][0] == "dataset folder":
        missing = missing[:1]
    return [f"{what} {path} not found" for what, path in missing]


def _try_listing(card: DatasetCard, data_root: Path, problems: list[str]) -> list[SampleRef]:
    """The split's samples, or none when listing is impossible (its cause is added to problems)."""
    try:
        return list_samples(card, data_root)
    except DataError as exc:
        if not problems:  # otherwise the layout problem already says what is missing
            problems.append(str(exc))
        return []


def _nothing_listed(card: DatasetCard, data_root: Path, root: Path) -> str:
    """Why a complete layout yielded no sample: an empty split file or no matching image names."""
    if card.split_file is not None:
        return f"split file {split_path(card, data_root)} lists no images"
    return f"no images with names ending in '{card.img_suffix}' in {root / card.img_dir}"


def _missing_gt(card: DatasetCard, root: Path, samples: list[SampleRef]) -> list[str]:
    """GT files absent for listed images; skipped when the whole GT folder is missing."""
    if not (root / card.ann_dir).is_dir():
        return []
    gone = missing_gt(samples)
    if not gone:
        return []
    if len(gone) == len(samples):  # typically a converter not run yet: say how the files are made
        return [
            f"none of the {len(samples)} GT files (<id>{card.gt_suffix}) exist in {root / card.ann_dir}; "
            f"the notes in {cards_dir() / (card.name + '.yaml')} say how they are produced"
        ]
    return [_summarise(gone, len(samples), "GT files", root / card.ann_dir, lambda s: s.gt_path)]


def _summarise(gone: list[SampleRef], total: int, what: str, folder: Path,
               path_of: Callable[[SampleRef], Path]) -> str:
    """"3 of 1449 GT files missing in <folder>: a.png, b.png, ..." with the first few names."""
    names = [path_of(s).relative_to(folder).as_posix() for s in gone[:SHOW_FIRST]]
    more = ", ..." if len(gone) > SHOW_FIRST else ""
    return f"{len(gone)} of {total} {what} missing in {folder}: {', '.join(names)}{more}"


# Quick steps, in report order; deep checks append here (each gets the listed samples).
_STEPS: tuple[Step, ...] = (_missing_gt,)


def format_checks(checks: Sequence[DatasetCheck]) -> str:
    """A plain-text table: dataset | root | images found / expected | status | problems [| notes].

    The notes column appears only when a check has notes (deep checks always do).
    """
    from tabulate import tabulate  # only the CLI prints tables

    with_notes = any(c.notes for c in checks)
    rows = []
    for c in checks:
        row = [c.name, str(c.root), f"{c.num_images} / {c.num_expected}", c.status, "; ".join(c.problems) or "-"]
        rows.append(row + ["; ".join(c.notes) or "-"] if with_notes else row)
    headers = ["dataset", "root", "images found / expected", "status", "problems"] + (["notes"] if with_notes else [])
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


# --------------------------------------------------------------------------- deep check

@dataclass(frozen=True)
class DeepFindings:
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    exif_rotated: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Facts:
    """What one header/GT read found for one sample (None where the file was not read)."""

    image_size: tuple[int, int] | None = None   # (width, height) after EXIF orientation
    orientation: int = 1
    gt_size: tuple[int, int] | None = None      # (width, height)
    gt_mode: str | None = None                  # None when the GT is a 2-D uint8 map
    bad_values: tuple[int, ...] = ()
    has_ignore: bool = False                    # the card's ignore value occurs in the GT
    sha256: str | None = None
    error: str | None = None


def _deep_check(card: DatasetCard, root: Path, samples: list[SampleRef]) -> DeepFindings:
    """Size, value-set, EXIF and checksum checks over every listed sample with a GT file."""
    present = [s for s in samples if s.gt_path.is_file() and s.image_path.is_file()]
    allowed = np.zeros(256, dtype=bool)
    allowed[: card.raw_label_max + 1] = True
    if card.gt_has_ignore or card.name in IGNORE_NOTED:
        allowed[card.ignore_index] = True
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        facts = list(pool.map(lambda s: _inspect(s, allowed, card.ignore_index), present))
    problems = _fact_problems(card, root, present, facts)
    ignore_note = _ignore_note(card, facts)
    try:
        manifest, source = load_gt_manifest(card, root)
    except DataError as exc:
        return DeepFindings(tuple(problems + [str(exc)]), tuple(ignore_note))
    if manifest is None:
        notes = [f"GT checksums not verified: no {GT_MANIFEST_NAME} (`ovseg-bench data prepare` writes it)"]
    else:
        problems += _checksum_problems(root, present, facts, manifest, source)
        notes = [f"GT sha256 checked against {source}"]
    notes[:0] = ignore_note
    rotated = [(s, f) for s, f in zip(present, facts) if f.orientation != 1]
    if rotated:
        named = ", ".join(f"{s.image_path.name} ({f.orientation})" for s, f in rotated[:SHOW_FIRST])
        more = ", ..." if len(rotated) > SHOW_FIRST else ""
        notes.insert(0, f"{len(rotated)} image(s) carry an EXIF Orientation other than 1 and are read "
                        f"rotated, as the reference decoder does: {named}{more}")
    return DeepFindings(tuple(problems), tuple(notes), tuple(s.image_id for s, _ in rotated))


def _inspect(sample: SampleRef, allowed: np.ndarray, ignore_index: int) -> _Facts:
    """Read the image header and the GT file once: sizes, orientation, mode, values, sha256."""
    from PIL import Image

    try:
        with Image.open(sample.image_path) as img:
            width, height = img.size
            orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (OSError, ValueError) as exc:
        return _Facts(error=f"image {sample.image_path.name} unreadable ({exc})")
    image_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    try:
        data = sample.gt_path.read_bytes()
        with Image.open(io.BytesIO(data)) as gt_img:
            gt_size, mode = gt_img.size, gt_img.mode
            gt = np.array(gt_img)  # as mmseg's LoadAnnotations: no conversion, palette indices for VOC
    except (OSError, ValueError) as exc:
        return _Facts(image_size, orientation, error=f"GT {sample.gt_path.name} unreadable ({exc})")
    sha = hashlib.sha256(data).hexdigest()
    if gt.dtype != np.uint8 or gt.ndim != 2:
        return _Facts(image_size, orientation, gt_size, gt_mode=f"mode {mode}", sha256=sha)
    counts = np.bincount(gt.ravel(), minlength=256)
    bad = tuple(int(v) for v in np.flatnonzero(counts) if not allowed[v])
    return _Facts(image_size, orientation, gt_size, None, bad, bool(counts[ignore_index]), sha)


def _fact_problems(card: DatasetCard, root: Path, samples: list[SampleRef], facts: list[_Facts]) -> list[str]:
    """Unreadable files, size mismatches, non-label GT files and out-of-range values, summarised."""
    folder = root / card.ann_dir
    total = len(samples)
    groups: list[tuple[str, list[str]]] = [
        ("unreadable files", [f.error for f in facts if f.error]),
        ("GT files whose size differs from their image's (width x height, image after EXIF)",
         [f"{s.gt_path.relative_to(folder).as_posix()} (GT {f.gt_size[0]}x{f.gt_size[1]}, image "
          f"{f.image_size[0]}x{f.image_size[1]})"
          for s, f in zip(samples, facts) if not f.error and f.gt_size != f.image_size]),
        ("GT files that are not single-channel 8-bit label maps",
         [f"{s.gt_path.relative_to(folder).as_posix()} ({f.gt_mode})" for s, f in zip(samples, facts) if f.gt_mode]),
        (f"GT files with values outside {_allowed_text(card)}",
         [f"{s.gt_path.relative_to(folder).as_posix()} (values {', '.join(map(str, f.bad_values[:8]))})"
          for s, f in zip(samples, facts) if f.bad_values]),
    ]
    problems = []
    for what, items in groups:
        if items:
            more = ", ..." if len(items) > SHOW_FIRST else ""
            problems.append(f"{len(items)} of {total} {what}: {', '.join(items[:SHOW_FIRST])}{more}")
    return problems


def _allowed_text(card: DatasetCard) -> str:
    if card.gt_has_ignore:
        return f"0..{card.raw_label_max} and {card.ignore_index}"
    if card.name in IGNORE_NOTED:
        return f"0..{card.raw_label_max} (and {card.ignore_index}, ignored)"
    return f"0..{card.raw_label_max} (no {card.ignore_index})"


def _ignore_note(card: DatasetCard, facts: list[_Facts]) -> list[str]:
    """"info: 255 (ignore) in N of M GT files ..." for the cards of IGNORE_NOTED; else nothing."""
    if card.name not in IGNORE_NOTED:
        return []
    found = sum(1 for f in facts if f.has_ignore)
    if not found:
        return []
    return [f"info: {card.ignore_index} (ignore) in {found} of {len(facts)} GT files; the card expects none, "
            "and the run ignores those pixels as MMSegmentation does"]


def _checksum_problems(root: Path, samples: list[SampleRef], facts: list[_Facts],
                       manifest: dict[str, str], source: Path) -> list[str]:
    """GT files whose sha256 differs from the manifest's, and listed GT files it does not name."""
    differ, absent = [], []
    for sample, fact in zip(samples, facts):
        key = sample.gt_path.relative_to(root).as_posix()
        if key not in manifest:
            absent.append(key)
        elif fact.sha256 is not None and fact.sha256 != manifest[key]:
            differ.append(key)
    problems = []
    for items, what in ((differ, f"GT files differ from the checksums in {source}"),
                        (absent, f"GT files are not in the checksum manifest {source}")):
        if items:
            more = ", ..." if len(items) > SHOW_FIRST else ""
            problems.append(f"{len(items)} of {len(samples)} {what}: {', '.join(items[:SHOW_FIRST])}{more}")
    if differ:
        problems.append("rerun `ovseg-bench data prepare` to rewrite the converted files")
    return problems


# --------------------------------------------------------------------------- GT checksum manifests

def shipped_gt_manifest(card: DatasetCard) -> Path:
    """Where a reference manifest of ``card``'s converted GT files would be shipped."""
    return cards_dir() / "manifests" / "gt" / f"{card.name}.json"


def local_gt_manifest(root: Path) -> Path:
    """The manifest ``data prepare`` writes in a dataset's root folder (one per root, all its cards)."""
    return Path(root) / GT_MANIFEST_NAME


def load_gt_manifest(card: DatasetCard, root: Path) -> tuple[dict[str, str] | None, Path]:
    """(GT path relative to the dataset root -> sha256, its file) for ``card``; shipped first.

    Returns (None, path looked at last) when neither file has an entry for the card.
    """
    for path in (shipped_gt_manifest(card), local_gt_manifest(root)):
        entries = read_gt_manifest(path).get(card.name) if path.is_file() else None
        if entries is not None:
            return entries, path
    return None, local_gt_manifest(root)


def read_gt_manifest(path: Path) -> dict[str, dict[str, str]]:
    """card name -> {relative GT path: sha256}. Raises DataError naming a malformed file.

    Format: ``{"schema": "ovseg-bench/gt-sha256/1", "cards": {"<card>": {"split": "val",
    "files": {"<path relative to the dataset root>": "<sha256 hex>"}}}}``.
    """
    return {name: dict(entry["files"]) for name, entry in _read_manifest_cards(path).items()}


def _read_manifest_cards(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("schema") != GT_MANIFEST_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}")
        cards = data["cards"]
        if not all(isinstance(e, dict) and isinstance(e["files"], dict) for e in cards.values()):
            raise ValueError("each card needs a 'files' mapping")
        return cards
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a GT checksum manifest of schema '{GT_MANIFEST_SCHEMA}' ({exc}); "
                        "delete it and rerun `ovseg-bench data prepare`") from None


def write_gt_manifest(root: Path, card: DatasetCard, files: dict[str, str]) -> Path:
    """Set ``card``'s entries in the dataset root's manifest (other cards kept); atomic write."""
    path = local_gt_manifest(root)
    cards = _read_manifest_cards(path) if path.is_file() else {}
    cards[card.name] = {"split": card.split, "files": dict(sorted(files.items()))}
    payload = {"schema": GT_MANIFEST_SCHEMA, "cards": dict(sorted(cards.items()))}
    atomic_write(path, json.dumps(payload, indent=1) + "\n")
    return path



