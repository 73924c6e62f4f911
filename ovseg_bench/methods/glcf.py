"""GLCF: zero-shot referring segmentation with global-local CLIP features (Yu, Seo, Son,
"Zero-shot Referring Image Segmentation with Global-Local Context Features", CVPR 2023;
Seonghoon-Yu/Zero-shot-RIS@75ff6ed, ``Our_method_with_free_solo.py`` and ``model/backbone.py``).

Per image, with mask proposals from ``--proposals FILE`` (FreeSOLO's in the paper) in the
source's own order:

- **One resized image feeds everything**: PIL bilinear resize of the short side to 800 (long
  side truncated), x/255, ImageNet statistics (fed to CLIP as GLCF does;
  data/dataset_refer_bert.py:160-165). Tensor resizes below are bilinear, align_corners=False,
  **without antialias**: GLCF ran torchvision 0.11, whose tensor resize had none.
- **Global feature** (``CLIPViTFM.forward``, token masking): that image resized to 224x224; each
  proposal resized to the 7x7 token grid as a float; the patch tokens multiplied by it before
  each block from ``masking_block`` (9) on, CLS untouched; CLS -> ln_post -> proj.
- **Local feature**: the 800-px image resized back to the original size; pixels outside the
  proposal set to (0.485, 0.456, 0.406) *in normalised space* (GLCF's pixel_mean); cropped to
  FreeSOLO's box from the mask (centre of mass +- half the projected extent, truncated:
  freesolo/modeling/solov2/solov2.py:723-728) and resized to 224x224; CLIP's image embedding.
- f_v = alpha * global + (1 - alpha) * local on raw features, alpha 0.95 (RefCOCO, RefCOCO+),
  0.85 (RefCOCOg).

Per expression: f_t = beta * f_sentence + (1 - beta) * f_noun_phrase (beta 0.5) on raw CLIP
text features, the sentence lower-cased and re-joined from spaCy's tokens, the noun phrase by
GLCF's root-chunk rule (methods/noun_phrase.py). Score = logit_scale.exp() * cos(f_v, f_t); the
first best proposal is the mask. An image without proposals leaves its samples unanswered, and
they are left out of every sum (GLCF's ``continue``). oIoU and mIoU in GLCF's float32.

**On the semantic track** (an extension of this harness, not a published protocol or number):
each proposal is classified against the class texts (the same global-local visual feature with
``semantic_alpha``, each class name encoded as an expression, the max over its synonyms); the
proposals are painted from the lowest best score to the highest, so the most confident one wins
where they overlap; uncovered pixels go to background where the dataset has a background class,
else to the class painted at the nearest covered pixel (Euclidean, OpenCV's distance transform).
An image without proposals is classified as one whole-image proposal.

Beyond GLCF: a proposal whose box is empty (a mask only in column 0, or an empty mask) makes
GLCF's crop fail; here the box is widened to one pixel.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError
from ..imaging import IMAGENET_UNIT
from ..resources import configs_dir
from ..yamlconf import load_dataclass
from .base import (DatasetInfo, ImageLabelMethod, MethodInputs, ReferringInfo, ReferringMethod, Vocabulary,
                   WeightsOptions, register_config_variants, synonym_queries)
from .clip_family import synonym_max
from .clip_dense import embed_tokens, run_blocks
from .clip_model import load_clip

# GLCF's fill of pixels outside a proposal: ImageNet's mean written into normalised space
# (Our_method_with_free_solo.py: pixel_mean).
GLCF_FILL = (0.485, 0.456, 0.406)
CONTEXT_LENGTH = 77  # OpenAI's clip.tokenize raises above it (GLCF calls it without truncate)


@dataclasses.dataclass(frozen=True)
class GlcfConfig:
    """``configs/methods/glcf.yaml``; defaults are GLCF's (Our_method_with_free_solo.py)."""

    name: str
    paper: str
    variant_of: str | None = None
    native_protocol: str | None = None
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    short_side: int = 800                 # T.Resize(800) of the PIL image
    input_size: int = 224                 # Height, Width
    masking_block: int = 9
    alpha: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"refcoco": 0.95, "refcoco+": 0.95, "refcocog": 0.85})  # v
    beta: float = 0.5                     # r
    antialias: bool = False               # torchvision 0.11's tensor resize
    spacy_model: str | None = "en_core_web_lg"
    semantic_alpha: float = 0.95          # the semantic-track extension's alpha (RefCOCO's)

    def __post_init__(self) -> None:
        if not 0 <= self.beta <= 1 or not all(0 <= a <= 1 for a in self.alpha.values()):
            raise ConfigError(f"method '{self.name}': alpha and beta must lie in [0, 1]")


