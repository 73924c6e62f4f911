"""ReCo: retrieve and co-segment (Shin, Xie, Albanie, "ReCo: Retrieve and Co-segment for Zero-shot
Transfer", NeurIPS 2022; NoelShin/reco@5c5e1bc).

Inference, as ReCo's ``ReCo.__call__`` (networks/reco.py:304-346) computes it, per window:

- D = sigmoid(cos(DeiT-S/16-SIN map, reference embedding of each class)), the references used
  as stored (already normalised), upsampled bilinearly (align_corners=False) to the window;
- L = sigmoid(10 * cos(DenseCLIP map, the 85-template text embedding of each class)), upsampled
  the same way (``_get_text_attention``, 100-125); the sigmoid comes before the upsampling;
- the score is D * L; labels are its argmax (ties: the first class).

Both image networks see the same tensor: ``x / 255`` then the unit-scale ImageNet statistics
(datasets/coco_stuff.py:100-129). The references come from ``--references FILE``, a pickle of
{class name: embedding} (ReCo's published files), read with the allow-list unpickler; the
names are matched to the dataset's classes, through ``reference_names`` in the config where a
file spells a class differently, and an unmatched class fails with the list.

Not here yet: building references from an archive (``reco build-references``) and the dense CRF
of the published ``reco`` row; this module registers ``reco_nocrf``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError
from ..imaging import NORMALISATIONS
from ..resources import configs_dir
from ..safe_pickle import safe_load_tensors
from ..yamlconf import load_dataclass
from .base import (DatasetInfo, DenseFeatureMethod, MethodInputs, PaddedFeatures, Vocabulary, WeightsOptions,
                   register_config_variants, synonym_queries)
from .clip_family import synonym_max
from .clip_model import load_clip
from .prompts import ClipTextEncoder
from .reco_backbones import DEIT_S_SIN_URL, build_deit_for, deit_dense_features, denseclip_features, \
    prepare_denseclip
from .checkpoints import fetch_checkpoint


@dataclasses.dataclass(frozen=True)
class RecoConfig:
    """One ``configs/methods/reco*.yaml``; defaults are ReCo's (configs/*.yaml of the repo)."""

    name: str
    paper: str
    variant_of: str | None = None
    native_protocol: str | None = None
    model: str = "RN50x16"               # DenseCLIP's CLIP (open_clip name or config JSON)
    pretrained: str = "openai"
    normalisation: str = "imagenet_unit"
    templates: str = "maskclip85"        # ReCo's prompt_engineering: the same 85 templates
    template_average: str = "normalised"
    text_temperature: float = 10.0       # networks/reco.py:105
    fp16_convs: bool = True              # ReCo's DenseCLIP conversion rounds convs to fp16 (reco_backbones)
    deit_url: str = DEIT_S_SIN_URL
    reference_names: dict[str, str] = dataclasses.field(default_factory=dict)  # card name -> file name

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"method '{self.name}': normalisation '{self.normalisation}' is not one of "
                              f"{sorted(NORMALISATIONS)}")


def load_reco_config(name: str, path: Path | None = None) -> RecoConfig:
    return load_dataclass(RecoConfig, path or configs_dir() / "methods" / f"{name}.yaml")


@dataclasses.dataclass(frozen=True)
class RecoVocabulary(Vocabulary):
    """``embeddings``: the text queries [Q,E]; ``references``: the image references [Q,D], one
    per query (a class's synonyms share its reference)."""

    references: Tensor | None = None


def load_references(path: Path) -> dict[str, Tensor]:
    """{class name: [D] float32 reference} from a ReCo reference pickle (allow-list unpickler)."""
    found = safe_load_tensors(Path(path))
    if not isinstance(found, dict) or not all(isinstance(v, Tensor) and v.dim() == 1 for v in found.values()):
        raise DataError(f"{path}: a reference file maps class names to 1-D embeddings; found "
                        f"{type(found).__name__}")
    return {str(name): value.float() for name, value in found.items()}


