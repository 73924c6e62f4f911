"""Which images a dataset card's split holds, in the order the references evaluate them.

The order matters: float32 metric totals are summed image by image in this order (mmseg's
``IoUMetric.compute_metrics`` adds the per-image vectors with ``sum``), so it must be exactly
MMSegmentation's (``BaseSegDataset.load_data_list`` in mmseg/datasets/basesegdataset.py):

- with a split file, its lines in file order; image = ``img_dir/<line><img_suffix>`` and
  GT = ``ann_dir/<line><gt_suffix>``. The split file is the one under the data root; a card with a
  ``shipped_split_file`` falls back to that copy (shipped beside the cards) when it is absent there;
- without one, a recursive scan of ``img_dir`` for files whose name ends in ``img_suffix``
  (case-sensitive), sorted by relative path; the GT has the same relative path with the image
  suffix replaced by the GT suffix, under ``ann_dir``.

Listing only touches directories; GT files are checked by :func:`missing_gt` or at read time.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..resources import cards_dir
from .cards import DatasetCard

DEFAULT_DATA_ROOT = Path("data")  # what the CLI uses without --data-root and $OVSEG_DATA


@dataclass(frozen=True)
class SampleRef:
    """One image of a split and where its ground truth should be."""

    image_id: str      # split-file entry, or the image's path relative to img_dir minus img_suffix
    image_path: Path
    gt_path: Path


def list_samples(card: DatasetCard, data_root: Path) -> list[SampleRef]:
    """Every image of ``card``'s split under ``data_root``, in MMSegmentation's order.

    Raises DataError naming the first missing piece (data root, dataset folder, image folder or
    split file) and how the layout should look. GT files are not checked here.
    """
    root = require_layout(card, data_root)
    img_dir, ann_dir = root / card.img_dir, root / card.ann_dir
    split = split_path(card, data_root)
    if split is not None:
        ids = read_split_file(split)
    else:
        ids = scan_image_ids(img_dir, card.img_suffix)
    return [
        SampleRef(i, img_dir / f"{i}{card.img_suffix}", ann_dir / f"{i}{card.gt_suffix}")
        for i in ids
    ]


def split_path(card: Any, data_root: Path) -> Path | None:
    """The split file listing reads, or None for a card listed by a directory scan.

    The card's ``split_file`` under the data root when it exists there; otherwise its
    ``shipped_split_file`` (relative to the cards folder) when the card has one and it exists; otherwise
    the data-root path, which is then reported missing.
    """
    if getattr(card, "split_file", None) is None:
        return None
    local = card.root_in(Path(data_root)) / card.split_file
    shipped = getattr(card, "shipped_split_file", None)
    if local.is_file() or shipped is None or not (cards_dir() / shipped).is_file():
        return local
    return cards_dir() / shipped


def split_file_used(card: Any, data_root: Path) -> tuple[Path, str] | None:
    """(path, sha256 hex of its bytes) of the split file listing reads (see :func:`split_path`), or None
    for a card listed by a directory scan. Raises DataError naming the file when it cannot be read."""
    path = split_path(card, data_root)
    if path is None:
        return None
    try:
        return path, hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the split file ({exc}); `ovseg-bench data check {card.name}` "
                        "shows what is in place") from None


def missing_gt(samples: list[SampleRef]) -> list[SampleRef]:
    """The samples whose GT file does not exist, in listing order."""
    return [s for s in samples if not s.gt_path.is_file()]


def layout_paths(card: DatasetCard, data_root: Path) -> list[tuple[str, Path]]:
    """What listing needs, outermost first: (what, path) for the data root (unless the card is
    embedded), the dataset folder, the image folder and the split file (if the card has one: the
    file :func:`split_path` chooses, so a shipped copy stands in for an absent one)."""
    root = card.root_in(Path(data_root))
    paths = [] if card.embedded else [("data root", Path(data_root))]
    paths += [("dataset folder", root), ("image folder", root / card.img_dir)]
    split = split_path(card, data_root)
    if split is not None:
        paths.append(("split file", split))
    return paths


def path_exists(what: str, path: Path) -> bool:
    """Whether a layout piece exists with the right kind (the split file is a file, the rest folders)."""
    return path.is_file() if what == "split file" else path.is_dir()


def require_layout(card: DatasetCard, data_root: Path) -> Path:
    """The split's root folder, after checking that everything listing needs exists."""
    missing = first_missing(card, data_root)
    if missing is not None:
        what, path = missing
        raise DataError(f"{card.name}: {what} {path} not found; " + _how_to_fix(card, data_root))
    return card.root_in(Path(data_root))


def first_missing(card: DatasetCard, data_root: Path) -> tuple[str, Path] | None:
    """(what, path) of the outermost layout piece that is missing, or None when listing can proceed."""
    for what, path in layout_paths(card, data_root):
        if not path_exists(what, path):
            return what, path
    return None


MissingPiece = Callable[[Any, Path], "tuple[str, Path] | None"]


