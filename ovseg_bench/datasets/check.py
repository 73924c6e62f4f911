"""`data check`: is each dataset where its card says, and complete?

The quick check looks at existence and counts only (no decoding), so it takes seconds on the
real datasets. It never raises for missing data: everything it finds goes into
``DatasetCheck.problems``. Deeper checks (GT value sets, image/GT sizes, EXIF orientation,
reference/protocol.md §9.14) are meant to be added as further steps in ``_STEPS`` that take
the listed samples and return problem strings.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..resources import cards_dir
from .cards import DatasetCard
from .listing import SampleRef, layout_paths, list_samples, missing_gt, path_exists

SHOW_FIRST = 5  # missing file names shown per problem; the count is always given


@dataclass(frozen=True)
class DatasetCheck:
    """What ``check_dataset`` found for one card."""

    name: str
    root: Path                 # the split's root folder under the data root
    found: bool                # whether that folder exists
    problems: list[str]        # missing pieces; empty when the layout is complete
    num_images: int            # images found on disk
    num_expected: int          # images the split should have (the card's num_images)

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


def check_dataset(card: DatasetCard, data_root: Path, *, num_expected: int | None = None) -> DatasetCheck:
    """Check that ``card``'s split is on disk under ``data_root``: folders, split file, files.

    ``num_expected`` overrides the card's image count (e.g. for a known subset or a synthetic
    tree). Images are counted whenever they can be listed, even if other pieces are missing.
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
        problems.append(_nothing_listed(card, root))
    if samples:
        for step in _STEPS:
            problems.extend(step(card, root, samples))
    expected = card.num_images if num_expected is None else num_expected
    return DatasetCheck(card.name, root, root.is_dir(), problems, len(samples) - len(gone), expected)


def _layout_problems(card: DatasetCard, data_root: Path, root: Path) -> list[str]:
    """Missing folders and split file, each named with its full path.

    A missing data root or dataset folder is reported alone: everything inside is missing too.
    """
    pieces = layout_paths(card, data_root) + [("GT folder", root / card.ann_dir)]
    missing = [(what, path) for what, path in pieces if not path_exists(what, path)]
    if missing and missing[0][0] == "data root":
        return [f"data root {data_root} does not exist; pass --data-root DIR or set $OVSEG_DATA"]
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


def _nothing_listed(card: DatasetCard, root: Path) -> str:
    """Why a complete layout yielded no sample: an empty split file or no matching image names."""
    if card.split_file is not None:
        return f"split file {root / card.split_file} lists no images"
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
    """A plain-text table: dataset | root | images found / expected | status | problems."""
    from tabulate import tabulate  # only the CLI prints tables

    rows = [
        [c.name, str(c.root), f"{c.num_images} / {c.num_expected}", c.status, "; ".join(c.problems) or "-"]
        for c in checks
    ]
    headers = ["dataset", "root", "images found / expected", "status", "problems"]
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