class Reco(DenseFeatureMethod):
    """Shared adapter; the registered names below bind it to their config files."""

    inputs = ("references",)

    def __init__(self, config: RecoConfig, weights: WeightsOptions, device: torch.device,
                 inputs: MethodInputs | None = None):
        inputs = inputs or MethodInputs()
        if inputs.references is None:
            raise ConfigError(f"method '{config.name}' needs --references FILE (ReCo's reference embeddings: a "
                              "published pickle of {class: embedding})")
        self.config, self.device = config, device
        self.normalisation = NORMALISATIONS[config.normalisation]
        checkpoint = weights.checkpoint
        self._deit_record = {"checkpoint": str(Path(checkpoint).resolve()) if checkpoint else config.deit_url}
        if checkpoint is None:
            checkpoint, _ = fetch_checkpoint(config.deit_url, what="DeiT-S/16-SIN checkpoint")
        self.deit = build_deit_for(Path(checkpoint)).to(device)
        clip = load_clip(weights.model or config.model, weights.pretrained or config.pretrained, device)
        self.visual = prepare_denseclip(clip.model.visual, fp16_convs=config.fp16_convs)
        self._weights = {**clip.record, **self._deit_record}
        self.text = ClipTextEncoder(clip.model, clip.tokenizer, clip.record, templates=config.templates,
                                    average=config.template_average, device=device)
        self.references_path = Path(inputs.references)
        self.references = load_references(self.references_path)

    def weights(self) -> dict[str, Any]:
        return dict(self._weights)

    def settings(self, dataset: str) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        for key in ("model", "pretrained", "variant_of", "native_protocol", "deit_url"):
            cfg.pop(key)
        cfg["references"] = str(self.references_path.resolve())
        return cfg

    def encode_classes(self, classes: list[list[str]], info: DatasetInfo) -> RecoVocabulary:
        names, query_class = synonym_queries(classes)
        references = torch.stack([self._reference(name, info) for name in names]).to(self.device)
        return RecoVocabulary(self.text.encode(names), torch.tensor(query_class, dtype=torch.long, device=self.device),
                              len(classes), references=references)

    def _reference(self, name: str, info: DatasetInfo) -> Tensor:
        key = self.config.reference_names.get(name, name)
        if key not in self.references:
            raise DataError(f"{self.references_path}: no reference for class '{name}' of '{info.name}' "
                            f"(looked up as '{key}'); the file has {sorted(self.references)}; map the name with "
                            "reference_names in the method config")
        return self.references[key]

    def embed_windows(self, windows: Tensor) -> PaddedFeatures:
        """Both networks' maps, each divided by its norm (no epsilon, networks/reco.py:326, 108);
        the vocabulary first enters in :meth:`score` (references and text)."""
        deit = deit_dense_features(self.deit, windows).float()
        clip = denseclip_features(self.visual, windows).float()
        maps = {"deit": deit / deit.norm(dim=1, keepdim=True), "clip": clip / clip.norm(dim=1, keepdim=True)}
        return PaddedFeatures(maps, (windows.shape[-2], windows.shape[-1]), (0, 0))

    def score(self, features: PaddedFeatures, vocab: Vocabulary, size: tuple[int, int]) -> Tensor:
        """D * L at the window size (ReCo's dt * text_attention)."""
        maps = features.maps
        d = torch.einsum("bchw,nc->bnhw", maps["deit"], vocab.references).sigmoid()
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        text = torch.einsum("bchw,nc->bnhw", maps["clip"], vocab.embeddings.to(maps["clip"].dtype))
        attention = torch.sigmoid(self.config.text_temperature * text)
        attention = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
        return d * attention

    def postprocess(self, scores: Tensor, image: Tensor, vocab: Vocabulary, info: DatasetInfo) -> Tensor:
        """Argmax of the fused scores (max over a class's synonyms first); no background rule."""
        return synonym_max(scores.float(), vocab).argmax(dim=0)


register_config_variants(Reco, ("reco_nocrf",), load_reco_config)