def load_glcf_config(name: str, path: Path | None = None) -> GlcfConfig:
    return load_dataclass(GlcfConfig, path or configs_dir() / "methods" / f"{name}.yaml")


# ----------------------------------------------------------------------------- image side
def resize(x: Tensor, size: tuple[int, int], *, antialias: bool = False) -> Tensor:
    """[..., C, H, W] float -> size, bilinear, align_corners=False (torchvision's tensor resize)."""
    batched = x if x.dim() == 4 else x[None]
    out = F.interpolate(batched, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return out if x.dim() == 4 else out[0]


def glcf_input(rgb: np.ndarray, short_side: int = 800) -> Tensor:
    """[3,h,w] float32: the image's short side resized to ``short_side`` with Pillow's bilinear
    (long side truncated, torchvision's ``Resize(800)`` on a PIL image), x/255, ImageNet statistics."""
    from PIL import Image

    height, width = rgb.shape[:2]
    short, long = min(height, width), max(height, width)
    if short != short_side:
        new_long = int(short_side * long / short)
        size = (short_side, new_long) if width <= height else (new_long, short_side)  # (w, h) for PIL
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]  # a copy: PIL arrays are read-only
    return IMAGENET_UNIT.apply(x)[0]


def freesolo_boxes(masks: Tensor) -> Tensor:
    """int32 [N,4] (x1, y1, x2, y2): FreeSOLO's box of each [N,H,W] mask, from the centre of mass
    of its row and column projections +- half their extent, truncated (solov2.py:723-728,
    utils.py center_of_mass)."""
    masks = masks.bool()
    width_proj, height_proj = masks.any(dim=1), masks.any(dim=2)       # [N,W], [N,H]
    width, height = width_proj.sum(1), height_proj.sum(1)
    xs = torch.arange(masks.shape[2], dtype=torch.float32, device=masks.device)
    ys = torch.arange(masks.shape[1], dtype=torch.float32, device=masks.device)
    cx = (width_proj * xs).sum(-1) / width.clamp(min=1e-6)
    cy = (height_proj * ys).sum(-1) / height.clamp(min=1e-6)
    boxes = torch.stack([cx - 0.5 * width, cy - 0.5 * height, cx + 0.5 * width, cy + 0.5 * height], 1)
    return boxes.to(torch.int32)  # Tensor.type(torch.int): truncation toward zero


def masked_crops(image: Tensor, masks: Tensor, size: int, *, antialias: bool = False) -> Tensor:
    """[N,3,size,size]: ``image`` [3,H,W] (normalised) with pixels outside each mask set to
    GLCF's fill, cropped to the mask's FreeSOLO box and resized (``TF.resized_crop``)."""
    fill = torch.tensor(GLCF_FILL, dtype=image.dtype, device=image.device).view(3, 1, 1)
    crops = []
    for mask, (x1, y1, x2, y2) in zip(masks, freesolo_boxes(masks).tolist()):
        keep = mask.to(torch.uint8)
        masked = image * keep + (1 - keep) * fill
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)  # an empty box fails in GLCF; one pixel here
        crops.append(resize(masked[:, y1:y2, x1:x2], (size, size), antialias=antialias))
    return torch.stack(crops)


