"""ReCo: retrieve and co-segment (Shin, Xie, Albanie, "ReCo: Retrieve and Co-segment for Zero-shot
Transfer", NeurIPS 2022; NoelShin/reco@5c5e1bc).

Inference, as ReCo's ``ReCo.__call__`` (networks/reco.py:304-346) computes it, per window:

- D = sigmoid(cos(DeiT-S/16-SIN map, reference embedding of each class)), the references used
  as stored (already normalised), upsampled bilinearly (align_corners=False) to the window;
- L = sigmoid(10 * cos(DenseCLIP map, the 85-template text embedding of each class)), upsampled
  the same way (``_get_text_attention``, 100-125); the sigmoid comes before the upsampling;
- the score is D * L; labels are its argmax (ties: the first class), or with ``crf: true`` (the
  published ``reco`` row) the argmax of the dense CRF's marginals (eval.py:133; methods/crf.py).

Both image networks see the same tensor: ``x / 255`` then the unit-scale ImageNet statistics
(datasets/coco_stuff.py:100-129). The references come from ``--references FILE``: a published
pickle of {class name: embedding} or a file written by ``ovseg-bench reco build-references``
(:func:`build_reference_file`), read with the allow-list unpickler; the names are matched to the
dataset's classes, through ``reference_names`` in the config where a file spells a class
differently, and an unmatched class fails with the list.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import check_writable
from ..errors import ConfigError, DataError
from ..imaging import NORMALISATIONS
from ..resources import configs_dir
from ..safe_pickle import safe_load_tensors
from ..yamlconf import load_dataclass
from .base import (DatasetInfo, DenseFeatureMethod, MethodInputs, PaddedFeatures, Trunk, Vocabulary, WeightsOptions,
                   register_config_variants, synonym_queries)
from .checkpoints import fetch_checkpoint
from .clip_family import synonym_max
from .clip_model import load_clip
from .prompts import ClipTextEncoder, weights_key
from .reco_backbones import DEIT_S_SIN_URL, build_deit_for, deit_dense_features, denseclip_features, \
    prepare_denseclip
from . import reco_references as refs


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
    crf: bool = False                    # the dense CRF on D * L (eval.py:133), the published `reco` row
    reference_names: dict[str, str] = dataclasses.field(default_factory=dict)  # card name -> file name
    # Building references (`reco build-references`); recorded in the reference file's record.
    retrieval_model: str = "ViT-L-14-336"   # ReCo's ViT-L/14@336px (configs/reco_*.yaml clip_arch)
    retrieval_pretrained: str = "openai"
    retrieval_text_fp16: bool = True        # ReCo's retrieval CLIP is fp16 on every device (reco_references)
    k: int = 50                             # n_imgs
    seed_slicing: str = "reco"              # reco (ReCo's quirk, as the published files) | fixed
    context_elimination: bool = True
    text_attention: bool = True

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"method '{self.name}': normalisation '{self.normalisation}' is not one of "
                              f"{sorted(NORMALISATIONS)}")
        self.reference_settings()  # validates seed_slicing and k, naming the field

    def reference_settings(self, k: int | None = None) -> refs.ReferenceSettings:
        return refs.ReferenceSettings(k=self.k if k is None else k, seed_slicing=self.seed_slicing,
                                      text_attention=self.text_attention,
                                      context_elimination=self.context_elimination,
                                      text_temperature=self.text_temperature)


BUILD_ONLY = ("retrieval_model", "retrieval_pretrained", "retrieval_text_fp16", "k", "seed_slicing",
              "context_elimination", "text_attention")


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


@dataclasses.dataclass
class RecoNetworks:
    """DeiT-S/16-SIN, DenseCLIP and its text tower, loaded as both inference and reference building need."""

    deit: torch.nn.Module
    visual: torch.nn.Module
    text: ClipTextEncoder
    record: dict[str, Any]

    def deit_features(self, images: Tensor) -> Tensor:
        return deit_dense_features(self.deit, images)

    def clip_features(self, images: Tensor) -> Tensor:
        return denseclip_features(self.visual, images)


def load_networks(config: RecoConfig, weights: WeightsOptions, device: torch.device) -> RecoNetworks:
    """The DeiT file (``--checkpoint`` or the published URL, trust on first use), loaded strictly,
    and DenseCLIP's CLIP (``--model``/``--pretrained`` or the config's)."""
    checkpoint = weights.checkpoint
    deit_record = {"checkpoint": str(Path(checkpoint).resolve()) if checkpoint else config.deit_url}
    if checkpoint is None:
        checkpoint, _ = fetch_checkpoint(config.deit_url, what="DeiT-S/16-SIN checkpoint")
    deit = build_deit_for(Path(checkpoint)).to(device)
    clip = load_clip(weights.model or config.model, weights.pretrained or config.pretrained, device)
    visual = prepare_denseclip(clip.model.visual, fp16_convs=config.fp16_convs)
    text = ClipTextEncoder(clip.model, clip.tokenizer, clip.record, templates=config.templates,
                           average=config.template_average, device=device)
    return RecoNetworks(deit, visual, text, {**clip.record, **deit_record})


class Reco(DenseFeatureMethod):
    """Shared adapter; the registered names below bind it to their config files."""

    inputs = ("references",)

    def __init__(self, config: RecoConfig, weights: WeightsOptions, device: torch.device,
                 inputs: MethodInputs | None = None):
        inputs = inputs or MethodInputs()
        if inputs.references is None:
            raise ConfigError(f"method '{config.name}' needs --references FILE (ReCo's reference embeddings: a "
                              "published pickle of {class: embedding}, or one written by "
                              "`ovseg-bench reco build-references`)")
        self.config, self.device = config, device
        self.normalisation = NORMALISATIONS[config.normalisation]
        self.references_path = Path(inputs.references)
        self.references = load_references(self.references_path)
        self.references_record = refs.read_record(self.references_path)
        if config.crf:
            from .crf import require_crf

            require_crf()  # the missing extra fails before any weights load
        networks = load_networks(config, weights, device)
        self.deit, self.visual, self.text, self._weights = networks.deit, networks.visual, networks.text, networks.record
        self._weights_key = weights_key(self._weights)  # keys the trunk, asked for every batch

    def weights(self) -> dict[str, Any]:
        return dict(self._weights)

    def settings(self, dataset: str) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        for key in ("model", "pretrained", "variant_of", "native_protocol", "deit_url", *BUILD_ONLY):
            cfg.pop(key)
        cfg["references"] = str(self.references_path.resolve())
        cfg["references_built"] = _built_summary(self.references_record)
        return cfg

    def encode_classes(self, classes: list[list[str]], info: DatasetInfo) -> RecoVocabulary:
        names, query_class = synonym_queries(classes)
        references = torch.stack([self._reference(name, info) for name in names]).to(self.device)
        return RecoVocabulary(self.text.encode(names), torch.tensor(query_class, dtype=torch.long, device=self.device),
                              len(classes), references=references)

    def _reference(self, name: str, info: DatasetInfo) -> Tensor:
        # The card's own spelling first (files built here), then the published files' (reference_names).
        key = name if name in self.references else self.config.reference_names.get(name, name)
        if key not in self.references:
            raise DataError(f"{self.references_path}: no reference for class '{name}' of '{info.name}' "
                            f"(looked up as '{key}'); the file has {sorted(self.references)}; map the name with "
                            "reference_names in the method config")
        return self.references[key]

    def trunk(self, size: tuple[int, int]) -> Trunk:
        """The whole image side (both networks): ``reco`` and ``reco_nocrf`` differ only after it."""
        key = ("reco/deit+denseclip", self._weights_key, ("fp16_convs", self.config.fp16_convs),
               str(self.device))
        return Trunk(key, "DeiT-S/16 and DenseCLIP", self._network_maps)

    def embed_from_trunk(self, shared: PaddedFeatures, windows: Tensor) -> PaddedFeatures:
        return shared

    def _network_maps(self, windows: Tensor) -> PaddedFeatures:
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
        """Argmax of the fused scores (max over a class's synonyms first), through the dense CRF
        when the config asks; no background rule."""
        scores = synonym_max(scores.float(), vocab)
        if not self.config.crf:
            return scores.argmax(dim=0)
        from .crf import crf_labels

        if tuple(image.shape[-2:]) != tuple(scores.shape[-2:]):
            # Under ReCo's own protocol the two sizes agree; elsewhere the scores are at the GT
            # size, so the CRF sees the input resized (bilinear) to it.
            image = F.interpolate(image[None], size=scores.shape[-2:], mode="bilinear", align_corners=False)[0]
        return crf_labels(scores, image, mean=self.normalisation.mean, std=self.normalisation.std)


def _built_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a run's result keeps of a built reference file's record (None: a published pickle)."""
    if record is None:
        return None
    return {key: record.get(key) for key in ("settings", "archive", "models", "references_sha256")}


register_config_variants(Reco, ("reco", "reco_nocrf"), load_reco_config)


# ----------------------------------------------------------------------------- reco build-references
@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """``ovseg-bench reco build-references``: what to build, from which archive, with which networks."""

    archive: Path
    out: Path
    classes: tuple[str, ...]
    class_source: str                       # "file <path>" or "datasets <names>", for the record
    weights: WeightsOptions                 # DeiT (--checkpoint) and DenseCLIP (--model/--pretrained)
    retrieval_model: str | None = None
    retrieval_pretrained: str | None = None
    archive_embeddings: Path | None = None  # ReCo's published embedding pickle instead of computing
    k: int | None = None
    config: Path | None = None              # a reco config variant (e.g. seed_slicing: fixed)
    cache: Path | None = None
    device: str = "auto"
    batch_size: int = 32
    quiet: bool = False


def build_reference_file(request: BuildRequest, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the references of ``request.classes`` and write them with their record; returns the record."""
    from ..engine.runner import resolve_device

    check_writable(request.out, option="--out")
    config = load_reco_config("reco", request.config)
    settings = config.reference_settings(request.k)
    device = resolve_device(request.device)
    files = refs.scan_archive(request.archive)
    digest = refs.archive_digest(Path(request.archive), files)
    log(f"archive: {len(files)} images under {request.archive} (digest {digest[:12]})")
    networks = load_networks(config, request.weights, device)
    retrieval = load_clip(request.retrieval_model or config.retrieval_model,
                          request.retrieval_pretrained or config.retrieval_pretrained, device)
    names, embeddings, source = _archive_embeddings(request, retrieval, files, device)
    query = _retrieval_text(config, retrieval, device)
    retrieved: dict[str, list[str]] = {}

    def retrieve(name: str) -> Tensor:
        top = refs.rank_archive(query.encode([name])[0].cpu(), embeddings, settings.k)
        retrieved[name] = [names[i] for i in top]
        return refs.archive_crops([files[names[i]] for i in top], settings.crop_size).to(device)

    coseg = refs.Cosegmenter(networks.deit_features, networks.clip_features, settings)
    with torch.inference_mode():
        references = refs.build_references(list(request.classes), retrieve=retrieve,
                                           text=lambda name: networks.text.encode([name])[0], coseg=coseg)
    record = {"format": refs.RECORD_FORMAT, "version": refs.RECORD_VERSION, "classes": list(request.classes),
              "class_source": request.class_source,
              "settings": dataclasses.asdict(settings),
              "archive": {"root": str(Path(request.archive).resolve()), "images": len(files), "digest": digest,
                          "digest_rule": "sha256 over 'relative path<TAB>size' lines", "embeddings": source},
              "models": {"co-segmentation": networks.record, "retrieval": {**retrieval.record,
                                                                          "text_fp16": config.retrieval_text_fp16}},
              "config": str(request.config.resolve()) if request.config else "configs/methods/reco.yaml",
              "retrieved": retrieved}
    refs.write_references(request.out, references, record)
    log(f"{len(references)} references -> {request.out} (record: {refs.record_path(request.out)})")
    return record


def _archive_embeddings(request: BuildRequest, retrieval: Any, files: dict[str, Path],
                        device: torch.device) -> tuple[list[str], Tensor, dict[str, Any]]:
    """The archive's retrieval embeddings: ReCo's published pickle when given, else computed and cached."""
    if request.archive_embeddings is not None:
        names, embeddings = refs.load_archive_embeddings(request.archive_embeddings, files)
        from ..atomic import sha256_file

        return names, embeddings, {"file": str(Path(request.archive_embeddings).resolve()),
                                   "sha256": sha256_file(request.archive_embeddings)}
    size = retrieval.model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    identity = {"retrieval": retrieval.record, "size": size, "archive": str(Path(request.archive).resolve())}
    cache = refs.EmbeddingCache(request.cache or _default_cache(identity), identity)
    names, embeddings = refs.embed_archive(retrieval.model, files, cache, size=size, device=device,
                                           batch_size=request.batch_size, quiet=request.quiet)
    return names, embeddings, {"computed": True, "cache": str(cache.path), "input_size": size}


def _default_cache(identity: dict[str, Any]) -> Path:
    import hashlib
    import json

    from ..resources import cache_dir

    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir("reco") / f"archive-embeddings-{key}.pt"


def _retrieval_text(config: RecoConfig, retrieval: Any, device: torch.device) -> ClipTextEncoder:
    """The retrieval CLIP's 85-template text queries, fp16 as ReCo's (``retrieval_text_fp16``)."""
    model, record = retrieval.model, dict(retrieval.record)
    if config.retrieval_text_fp16:
        model, record = refs.fp16_text_copy(model), {**record, "text_precision": "fp16"}
    return ClipTextEncoder(model, retrieval.tokenizer, record, templates=config.templates,
                           average=config.template_average, device=device)
