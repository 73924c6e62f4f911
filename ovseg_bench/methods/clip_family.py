"""The CLIP baseline family: training-free dense CLIP with a modified last block.

Papers and reference code:
- ``clip``: vanilla last layer (SCLIP's CLIP row; wangf3014/SCLIP@b56bd30 with ``csa=False``).
- ``maskclip``: original MaskCLIP, value path with residual and FFN kept (chongzhou96/MaskCLIP@245d31f).
- ``sclip``: correlative self-attention, q-q plus k-k (wangf3014/SCLIP@b56bd30).
- ``clearclip``: q-q attention, no residual, no FFN (mc-lan/ClearCLIP@ad68a40).
- ``naclip``: k-k plus a Gaussian neighbourhood (sigma 5), no residual, no FFN, PAMR (sinahmr/NACLIP@0cac3a6).

Per window: dense patch embeddings -> cosine with the text queries on the (h//16, w//16) grid ->
bilinear to the window (align_corners=False). Postprocess on the full image: optional PAMR on the
raw cosines, then the background rule, in the order of SCLIP's clip_segmentor.py: ``threshold``:
softmax(logit_scale * cos) over names, max over each class's synonyms, SCLIP's area_thd, argmax,
prob_thd to label 0; ``constant``: a constant plane as class 0 before softmax (TCL's rule);
``none``: argmax of the softmax over classes (mmseg 0.x).

Quirks kept on purpose: ClearCLIP zero-pads windows whose sides are not multiples of the patch
size (left = pad // 2); the others let the patch conv drop the remainder. Each method's
per-dataset knobs (logit_scale, prob_thd, area_thd) come from its published configs.
"""
from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..imaging import NORMALISATIONS
from ..errors import ConfigError
from ..resources import configs_dir
from ..yamlconf import load_dataclass
from . import clip_dense
from .base import (DatasetInfo, DenseFeatureMethod, MethodInputs, PaddedFeatures, Trunk, Vocabulary,
                   WeightsOptions, register_config_variants, synonym_queries)
from .clip_model import LoadedClip, load_clip
from .pamr import PAMR, SCLIP_PAMR, TCL_PAMR
from .prompts import ClipTextEncoder, weights_key

BACKGROUND_RULES = ("threshold", "constant", "none")
PAMR_SETTINGS = {"sclip": SCLIP_PAMR, "tcl": TCL_PAMR}
PER_DATASET_KEYS = ("logit_scale", "prob_thd", "area_thd", "bg_value")


@dataclasses.dataclass(frozen=True)
class ClipFamilyConfig:
    """One ``configs/methods/<name>.yaml``; defaults are the reference's own."""

    name: str
    attention: str
    paper: str
    variant_of: str | None = None  # a --config file named after itself, run as a variant of this method
    native_protocol: str | None = None  # the preset `--protocol native` resolves to; None: none shipped yet
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    normalisation: str = "clip"
    templates: str = "imagenet80"
    template_average: str = "normalised"
    logit_scale: float = 40.0
    background: str = "threshold"
    prob_thd: float = 0.0
    area_thd: float = 0.0
    bg_value: float = 0.0
    pamr: str | None = None
    pad_windows: bool = False
    naclip_sigma: float = 5.0
    # "clip": open_clip's own blocks (QuickGELU, LN eps 1e-5); "mmseg_vit": MaskCLIP's backbone,
    # mmseg's ViT on CLIP's weights (exact GELU, eps 1e-6, value-path last layer, windows padded
    # bottom/right and their logits resized to the window, not cut).
    arithmetic: str = "clip"
    refuse_duplicate_names: bool = False  # MaskCLIP drops repeated names silently, shifting labels
    per_dataset: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [("attention", self.attention, clip_dense.ATTENTION_VARIANTS),
                  ("arithmetic", self.arithmetic, tuple(FEATURE_PATHS)),
                  ("background", self.background, BACKGROUND_RULES),
                  ("normalisation", self.normalisation, tuple(NORMALISATIONS)),
                  ("pamr", self.pamr, (None, *PAMR_SETTINGS))]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"method '{self.name}': {key} '{value}' is not one of {allowed}")
        for dataset, overrides in self.per_dataset.items():
            unknown = set(overrides) - set(PER_DATASET_KEYS)
            if unknown:
                raise ConfigError(f"method '{self.name}', per_dataset.{dataset}: unknown key(s) {sorted(unknown)}")

    def knob(self, key: str, dataset: str) -> float:
        return float(self.per_dataset.get(dataset, {}).get(key, getattr(self, key)))


def load_method_config(name: str, path: Path | None = None) -> ClipFamilyConfig:
    return load_dataclass(ClipFamilyConfig, path or configs_dir() / "methods" / f"{name}.yaml")


_LOADED: "weakref.WeakValueDictionary[tuple[Any, ...], LoadedClip]" = weakref.WeakValueDictionary()


