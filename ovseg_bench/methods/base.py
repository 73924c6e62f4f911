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

from ..imaging import Normalisation


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


def synonym_queries(classes: list[list[str]], first: int = 0) -> tuple[list[str], list[int]]:
    """Text queries of ``classes[first:]``, one per synonym, and the class index of each query."""
    names = [name for synonyms in classes[first:] for name in synonyms]
    return names, [c for c, synonyms in enumerate(classes) if c >= first for _ in synonyms]


@dataclasses.dataclass(frozen=True)
class WeightsOptions:
    """Where a method's weights come from (``--model``, ``--pretrained``, ``--checkpoint``)."""

    model: str | None = None
    pretrained: str | None = None
    checkpoint: Path | None = None


@dataclasses.dataclass(frozen=True)
class MethodInputs:
    """Method inputs that are not weights. A method declares the ones it takes (``Method.inputs``);
    the planner refuses any other that was given, naming it, before anything is built."""

    predictions: tuple[str, ...] = ()       # --predictions DIR | NAME=DIR (methods/predictions.py)
    predictions_out_of_range: str = "error"  # --predictions-out-of-range: or "ignore", mmseg's drop
    bg_threshold: float | None = None        # --bg-threshold: the fixed background threshold of saved CAMs
    references: Path | None = None           # --references: ReCo's reference embeddings
    proposals: Path | None = None            # --proposals: mask proposals per image (GLCF)

    def given(self) -> list[str]:
        """Names of the inputs set to something other than their defaults."""
        defaults = MethodInputs()
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(defaults, f.name)]


class Method(abc.ABC):
    """Base of every adapter. Subclasses declare ``name``, ``tracks`` and ``normalisation``.

    ``variant`` is None when the method runs with its shipped config, else the name of the
    ``--config`` variant (:func:`config_variant`); results and tables tell variants apart by it.

    Constructor contract: ``cls(weights: WeightsOptions, device, config_path=None, inputs:
    MethodInputs | None = None)``; a method reads only the ``inputs`` fields it declares.
    """

    name: ClassVar[str]
    tracks: ClassVar[tuple[str, ...]] = ("semantic",)
    inputs: ClassVar[tuple[str, ...]] = ()  # the MethodInputs fields the constructor reads
    normalisation: Normalisation | None = None
    variant: str | None = None

    def settings(self, dataset: str) -> dict[str, Any]:
        """Every effective setting for ``dataset``, recorded in the result file."""
        return {}

    def weights(self) -> dict[str, Any]:
        """Identity of the weights: architecture, tag or file, and whether they are random."""
        return {"random": False}

    @classmethod
    def native_protocol(cls, config_path: Path | None = None) -> str | None:
        """The preset ``--protocol native`` resolves to: the reference's own settings; None if
        none is shipped for this method."""
        return None

    def check_datasets(self, datasets: tuple[str, ...]) -> None:
        """Refuse, before any image is read, datasets this method cannot serve (its inputs for them)."""

    def adapter_for(self, track: str, dataset: str) -> type | None:
        """Which of this method's adapter bases serves ``dataset`` of ``track``, when it derives
        from several a track drives (``predictions``: saved CAMs or saved masks); None: the first
        along the MRO."""
        return None


class WindowMethod(Method):
    """A method scored through the sliding-window engine.

    ``shares_features`` False: every (method, dataset) runs its own forward passes. The engine
    still calls ``embed_windows``/``score``, whose defaults here are the whole ``forward_windows``
    (the windows themselves are the "features").
    """

    shares_features: ClassVar[bool] = False

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

    def trunk(self, size: tuple[int, int]) -> "Trunk | None":
        """The leading part of ``embed_windows`` for windows of ``size`` that other methods may
        share (:class:`Trunk`); None: nothing to share."""
        return None

    def embed_windows(self, windows: torch.Tensor) -> Any:
        return windows

    def score(self, features: Any, vocab: Vocabulary, size: tuple[int, int]) -> torch.Tensor:
        return self.forward_windows(features, vocab)


@dataclasses.dataclass(frozen=True)
class Trunk:
    """The blocks of a method's embedding that several methods may compute once per window.

    Two methods share a trunk when their ``key`` is equal and their windows are normalised alike:
    the key holds everything the trunk's output depends on (the weights' identity by content,
    the blocks run, the position rule, the padding, the dtype). ``compute`` maps [B,3,h,w]
    normalised windows to the trunk's output, which the owning method's
    :meth:`DenseFeatureMethod.embed_from_trunk` finishes into its features.
    """

    key: tuple[Any, ...]
    what: str                                   # the blocks in words, for the console
    compute: Callable[[torch.Tensor], Any]


