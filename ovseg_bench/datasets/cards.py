"""Dataset cards: one YAML file per benchmark in the top-level ``datasets/`` folder.

A card says where a split lives inside a data root (exactly the layout of MMSegmentation's
dataset preparation guide, open-mmlab/mmsegmentation@v1.2.2:docs/en/user_guides/2_dataset_prepare.md),
how its files are named, its classes and its label conventions.
Cards never contain data; the embedded ``demo`` card points at images shipped beside it.
"""
from __future__ import annotations

import dataclasses
import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..registry import resolve_name, unknown_name_message
from ..resources import cards_dir
from ..yamlconf import from_mapping, read_yaml

TRACKS = ("semantic", "referring", "label-conditioned")

# `--dataset all`: the eight benchmarks in the order TCL evaluates and tables print them.
ALL_BENCHMARKS = ("voc", "voc20", "context", "context59", "coco_stuff", "coco_object", "cityscapes", "ade20k")
# `--dataset referring`: the eight referring splits in the order GLCF's tables print them.
REFERRING_BENCHMARKS = ("refcoco_val", "refcoco_testA", "refcoco_testB", "refcoco+_val", "refcoco+_testA",
                        "refcoco+_testB", "refcocog_val", "refcocog_test")
DATASET_GROUPS = {"all": ALL_BENCHMARKS, "referring": REFERRING_BENCHMARKS}