def require_datasets(cards: Sequence[Any], data_root: Path, *, missing: MissingPiece | None = None) -> None:
    """Raise one DataError naming every card whose data are not in place (for ``--dataset all``).

    ``missing(card, data_root)`` finds a card's first missing layout piece (what, path), each
    track its own (``Track.first_missing``); default: the semantic layout's :func:`first_missing`.

    One line: "datasets not found under ROOT: voc (expected ROOT/VOCdevkit/VOC2012), ade20k
    (expected ...); <how the data root was chosen, how to pass another>; <how to prepare them>".
    When the data root itself is missing it says so instead of listing every folder under it.
    """
    missing = missing or first_missing
    gone = [(card, piece) for card in cards if (piece := missing(card, data_root)) is not None]
    if not gone:
        return
    names = [card.name for card, _ in gone]
    fix = (f"`ovseg-bench data prepare {' '.join(names)}` fetches and converts them; "
           "`ovseg-bench data check` shows what is in place")
    if not Path(data_root).is_dir():
        raise DataError(f"data root {_shown(data_root)} does not exist (needed by {', '.join(names)}); "
                        f"{data_root_hint(data_root)}; {fix}")
    listed = ", ".join(f"{card.name} (expected {'' if what == 'dataset folder' else what + ' '}{path})"
                       for card, (what, path) in gone)
    raise DataError(f"datasets not found under {_shown(data_root)}: {listed}; {data_root_hint(data_root)}; {fix}")


def data_root_hint(data_root: Path) -> str:
    """How ``data_root`` was chosen and how to choose another, for messages about missing data.

    The CLI resolves the default before the library sees it (``--data-root``, else $OVSEG_DATA,
    else ./data, as plan.default_data_root), so the default is recognised by value.
    """
    env = os.environ.get("OVSEG_DATA")
    if env and Path(env) == Path(data_root):
        return ("this is $OVSEG_DATA (used when no --data-root is given); pass --data-root DIR or set "
                "$OVSEG_DATA to the folder that holds the datasets")
    if not env and Path(data_root) == DEFAULT_DATA_ROOT:
        return (f"no --data-root was given and $OVSEG_DATA is unset, so the default ./data "
                f"({Path(data_root).absolute()}) was used; pass --data-root DIR or set $OVSEG_DATA to the folder "
                "that holds the datasets")
    return ("pass --data-root DIR (default: $OVSEG_DATA, else ./data) naming the folder that holds the datasets, "
            "or set $OVSEG_DATA")


def _shown(data_root: Path) -> str:
    """The data root as given, plus its absolute form when relative (./data depends on the cwd)."""
    path = Path(data_root)
    return str(path) if path.is_absolute() else f"{path} ({path.absolute()})"


def expected_layout(card: DatasetCard) -> str:
    """A one-line description of where the card expects its files, relative to the data root."""
    base = card.root if not card.embedded else f"<cards>/{card.root}"
    parts = [
        f"images {base}/{card.img_dir}/<id>{card.img_suffix}",
        f"GT {base}/{card.ann_dir}/<id>{card.gt_suffix}",
    ]
    if card.split_file is not None:
        shipped = f" (else the copy <cards>/{card.shipped_split_file})" if card.shipped_split_file else ""
        parts.append(f"split list {base}/{card.split_file}{shipped}")
    else:
        parts.append("no split list (the image folder is scanned recursively)")
    return ", ".join(parts)


def _how_to_fix(card: DatasetCard, data_root: Path) -> str:
    card_file = cards_dir() / f"{card.name}.yaml"
    if card.embedded:  # the data root plays no part: the files ship beside the card
        return f"'{card.name}' expects, beside its card: {expected_layout(card)} (see {card_file})."
    return (
        f"{data_root_hint(data_root)}, in the MMSegmentation layout. '{card.name}' expects, under the data "
        f"root: {expected_layout(card)} (see {card_file})."
    )


def read_split_file(path: Path) -> list[str]:
    """Entries of a split file in file order.

    Surrounding whitespace is stripped as mmseg does; blank lines (a trailing empty line) are
    skipped rather than turned into an image named after the suffix alone.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: cannot read the split file ({exc}); it should be a UTF-8 text file with one "
            "image id per line, readable by you"
        ) from None
    # read_text already turned \r\n and \r into \n (universal newlines), as file iteration does.
    return [line.strip() for line in text.split("\n") if line.strip()]


def scan_image_ids(img_dir: Path, img_suffix: str) -> list[str]:
    """Relative paths (POSIX, without ``img_suffix``) of images under ``img_dir``, sorted.

    Mirrors mmengine's ``list_dir_or_file``: names starting with "." are skipped, every
    folder is descended (symlinks followed), the suffix match is case-sensitive, and the sort is
    on the relative path string (mmseg's ``load_data_list`` sorts by ``img_path``).
    """
    found: list[str] = []
    stack = [img_dir]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_file():
                    rel = Path(entry.path).relative_to(img_dir).as_posix()
                    if rel.endswith(img_suffix):
                        found.append(rel)
                elif entry.is_dir():
                    stack.append(Path(entry.path))
    found.sort()
    return [rel[: len(rel) - len(img_suffix)] for rel in found]