def token_masked_features(visual: Any, image: Tensor, masks: Tensor, masking_block: int, *,
                          antialias: bool = False) -> Tensor:
    """[N,E] GLCF's global features: ``image`` [3,S,S] through CLIP's ViT with the patch tokens
    multiplied by each mask (resized to the token grid as floats) before every block from
    ``masking_block`` on; CLS is never masked (``CLIPViTFM.forward``, token_masking)."""
    x, grid = embed_tokens(visual, image[None])
    x = run_blocks(visual, x, masking_block)                                     # [1, 1+L, D]
    grid_masks = resize(masks.float()[:, None], grid, antialias=antialias)[:, 0]  # [N, h, w]
    weights = grid_masks.flatten(1)[:, :, None]                                  # [N, L, 1]
    cls, patches = x[:, :1], x[:, 1:]
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    for block in blocks[masking_block:]:
        cls, patches = cls.expand(len(weights), -1, -1), patches * weights
        x = torch.cat([cls, patches], dim=1)
        x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        cls, patches = x[:, :1], x[:, 1:]
    return visual.ln_post(cls[:, 0]) @ visual.proj


def fused_scores(visual_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """[T,N] logit_scale.exp() * cos(text, proposal) (``CLIPViTFM.calculate_score``)."""
    v = visual_features / visual_features.norm(dim=1, keepdim=True)
    t = text_features / text_features.norm(dim=1, keepdim=True)
    return logit_scale.exp() * t @ v.t()


@dataclasses.dataclass
class GlcfImage:
    masks: Tensor            # [N,H,W] bool, the proposals in the source's order
    features: Tensor | None  # [N,E] fused visual features; None without proposals


class Glcf(ReferringMethod, ImageLabelMethod):
    """Shared adapter; registered names bind it to their config files."""

    tracks = ("referring", "semantic")

    inputs = ("proposals",)
    iou_arithmetic: ClassVar[str] = "float32"   # GLCF's Compute_IoU and summary
    unanswered_rule: ClassVar[str] = "skip"     # no proposals: left out of every sum
    normalisation = IMAGENET_UNIT

    def __init__(self, config: GlcfConfig, weights: WeightsOptions, device: torch.device,
                 inputs: MethodInputs | None = None):
        from .noun_phrase import load_parser
        from .proposals import ProposalFile

        inputs = inputs or MethodInputs()
        if inputs.proposals is None:
            raise ConfigError(f"method '{config.name}' needs --proposals FILE (mask proposals per image, the JSON "
                              "format of `ovseg-bench proposals`; see the README's GLCF section)")
        self.config, self.device = config, device
        self.proposals = ProposalFile(Path(inputs.proposals))
        self.parser = load_parser(config.spacy_model)
        clip = load_clip(weights.model or config.model, weights.pretrained or config.pretrained, device)
        self.model, self.tokenizer, self._weights = clip.model, clip.tokenizer, clip.record

    def weights(self) -> dict[str, Any]:
        return dict(self._weights)

    def settings(self, dataset: str) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        for key in ("model", "pretrained", "variant_of", "native_protocol"):
            cfg.pop(key)
        return {**cfg, "iou_arithmetic": self.iou_arithmetic, "proposals": self.proposals.record(),
                "spacy": self.parser.record()}

    def _alpha(self, info: ReferringInfo) -> float:
        if info.dataset not in self.config.alpha:
            raise ConfigError(f"method '{self.config.name}': no alpha for refer dataset '{info.dataset}'; "
                              f"the config has {sorted(self.config.alpha)}")
        return self.config.alpha[info.dataset]

    @torch.inference_mode()
    def embed_image(self, image: np.ndarray, image_id: str, info: ReferringInfo) -> GlcfImage:
        masks = self.proposals.masks(image_id, image.shape[:2]).to(self.device)
        if not len(masks):
            return GlcfImage(masks, None)
        return GlcfImage(masks, self._visual_features(image, masks, self._alpha(info)))

    def _visual_features(self, image: np.ndarray, masks: Tensor, alpha: float) -> Tensor:
        """[N,E] alpha * global + (1 - alpha) * local, both from the one 800-px input."""
        cfg, visual = self.config, self.model.visual
        x = glcf_input(image, cfg.short_side).to(self.device)
        square = (cfg.input_size, cfg.input_size)
        global_features = token_masked_features(visual, resize(x, square, antialias=cfg.antialias), masks,
                                                cfg.masking_block, antialias=cfg.antialias)
        original = resize(x, tuple(image.shape[:2]), antialias=cfg.antialias)
        crops = masked_crops(original, masks, cfg.input_size, antialias=cfg.antialias)
        return alpha * global_features + (1 - alpha) * self.model.encode_image(crops)

    # ------------------------------------------------------------------ the semantic extension
    @torch.inference_mode()
    def encode_classes(self, classes: list[list[str]], info: DatasetInfo) -> Vocabulary:
        names, query_class = synonym_queries(classes)
        return Vocabulary(self.encode_expressions(names), torch.tensor(query_class, device=self.device), len(classes))

    @torch.inference_mode()
    def label_image(self, image: np.ndarray, image_id: str, vocab: Vocabulary, info: DatasetInfo) -> Tensor:
        masks = self.proposals.masks(image_id, image.shape[:2]).to(self.device)
        if not len(masks):
            masks = torch.ones((1, *image.shape[:2]), dtype=torch.bool, device=self.device)
        features = self._visual_features(image, masks, self.config.semantic_alpha)
        per_query = fused_scores(features, vocab.embeddings, self.model.logit_scale)      # [Q, N]
        per_class = synonym_max(per_query[:, :, None], vocab)[:, :, 0]                    # [C, N]
        best, classes = per_class.max(dim=0)
        return paint_proposals(masks, classes, best, background=info.background_class)

    @torch.inference_mode()
    def encode_expressions(self, texts: list[str]) -> Tensor:
        """[T,E] beta * f_sentence + (1 - beta) * f_noun_phrase, raw CLIP text features."""
        from .noun_phrase import glcf_texts

        pairs = glcf_texts(self.parser, texts)
        sentences = self._encode_text([s for s, _ in pairs])
        phrases = self._encode_text([p for _, p in pairs])
        return self.config.beta * sentences + (1 - self.config.beta) * phrases

    def _encode_text(self, texts: list[str]) -> Tensor:
        for text in texts:
            length = len(self.tokenizer.encode(text)) + 2  # start and end tokens
            if length > CONTEXT_LENGTH:
                raise DataError(f"expression {text!r} is {length} CLIP tokens, over the {CONTEXT_LENGTH} GLCF's "
                                "tokenizer accepts (OpenAI's clip.tokenize raises there)")
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    @torch.inference_mode()
    def masks(self, state: GlcfImage, queries: Tensor) -> list[Tensor | None]:
        if state.features is None:
            return [None] * len(queries)
        best = fused_scores(state.features, queries, self.model.logit_scale).argmax(dim=1)  # first maximum
        return [state.masks[int(i)] for i in best]


def paint_proposals(masks: Tensor, classes: Tensor, scores: Tensor, *, background: bool) -> Tensor:
    """[H,W] int64: proposals painted from the lowest score to the highest (ties: source order),
    uncovered pixels to class 0 with a background class, else to the nearest covered pixel's."""
    import cv2

    canvas = torch.full(masks.shape[1:], -1, dtype=torch.long, device=masks.device)
    for n in torch.argsort(scores, stable=True).tolist():
        canvas[masks[n]] = classes[n]
    uncovered = canvas < 0
    if not uncovered.any():
        return canvas
    if background or not (~uncovered).any():
        return canvas.masked_fill(uncovered, 0)
    covered = (~uncovered).cpu().numpy()
    _, nearest = cv2.distanceTransformWithLabels((~covered).astype(np.uint8), cv2.DIST_L2, 5,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    sources = np.flatnonzero(covered.ravel())  # label k is the k-th covered pixel in row-major order
    flat = canvas.cpu().numpy().ravel()
    filled = flat[sources[nearest.ravel() - 1]].reshape(canvas.shape)
    return torch.from_numpy(filled).to(canvas.device)


register_config_variants(Glcf, ("glcf",), load_glcf_config)
