"""The method adapter contract (DESIGN.md, "Method adapter").

A semantic-track adapter turns class names into a vocabulary, a batch of equal-size normalised
windows into per-query scores, and full-image scores into a label map. It never reads datasets,
computes metrics or writes files: the runner does. Referring and label-conditioned adapters
get their own small interfaces beside this one when those tracks land.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..engine.transforms import Normalisation


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What an adapter may know of the dataset it scores."""

    name: str
    class_names: tuple[str, ...]
    background_class: bool  # label 0 is "background" (VOC21, Context60, COCO-Object)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Encoded class names.

    ``embeddings`` [Q,E] holds one row per query (a class may own several synonyms);
    ``query_class`` [Q] (int64) maps each query to its class index in label order.
    """

    embeddings: torch.Tensor
    query_class: torch.Tensor
    num_classes: int


@dataclasses.dataclass(frozen=True)
class WeightsOptions:
    """Where a method's weights come from (``--model``, ``--pretrained``, ``--checkpoint``)."""

    model: str | None = None
    pretrained: str | None = None
    checkpoint: Path | None = None
    predictions: Path | None = None


class Method(abc.ABC):
    """Base of every adapter. Subclasses declare ``name``, ``tracks`` and ``normalisation``."""

    name: ClassVar[str]
    tracks: ClassVar[tuple[str, ...]] = ("semantic",)
    normalisation: Normalisation | None = None

    def settings(self, dataset: str) -> dict[str, Any]:
        """Every effective setting for ``dataset``, recorded in the result file."""
        return {}

    def weights(self) -> dict[str, Any]:
        """Identity of the weights: architecture, tag or file, and whether they are random."""
        return {"random": False}


class WindowMethod(Method):
    """A method scored through the sliding-window engine."""

    @abc.abstractmethod
    def encode_classes(self, classes: list[list[str]], info: DatasetInfo) -> Vocabulary:
        """``classes`` in label order, each a list of synonyms."""

    @abc.abstractmethod
    def forward_windows(self, windows: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        """[B,3,h,w] float32 normalised windows -> [B,Q,h,w] scores (float)."""

    @abc.abstractmethod
    def postprocess(self, scores: torch.Tensor, image: torch.Tensor, vocab: Vocabulary,
                    info: DatasetInfo) -> torch.Tensor:
        """[Q,H,W] float32 scores at GT size and the [3,h,w] normalised model input -> [H,W] int64 labels."""


class LabelMethod(Method):
    """A method that already has label maps (no model): the engine only scores them."""

    @abc.abstractmethod
    def labels_for(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        """[H,W] integer labels of image ``image_id``, which must have the GT ``shape``."""


def register_config_variants(adapter: type, names: tuple[str, ...], load_config: Callable[..., Any]) -> None:
    """Register each of ``names`` as ``adapter`` bound to ``configs/methods/<name>.yaml``.

    Variants are registry names bound to config files (house style): ``--config`` replaces the
    file for one run.
    """
    from ..registry import register_method

    for name in names:
        class_name = "".join(part.capitalize() for part in name.split("_")) + "Method"
        body = {"__init__": _bound_init(adapter, name, load_config), "name": name,
                "__doc__": f"``{name}``: {adapter.__name__} bound to configs/methods/{name}.yaml."}
        register_method(name)(type(class_name, (adapter,), body))


def _bound_init(adapter: type, name: str, load_config: Callable[..., Any]) -> Callable[..., None]:
    def __init__(self: Any, weights: WeightsOptions, device: torch.device, config_path: Path | None = None) -> None:
        adapter.__init__(self, load_config(name, config_path), weights, device)

    return __init__
