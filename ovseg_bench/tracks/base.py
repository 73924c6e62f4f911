"""A track: one task type with its own cards, reader, counts, scorer and result blocks.

The runner (engine/runner.py) knows no task: plan.py resolves the track once from a card's
``track`` and asks it for the pieces of the loop. Which scorer serves a method is looked up
along the method class's MRO in the track's ``scorers`` table (adapter base -> scorer class),
once per dataset, so no stage dispatches on method kinds.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from ..engine.metrics import Counts
from ..engine.runner import EngineOptions, Evaluation, ImageHook, Scorer
from ..errors import TrackError


class Track(abc.ABC):
    """One task type. Subclasses set the class attributes and implement the methods below."""

    name: ClassVar[str]              # the cards' ``track`` value
    metric_id: ClassVar[str]         # part of every fingerprint of the track
    default_protocol: ClassVar[str]  # the preset a plain ``run`` uses
    sidecar_layout: ClassVar[str]    # what the rows of the per-item sidecar hold
    console_columns: ClassVar[tuple[str, ...]]  # metrics printed beside mIoU after a run
    label_pictures: ClassVar[bool] = False      # --visualize draws its label maps
    saves_predictions: ClassVar[bool] = False   # --save-predictions writes its answers as PNGs
    scorers: ClassVar[dict[type, type[Scorer]]]  # adapter base class -> the scorer that drives it

    @abc.abstractmethod
    def list_items(self, card: Any, data_root: Path) -> list[Any]:
        """The split's items in listing order (each with an ``image_id``: the item's id)."""

    @abc.abstractmethod
    def first_missing(self, card: Any, data_root: Path) -> tuple[str, Path] | None:
        """(what, path) of the card's first layout piece missing under ``data_root``, or None."""

    @abc.abstractmethod
    def reader(self, card: Any, items: list[Any], settings: Any, data_root: Path) -> Dataset:
        """The torch Dataset over ``items`` that DataLoader workers run."""

    def new_counts(self, card: Any, method: Any, device: torch.device) -> Counts:
        """Empty counts for one dataset: the scorer's own (``scorer_class(method).new_counts``)."""
        return self.scorer_class(method, card).new_counts(card, method, device)

    @abc.abstractmethod
    def result_blocks(self, card: Any, evaluation: Evaluation, settings: Any) -> dict[str, Any]:
        """The result file's ``metrics`` and ``counts`` blocks."""

    def check(self, card: Any, data_root: Path, *, deep: bool = False) -> Any:
        """``data check`` of one card: its layout, then its listing against the expected count
        (the semantic track adds its per-file checks). A :class:`~ovseg_bench.datasets.check.DatasetCheck`."""
        from ..datasets.check import DatasetCheck
        from ..errors import OvsegError

        root = card.root_in(data_root)
        missing = self.first_missing(card, data_root)
        problems = [f"{missing[0]} missing: {missing[1]}"] if missing else []
        items: list[Any] = []
        if not problems:
            try:
                items = self.list_items(card, data_root)
            except OvsegError as exc:
                problems.append(str(exc))
        return DatasetCheck(card.name, root, root.is_dir(), problems, len(items), self.expected_items(card), deep=deep)

    def item_id(self, item: Any) -> str:
        """The id a listed item is recorded, resumed and reported by (an image id by default)."""
        return item.image_id

    def dataset_fields(self, card: Any, settings: Any, data_root: Path) -> dict[str, Any]:
        """What the result's ``dataset`` block records of the card beyond its name and split:
        the classes (and the naming scheme used) for the tracks that have them."""
        return {"num_classes": card.num_classes, "classes": list(card.class_names()),
                "classnames": settings.classnames}

    def expected_items(self, card: Any) -> int:
        """How many items the split holds (images; referring: sentences)."""
        return card.num_images

    def scorer_class(self, method: Any, card: Any) -> type[Scorer]:
        """The scorer of the adapter base the method names for ``card`` (``Method.adapter_for``),
        else of the first class in ``type(method).__mro__`` that this track drives."""
        chosen = method.adapter_for(self.name, card.name)
        if chosen is not None:
            return self.scorers[chosen]
        for base in type(method).__mro__:
            if base in self.scorers:
                return self.scorers[base]
        raise TrackError(f"method '{method.name}' has no adapter for the '{self.name}' track; it derives from "
                         f"none of {sorted(b.__name__ for b in self.scorers)}")

    def scorer(self, method: Any, card: Any, settings: Any, options: EngineOptions, device: torch.device, *,
               on_item: ImageHook | None = None) -> Scorer:
        counts = self.new_counts(card, method, device)
        return self.scorer_class(method, card)(method, card, settings, counts, options, device, on_item=on_item)