def family_clip(model: str, pretrained: str, device: torch.device) -> LoadedClip:
    """One loaded CLIP per weights and device for the family's methods alive in a process
    (``--method clip-family`` holds one ViT-B-16, not five): they only read the model. Local
    files are told apart by their size and modification time as well as their path."""
    key = (model, pretrained, str(device), *(_file_state(name) for name in (model, pretrained)))
    loaded = _LOADED.get(key)
    if loaded is None:
        loaded = load_clip(model, pretrained, device)
        _LOADED[key] = loaded
    return loaded


def _file_state(name: str) -> tuple[int, int] | None:
    path = Path(name).expanduser()
    if not path.is_file():
        return None
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class ClipFamily(DenseFeatureMethod):
    """Shared adapter; the registered names below bind it to their config files. On the
    referring track it runs this harness's dense baseline (tracks/referring.py)."""

    tracks = ("semantic", "referring")

    def __init__(self, config: ClipFamilyConfig, weights: WeightsOptions, device: torch.device,
                 inputs: MethodInputs | None = None):
        self.config = config
        self.device = device
        self.normalisation = NORMALISATIONS[config.normalisation]
        self._clip = family_clip(weights.model or config.model, weights.pretrained or config.pretrained, device)
        self.model, self.tokenizer, self._weights = self._clip.model, self._clip.tokenizer, self._clip.record
        self._weights_key = weights_key(self._weights)  # keys the trunk, asked for every batch
        self.patch = int(self.model.visual.conv1.kernel_size[0])
        self.pamr = PAMR(**PAMR_SETTINGS[config.pamr]).to(device) if config.pamr else None
        self.text = ClipTextEncoder(self.model, self.tokenizer, self._weights, templates=config.templates,
                                    average=config.template_average, device=device)

    def weights(self) -> dict[str, Any]:
        return dict(self._weights)

    def settings(self, dataset: str) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        # weights() records the weights actually used, and the result the variant (Method.variant).
        for key in ("per_dataset", "model", "pretrained", "variant_of", "native_protocol"):
            cfg.pop(key)
        cfg.update({key: self.config.knob(key, dataset) for key in PER_DATASET_KEYS})
        cfg["pamr_settings"] = PAMR_SETTINGS.get(self.config.pamr)
        return cfg

    def encode_classes(self, classes: list[list[str]], info: DatasetInfo) -> Vocabulary:
        # TCL's constant-plane rule scores only the foreground classes; the plane is class 0.
        first = 1 if self.config.background == "constant" and info.background_class else 0
        names, query_class = synonym_queries(classes, first)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if self.config.refuse_duplicate_names and repeated:
            raise ConfigError(f"method '{self.config.name}': class name(s) {repeated} occur more than once in "
                              f"'{info.name}'; MaskCLIP would drop the repeats and shift every later label, so "
                              "they are refused: make the names unique")
        return Vocabulary(self.text.encode(names),
                          torch.tensor(query_class, dtype=torch.long, device=self.device), len(classes))

    def embed_windows(self, windows: torch.Tensor) -> PaddedFeatures:
        """L2-normalised dense patch embeddings [B,E,h/16,w/16]; the vocabulary first enters in
        ``score``'s cosine, so one pass serves every vocabulary."""
        return FEATURE_PATHS[self.config.arithmetic](self, windows)

    def trunk(self, size: tuple[int, int]) -> Trunk | None:
        """CLIP's blocks before the last one, which the variants of this family (on open_clip's
        arithmetic) share: they differ only from the last block on. Keyed by the weights'
        content, the position rule, the padding of windows of ``size`` and the tower's dtype."""
        if self.config.arithmetic != "clip":
            return None  # MaskCLIP's mmseg ViT changes every block (LN eps, GELU)
        visual = self.model.visual
        padding = self._padding(size)
        key = ("open_clip-vit/penultimate", self._weights_key, "pos:sclip", padding,
               str(visual.conv1.weight.dtype), str(self.device))
        depth = len(visual.transformer.resblocks)
        return Trunk(key, f"CLIP blocks 0-{depth - 2}", self._penultimate)

    def _penultimate(self, windows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        padded, _ = self._pad(windows)
        return clip_dense.penultimate_tokens(self.model.visual, padded)

    def embed_from_trunk(self, shared: tuple[torch.Tensor, tuple[int, int]], windows: torch.Tensor) -> PaddedFeatures:
        """This variant's last block on the shared penultimate tokens."""
        x, grid = shared
        feats = clip_dense.finish_dense(self.model.visual, x, grid, self.config.attention,
                                        naclip_sigma=self.config.naclip_sigma)
        padded, offset = self._padding((windows.shape[-2], windows.shape[-1]))
        return PaddedFeatures(F.normalize(feats.float(), dim=1), padded, offset)

    def _clip_features(self, windows: torch.Tensor) -> PaddedFeatures:
        return DenseFeatureMethod.embed_windows(self, windows)

    def _mmseg_vit_features(self, windows: torch.Tensor) -> PaddedFeatures:
        """MaskCLIP's own path (chongzhou96/MaskCLIP@245d31f): bottom/right padding, mmseg's ViT,
        features divided by their norm with no epsilon (decode_heads/maskclip_head.py), and the
        padded grid's logits resized to the unpadded window (encoder_decoder.py), not cut."""
        padded = clip_dense.pad_bottom_right(windows, self.patch)
        feats, _ = clip_dense.mmseg_vit_features(self.model.visual, padded)
        feats = feats.to(torch.promote_types(feats.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 stays
        return PaddedFeatures(feats / feats.norm(dim=1, keepdim=True), (windows.shape[-2], windows.shape[-1]), (0, 0))

    def score(self, features: PaddedFeatures, vocab: Vocabulary, size: tuple[int, int]) -> torch.Tensor:
        """Cosine with the text queries, bilinear to the padded window, the window cut back out."""
        cosine = torch.einsum("bchw,qc->bqhw", features.maps, vocab.embeddings)
        cosine = F.interpolate(cosine, size=features.padded, mode="bilinear", align_corners=False)
        (top, left), (height, width) = features.offset, size
        return cosine[:, :, top:top + height, left:left + width]

    def _pad(self, windows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """ClearCLIP's zero padding to a multiple of the patch size (left/top = pad // 2)."""
        if not self.config.pad_windows:
            return windows, (0, 0)
        return clip_dense.pad_to_multiple(windows, self.patch)

    def _padding(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(padded size, (top, left)) that :meth:`_pad` gives windows of ``size``."""
        if not self.config.pad_windows:
            return size, (0, 0)
        pad_h, pad_w = -size[0] % self.patch, -size[1] % self.patch
        return (size[0] + pad_h, size[1] + pad_w), (pad_h // 2, pad_w // 2)

    def postprocess(self, scores: torch.Tensor, image: torch.Tensor, vocab: Vocabulary,
                    info: DatasetInfo) -> torch.Tensor:
        if self.pamr is not None:
            guide = F.interpolate(image[None].float(), size=scores.shape[-2:], mode="bilinear", align_corners=False)
            scores = self.pamr(guide, scores[None])[0]
        rule = self.config.background
        if rule == "constant" and info.background_class:
            return constant_plane_labels(scores, vocab, self.config.knob("bg_value", info.name))
        scale = self.config.knob("logit_scale", info.name) if rule == "threshold" else 1.0
        probs = class_probabilities(scores, vocab, scale)
        if rule != "threshold":
            return probs.argmax(dim=0)
        return threshold_labels(probs, area_thd=self.config.knob("area_thd", info.name),
                                prob_thd=self.config.knob("prob_thd", info.name) if info.background_class else 0.0)


def synonym_max(values: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    """[Q,H,W] per-query values -> [C,H,W] max over each class's queries (-inf for a class without any)."""
    out = values.new_full((vocab.num_classes, *values.shape[1:]), float("-inf"))
    index = vocab.query_class.view(-1, 1, 1).expand_as(values)
    return out.scatter_reduce(0, index, values, reduce="amax")


def class_probabilities(scores: torch.Tensor, vocab: Vocabulary, logit_scale: float) -> torch.Tensor:
    """softmax(logit_scale * scores) over queries, then the max over each class's synonyms: [C,H,W]."""
    return synonym_max(torch.softmax(scores.float() * logit_scale, dim=0), vocab)


def threshold_labels(probs: torch.Tensor, *, area_thd: float, prob_thd: float) -> torch.Tensor:
    """SCLIP-family decision (wangf3014/SCLIP@b56bd30:clip_segmentor.py): area_thd, argmax, then strict prob_thd."""
    labels = probs.argmax(dim=0)
    if area_thd > 0:
        foreground = (labels != 0).sum()
        areas = torch.bincount(labels.flatten(), minlength=probs.shape[0])
        suppressed = (areas <= area_thd * foreground)
        suppressed[0] = False
        if suppressed.any():
            probs = probs * (~suppressed).to(probs.dtype).view(-1, 1, 1)
            labels = probs.argmax(dim=0)
    if prob_thd > 0:
        labels = torch.where(probs.max(dim=0).values < prob_thd, torch.zeros_like(labels), labels)
    return labels


def constant_plane_labels(scores: torch.Tensor, vocab: Vocabulary, bg_value: float) -> torch.Tensor:
    """TCL's background rule: class 0 is a constant plane; argmax of the float32 softmax (mmseg 0.27)."""
    per_class = synonym_max(scores.float(), vocab)
    per_class[0] = bg_value
    return torch.softmax(per_class, dim=0).argmax(dim=0)


# How each arithmetic embeds windows (ClipFamilyConfig.arithmetic).
FEATURE_PATHS = {"clip": ClipFamily._clip_features, "mmseg_vit": ClipFamily._mmseg_vit_features}

register_config_variants(ClipFamily, ("clip", "maskclip", "maskclip_clipblock", "sclip", "clearclip", "naclip"),
                         load_method_config)
