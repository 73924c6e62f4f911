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
    reduce_zero_label: bool = False
    ignore_index: int = 255
    background_class: bool = False  # class 0 is "background" (VOC21, Context60, COCO-Object)
    gt_has_ignore: bool = True      # whether 255 may occur in the GT on disk
    embedded: bool = False          # root is relative to the cards folder (the shipped demo)
    shares_images_with: str | None = None
    notes: str = ""
    card_version: int = 1

    def __post_init__(self) -> None:
        if self.track not in TRACKS:
            raise ConfigError(f"dataset card '{self.name}': track '{self.track}' is not one of {TRACKS}")

    def root_in(self, data_root: Path) -> Path:
        """The split's root folder for a given data root."""
        return (cards_dir() if self.embedded else Path(data_root)) / self.root

    def classnames_file(self, scheme: str) -> Path:
        if scheme not in self.classnames:
            raise ConfigError(
                f"dataset '{self.name}' has no class-name list for naming scheme '{scheme}'; "
                f"it has {sorted(self.classnames)}"
            )
        return cards_dir() / self.classnames[scheme]

    def class_synonyms(self, scheme: str) -> list[list[str]]:
        """Classes in label order, each a list of names (synonyms).

        A line holds one class; synonyms are separated by ", " as in the SCLIP-family files
        (wangf3014/SCLIP@b56bd30:configs/cls_*.txt). Names are kept verbatim (ADE's "bed " keeps
        its space: CLIP's tokenizer strips it, ``whitespace_clean`` in its simple tokenizer).
        """
        path = self.classnames_file(scheme)
        lines = _read_lines(path)
        classes = [[line] if scheme == "mmseg" else line.split(", ") for line in lines]
        if len(classes) != self.num_classes:
            raise ConfigError(f"{path}: {len(classes)} classes, expected {self.num_classes} for '{self.name}'")
        return classes

    def class_names(self) -> tuple[str, ...]:
        """Canonical class names (the mmseg list): the keys of per-class results."""
        return tuple(_read_lines(self.classnames_file("mmseg")))

    @property
    def num_classes(self) -> int:
        return len(self.class_names())


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