@dataclasses.dataclass(frozen=True)
class DatasetCard:
    name: str
    title: str
    track: str
    split: str
    root: str                      # relative to the data root (or to the cards folder if embedded)
    img_dir: str                   # relative to root
    ann_dir: str                   # relative to root
    img_suffix: str                # e.g. ".jpg", "_leftImg8bit.png"
    gt_suffix: str                 # e.g. ".png", "_gtFine_labelTrainIds.png"
    num_images: int                # expected size of the split
    classnames: dict[str, str]     # naming scheme ("mmseg", "sclip") -> class-name file, relative to the cards folder
    raw_label_max: int             # largest GT value on disk, before reduce_zero_label
    split_file: str | None = None  # relative to root; None = recursive directory scan (as mmseg)
    # A copy of the split file, relative to the cards folder, read when split_file is absent under the data root.
    shipped_split_file: str | None = None
    # Scheme -> class-name file of the classes methods predict, when they differ from the scored ones;
    # predicted_to_class (a label-map file) then gives the scored class of each predicted class.
    predicted_classnames: dict[str, str] = dataclasses.field(default_factory=dict)
    predicted_to_class: str | None = None
    gt_map: str | None = None      # label-map file: raw GT value -> scored class; unlisted values are ignored
    reduce_zero_label: bool = False
    ignore_index: int = 255
    background_class: bool = False  # class 0 is "background" (VOC21, Context60, COCO-Object)
    gt_has_ignore: bool = True      # whether 255 may occur in the GT on disk
    embedded: bool = False          # root is relative to the cards folder (the shipped demo)
    shares_images_with: str | None = None
    notes: str = ""
    card_version: int = 1

    def __post_init__(self) -> None:
        where = f"dataset card '{self.name}'"
        if self.track not in TRACKS:
            raise ConfigError(f"{where}: track '{self.track}' is not one of {TRACKS}")
        if self.gt_map is not None and self.reduce_zero_label:
            raise ConfigError(f"{where}: gt_map and reduce_zero_label both change the GT; give one of them "
                              "(a gt_map can express reduce_zero_label)")
        if bool(self.predicted_classnames) != (self.predicted_to_class is not None):
            raise ConfigError(f"{where}: predicted_classnames and predicted_to_class go together (the predicted "
                              "classes and the scored class of each); give both or neither")
        if self.predicted_classnames and set(self.predicted_classnames) != set(self.classnames):
            raise ConfigError(f"{where}: predicted_classnames has naming schemes {sorted(self.predicted_classnames)} "
                              f"but classnames has {sorted(self.classnames)}; give both lists for the same schemes")
        if self.shipped_split_file is not None and self.split_file is None:
            raise ConfigError(f"{where}: shipped_split_file is a copy of split_file, which the card lacks")

    def root_in(self, data_root: Path) -> Path:
        """The split's root folder for a given data root."""
        return (cards_dir() if self.embedded else Path(data_root)) / self.root

    def classnames_file(self, scheme: str) -> Path:
        return self._names_file(self.classnames, scheme, "class-name list")

    def class_synonyms(self, scheme: str) -> list[list[str]]:
        """Classes in label order, each a list of names (synonyms).

        A line holds one class; synonyms are separated by ", " as in the SCLIP-family files
        (wangf3014/SCLIP@b56bd30:configs/cls_*.txt). Names are kept verbatim (ADE's "bed " keeps
        its space: CLIP's tokenizer strips it, ``whitespace_clean`` in its simple tokenizer).
        """
        return _synonyms(self.classnames_file(scheme), scheme, self.num_classes, self.name)

    def class_names(self) -> tuple[str, ...]:
        """Canonical class names (the mmseg list): the keys of per-class results."""
        return tuple(_read_lines(self.classnames_file("mmseg")))

    @property
    def num_classes(self) -> int:
        return len(self.class_names())

    def prediction_synonyms(self, scheme: str) -> list[list[str]]:
        """The classes methods predict, in label order, each a list of synonyms (as :meth:`class_synonyms`).

        The scored classes themselves unless the card has ``predicted_classnames`` (COCO-Stuff-27:
        the 171 fine classes, mapped to the 27 scored ones by :meth:`prediction_map`).
        """
        if not self.predicted_classnames:
            return self.class_synonyms(scheme)
        path = self._names_file(self.predicted_classnames, scheme, "predicted class-name list")
        return _synonyms(path, scheme, len(self.prediction_names()), self.name)

    def prediction_names(self) -> tuple[str, ...]:
        """Canonical names (scheme mmseg) of the predicted classes; the scored ones if they are the same."""
        if not self.predicted_classnames:
            return self.class_names()
        return tuple(_read_lines(self._names_file(self.predicted_classnames, "mmseg", "predicted class-name list")))

    def prediction_map(self) -> np.ndarray | None:
        """int64 [num_predicted]: the scored class (0..num_classes-1) of each predicted class, applied to
        predicted labels after the argmax; None when methods predict the scored classes.

        Raises ConfigError naming the ``predicted_to_class`` file (and line) when it does not give one
        class in range per predicted class.
        """
        if self.predicted_to_class is None:
            return None
        path = cards_dir() / self.predicted_to_class
        rows = _label_map_rows(path, width=1)
        expected = len(self.prediction_names())
        if len(rows) != expected:
            raise ConfigError(f"{path}: {len(rows)} entries, expected one per predicted class of '{self.name}' "
                              f"({expected}, the lines of {self.predicted_classnames['mmseg']})")
        for line, (value,) in rows:
            _check_class(path, line, value, self.num_classes)
        return np.array([value for _, (value,) in rows], dtype=np.int64)

    def gt_lut(self) -> np.ndarray | None:
        """uint8 [256]: raw GT value on disk -> scored class, every value ``gt_map`` does not list ->
        ``ignore_index``; None when the raw values are the classes (after any reduce_zero_label).

        Raises ConfigError naming the ``gt_map`` file and line for a raw value outside
        0..raw_label_max, a value listed twice or a class out of range.
        """
        if self.gt_map is None:
            return None
        path = cards_dir() / self.gt_map
        lut = np.full(256, self.ignore_index, dtype=np.uint8)
        seen: set[int] = set()
        for line, (raw, label) in _label_map_rows(path, width=2):
            if not 0 <= raw <= self.raw_label_max or raw in seen:
                state = "is listed twice" if raw in seen else f"is outside 0..{self.raw_label_max} (raw_label_max)"
                raise ConfigError(f"{path}, line {line}: raw value {raw} {state}; list each raw GT value of "
                                  f"'{self.name}' at most once")
            _check_class(path, line, label, self.num_classes)
            seen.add(raw)
            lut[raw] = label
        return lut

    def _names_file(self, table: dict[str, str], scheme: str, what: str) -> Path:
        if scheme not in table:
            raise ConfigError(
                f"dataset '{self.name}' has no {what} for naming scheme '{scheme}'; it has {sorted(table)}"
            )
        return cards_dir() / table[scheme]