class DenseFeatureMethod(WindowMethod):
    """A window method whose dense image features do not depend on the vocabulary.

    ``forward_windows`` is ``score(embed_windows(windows), vocab, size)``: the engine embeds a
    window once and scores it for several vocabularies (paired datasets). A method with a
    :meth:`trunk` computes ``embed_windows`` as ``embed_from_trunk(trunk.compute(windows))``, so
    methods with the same trunk compute it once and branch. Each adapter says in
    ``embed_windows`` where its vocabulary first enters.
    """

    shares_features: ClassVar[bool] = True

    def embed_windows(self, windows: torch.Tensor) -> Any:
        """[B,3,h,w] float32 normalised windows -> the method's vocabulary-free features. Every
        tensor in them has the window batch as dim 0: the engine keeps each window's slice (a
        batch of one) until its image is complete, then scores it for each vocabulary."""
        trunk = self.trunk((windows.shape[-2], windows.shape[-1]))
        if trunk is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither embed_windows nor trunk")
        return self.embed_from_trunk(trunk.compute(windows), windows)

    def embed_from_trunk(self, shared: Any, windows: torch.Tensor) -> Any:
        """The output of :meth:`trunk` for ``windows`` -> the features ``embed_windows`` gives."""
        raise NotImplementedError(f"{type(self).__name__} has no trunk")

    @abc.abstractmethod
    def score(self, features: Any, vocab: Vocabulary, size: tuple[int, int]) -> torch.Tensor:
        """Features of ``embed_windows`` -> [B,Q,h,w] scores for windows of ``size`` (h, w)."""

    def forward_windows(self, windows: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        return self.score(self.embed_windows(windows), vocab, (windows.shape[-2], windows.shape[-1]))


@dataclasses.dataclass(frozen=True)
class PaddedFeatures:
    """Features of windows zero-padded to a multiple of the patch: what ``score`` needs to cut
    the window back out of the padded scores."""

    maps: Any                    # the method's feature tensors
    padded: tuple[int, int]      # (H, W) of the padded windows
    offset: tuple[int, int]      # (top, left) of the window inside the padding


class LabelMethod(Method):
    """A method that already has label maps (no model): the engine only scores them."""

    @abc.abstractmethod
    def labels_for(self, image_id: str, shape: tuple[int, int], info: DatasetInfo) -> np.ndarray:
        """[H,W] integer labels of image ``image_id`` of dataset ``info``, which must have the GT ``shape``."""


class ImageLabelMethod(Method):
    """A semantic method that labels a whole image at once from its own per-image state (GLCF's
    proposals classified and painted), rather than through the window engine."""

    @abc.abstractmethod
    def encode_classes(self, classes: list[list[str]], info: DatasetInfo) -> Vocabulary:
        """``classes`` in label order, each a list of synonyms."""

    @abc.abstractmethod
    def label_image(self, image: np.ndarray, image_id: str, vocab: Vocabulary, info: DatasetInfo) -> torch.Tensor:
        """[H,W,3] uint8 RGB at the GT size -> [H,W] int64 labels (predicted classes)."""


def register_config_variants(adapter: type, names: tuple[str, ...], load_config: Callable[..., Any]) -> None:
    """Register each of ``names`` as ``adapter`` bound to ``configs/methods/<name>.yaml``.

    Variants are registry names bound to config files (house style): ``--config`` replaces the
    file for one run.
    """
    from ..registry import register_method

    for name in names:
        class_name = "".join(part.capitalize() for part in name.split("_")) + "Method"
        body = {"__init__": _bound_init(adapter, name, load_config), "name": name,
                "native_protocol": _bound_native(name, load_config),
                "__doc__": f"``{name}``: {adapter.__name__} bound to configs/methods/{name}.yaml."}
        register_method(name)(type(class_name, (adapter,), body))


def _bound_init(adapter: type, name: str, load_config: Callable[..., Any]) -> Callable[..., None]:
    def __init__(self: Any, weights: WeightsOptions, device: torch.device, config_path: Path | None = None,
                 inputs: MethodInputs | None = None) -> None:
        config = load_config(name, config_path)
        if config_path is not None:
            check_config_owner(name, config, config_path)
        adapter.__init__(self, config, weights, device, inputs=inputs)
        self.variant = None if config_path is None else config_variant(name, config, load_config(name, None))

    return __init__


def _bound_native(name: str, load_config: Callable[..., Any]) -> classmethod:
    def native_protocol(cls: type, config_path: Path | None = None) -> str | None:
        return load_config(name, config_path).native_protocol

    return classmethod(native_protocol)


def check_config_owner(method: str, config: Any, path: Path) -> None:
    """Refuse a ``--config`` written for another method (its ``name``), unless it declares
    ``variant_of: <method>``; a variant may not take the name of another registered method."""
    from ..errors import ConfigError
    from ..registry import method_names

    declared = getattr(config, "variant_of", None)
    if declared is not None and declared != method:
        raise ConfigError(f"{path}: declares itself a variant of '{declared}', not of '{method}'; "
                          f"run it with --method {declared}")
    if declared is None and config.name != method:
        raise ConfigError(f"{path}: this config is for method '{config.name}', not '{method}'; run --method "
                          f"{config.name}, or make the file a variant of {method} with `variant_of: {method}` "
                          "and a name of its own")
    if declared is not None and config.name != method and config.name in method_names():
        raise ConfigError(f"{path}: variant name '{config.name}' is another registered method; "
                          "give the variant a name of its own")


def config_variant(method: str, config: Any, shipped: Any) -> str | None:
    """None for the shipped config; else the variant's own name, else ``cfg-<sha256[:8]>`` of its values."""
    from ..identity import config_digest

    if config == shipped:
        return None
    if config.name != method:
        return str(config.name)
    return "cfg-" + config_digest(dataclasses.asdict(config))[:8]


# ----------------------------------------------------------------------------- referring track

@dataclasses.dataclass(frozen=True)
class ReferringInfo:
    """What a referring adapter may know of the split it answers."""

    name: str       # the card (refcoco_val, ...)
    dataset: str    # the refer dataset: refcoco, refcoco+ or refcocog


class ReferringMethod(Method):
    """One binary mask per referring expression (the referring track; DESIGN.md sketch).

    The scorer embeds each image once (``embed_image``) and asks ``masks`` for all expressions
    of that image together. A method that cannot answer an expression returns None for it;
    ``unanswered_rule`` says whether such samples are left out of the metric (``skip``, GLCF's
    rule for images without proposals) or scored as an empty mask (``empty``). Both are listed.
    """

    tracks: ClassVar[tuple[str, ...]] = ("referring",)
    unanswered_rule: ClassVar[str] = "skip"

    @abc.abstractmethod
    def encode_expressions(self, texts: list[str]) -> Any:
        """The method's encoding of the expressions (text embeddings, noun phrases, ...)."""

    @abc.abstractmethod
    def embed_image(self, image: np.ndarray, image_id: str, info: ReferringInfo) -> Any:
        """[H,W,3] uint8 RGB at its own size -> the method's per-image state (proposals there)."""

    @abc.abstractmethod
    def masks(self, state: Any, queries: Any) -> list[torch.Tensor | None]:
        """One [H,W] bool mask (on any device) per encoded expression, or None when unanswerable."""


class SavedMaskMethod(Method):
    """Referring masks a method already has: one binary map per sample (``predictions``)."""

    @abc.abstractmethod
    def mask_for(self, sample_id: str, shape: tuple[int, int], dataset: str) -> np.ndarray:
        """[H,W] bool mask of sample ``sample_id`` (``<ref_id>_<sent_id>``), at the image's ``shape``."""


# ----------------------------------------------------------------------------- label-conditioned track

class CamMethod(Method):
    """Class activation maps given the image-level labels (the label-conditioned track).

    ``cams`` returns a :class:`ovseg_bench.datasets.cams.Cams` (the present classes' label ids and
    float32 [K,H,W] maps in [0, 1] at the image's size); the scorer turns them into a pseudo mask
    at every background threshold of ``curve(dataset)`` = (grid, fixed threshold).
    """

    tracks: ClassVar[tuple[str, ...]] = ("label-conditioned",)

    @abc.abstractmethod
    def cams(self, image: np.ndarray, labels: tuple[int, ...], info: DatasetInfo, *, image_id: str,
             image_path: Path | None = None) -> Any:
        """[H,W,3] uint8 RGB (the harness's decode) and its label ids -> the CAMs of those classes.
        ``image_path`` lets a method decode the file as its reference does (Pillow, no EXIF)."""

    @abc.abstractmethod
    def curve(self, dataset: str) -> tuple[tuple[float, ...], float]:
        """(background-threshold grid, the fixed threshold of the method's config)."""

    def refine_pseudo_masks(self, masks: np.ndarray, cams: Any, image_path: Path | None,
                            image: np.ndarray) -> np.ndarray:
        """[T,H,W] label-id pseudo masks (one per grid threshold) -> refined ones (a dense CRF);
        unchanged by default."""
        return masks