def _synonyms(path: Path, scheme: str, expected: int, card: str) -> list[list[str]]:
    """A class-name file's classes: one name per line for scheme mmseg, else ", "-separated synonyms."""
    classes = [[line] if scheme == "mmseg" else line.split(", ") for line in _read_lines(path)]
    if len(classes) != expected:
        raise ConfigError(f"{path}: {len(classes)} classes, expected {expected} for '{card}'")
    return classes


def _label_map_rows(path: Path, *, width: int) -> list[tuple[int, tuple[int, ...]]]:
    """(line number, ``width`` integers) of each entry of a label-map file.

    One entry per line; ``#`` starts a comment; blank and comment-only lines are skipped. Raises
    ConfigError naming the file (and the line) when it is unreadable or a line is malformed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the label-map file ({exc}); reinstall ovseg-bench or fix "
                          "the card that names it") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            values = tuple(int(f) for f in fields)
        except ValueError:
            values = ()
        if len(values) != width:
            expected = "one integer" if width == 1 else f"{width} integers"
            raise ConfigError(f"{path}, line {number}: {line.strip()!r} is not {expected} (optionally followed by "
                              "a # comment)")
        rows.append((number, values))
    return rows


def _check_class(path: Path, line: int, value: int, num_classes: int) -> None:
    if not 0 <= value < num_classes:
        raise ConfigError(f"{path}, line {line}: class {value} is outside 0..{num_classes - 1}, the card's classes")


def _read_lines(path: Path) -> list[str]:
    """Lines of a class-name file; a missing final newline is allowed (some SCLIP files lack it)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def load_card(name: str) -> Any:
    """The card called ``name``, forgiving case and surrounding spaces (``--dataset "voc, ADE20K"``
    reaches here as " ADE20K" after the comma split). Unknown names raise ConfigError with
    close matches.
    """
    return _load_card(resolve_name("dataset", name, card_names()))


# The card type of each track (module, class), imported when a card of that track is read.
CARD_TYPES = {"semantic": ("ovseg_bench.datasets.cards", "DatasetCard"),
              "referring": ("ovseg_bench.datasets.refer", "ReferringCard"),
              "label-conditioned": ("ovseg_bench.datasets.label_conditioned", "LabelConditionedCard")}


def card_type(track: Any, path: Path) -> type:
    """The dataclass a card of ``track`` maps onto (its ``track`` key picks it)."""
    if track not in CARD_TYPES:
        raise ConfigError(f"{path}: track {track!r} is not one of {TRACKS}")
    module, name = CARD_TYPES[track]
    return getattr(importlib.import_module(module), name)


@lru_cache(maxsize=None)
def _load_card(name: str) -> Any:
    path = cards_dir() / f"{name}.yaml"
    if not path.is_file():  # card_names() lists only existing files: a race or a bad caller
        raise ConfigError(unknown_name_message("dataset", name, card_names()))
    data = read_yaml(path)
    card = from_mapping(card_type(data.get("track", "semantic"), path), data, str(path))
    if card.name != name:
        raise ConfigError(f"{path}: card name '{card.name}' differs from its file name '{name}'")
    return card


def card_names() -> list[str]:
    """Every shipped card: the eight benchmarks, then the referring splits, in their canonical
    order; the others sorted."""
    found = sorted(p.stem for p in cards_dir().glob("*.yaml"))
    ordered = [n for group in DATASET_GROUPS.values() for n in group if n in found]
    return ordered + [n for n in found if n not in ordered]
