"""TCL: text-grounded masks from a trained grounder on frozen CLIP.

Paper: Cha, Mun, Roh, "Learning to Generate Text-grounded Mask for Open-world Semantic
Segmentation from Only Image-Text Pairs", CVPR 2023. Reference code: kakaobrain/tcl@bc2b551
(models/tcl/{tcl,masker,decoders,modules,encoders}.py, segmentation/evaluation/tcl_seg.py).
Checkpoint: https://github.com/kakaobrain/tcl/releases/download/v1.0.0/tcl.pth, holding only the
learned ``masker.*`` parameters; the frozen towers are OpenAI CLIP ViT-B/16 from open_clip.

Per window, batched over the B windows of a forward pass (TCL's ``TCL.generate_masks`` and
``TCLSegInference.encode_decode``): zero-pad to a multiple of the patch size; the frozen image
tower runs every block but the last, whose output x feeds both the frozen last block with
MaskCLIP attention (-> clip_map) and the grounder (a trained copy of that block, MaskCLIP
attention too) -> gated decoder (x4) -> LN + projection -> E at 1/4 of the padded window;
M = sigmoid(w * cos(E, t) + b); PAMR; M = kp_w * K + (1 - kp_w) * M with the KP map
K = sigmoid(10 * (cos(clip_map, t) - 0.25)); bilinear to the padded window; unpad. Datasets with
a background class get the constant plane bg_thresh as channel 0 of every window.

Quirks kept on purpose (each checked by running kakaobrain/tcl@bc2b551 on CPU):
- ImageNet normalisation, not CLIP's (a GroupViT legacy in TCL).
- Class embedding = mean of the raw template features, then L2 (eps 1e-6); TCL normalises the
  class embeddings once more where it uses them, and so does this adapter.
- The position table is resized whenever the patch grid is not the square one, to
  ``size=(h, w)`` (clip_dense rule ``tcl``), unlike SCLIP's token-count rule.
- The PAMR guide is resized with ``align_corners=True``, every other bilinear resize with
  ``align_corners=False``; the decoder's x2 upsampling is nearest.
- The KP branch is mixed in after PAMR, and only background datasets get the plane, which is
  averaged over windows and resized with the class masks (adding it after resizing differs).
- Scores are soft masks in [0, 1]; the label is the argmax of their float32 softmax.

Not matched bit for bit: TCL runs the towers in CLIP's sequence-first layout through
``nn.MultiheadAttention`` (here batch-first open_clip blocks and an explicit value path), and
its published run used cuDNN TF32 convolutions on GPU; both differ at float level only.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..imaging import NORMALISATIONS
from ..errors import ConfigError, WeightsError
from ..resources import configs_dir
from ..yamlconf import load_dataclass
from . import clip_dense
from .checkpoints import Mismatch, compare_state_dict, fetch_checkpoint, load_strict, read_checkpoint, sha256_file
from .base import (DatasetInfo, DenseFeatureMethod, MethodInputs, PaddedFeatures, Trunk, Vocabulary, WeightsOptions,
                   register_config_variants, synonym_queries)
from .clip_family import synonym_max
from .clip_model import load_clip
from .pamr import PAMR, TCL_PAMR
from .prompts import AVERAGING, ClipTextEncoder, weights_key

TCL_CHECKPOINT_URL = "https://github.com/kakaobrain/tcl/releases/download/v1.0.0/tcl.pth"
NORM_EPS = 1e-6  # TCL's us.normalize (F.normalize with eps 1e-6)


@dataclasses.dataclass(frozen=True)
class TclConfig:
    """One ``configs/methods/tcl*.yaml``; defaults are TCL's configs/eval.yml."""

    name: str
    paper: str
    variant_of: str | None = None  # a --config file named after itself, run as a variant of this method
    native_protocol: str | None = None  # the preset `--protocol native` resolves to
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    normalisation: str = "imagenet"
    templates: str = "tcl9"
    template_average: str = "raw"
    pamr: bool = True
    bg_thresh: float = 0.4
    kp_w: float = 0.3
    kp_temperature: float = 10.0
    kp_shift: float = 0.25
    checkpoint_url: str = TCL_CHECKPOINT_URL

    def __post_init__(self) -> None:
        checks = [("normalisation", self.normalisation, tuple(NORMALISATIONS)),
                  ("template_average", self.template_average, AVERAGING)]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"method '{self.name}': {key} '{value}' is not one of {allowed}")
        if not 0.0 <= self.kp_w <= 1.0:
            raise ConfigError(f"method '{self.name}': kp_w must lie in [0, 1], found {self.kp_w}")


def load_tcl_config(name: str, path: Path | None = None) -> TclConfig:
    return load_dataclass(TclConfig, path or configs_dir() / "methods" / f"{name}.yaml")


# ----------------------------------------------------------------------------- modules
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``[B, C, H, W]`` (eps 1e-5), TCL's modules.LayerNorm2d."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Gate(nn.Module):
    """``tanh(g) * x`` with a 0-dim learned ``gate`` g (initialised 0: the block starts as identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.gate) * x


class ConvBlock(nn.Module):
    """Pre-activation block: LayerNorm2d -> exact GELU -> 3x3 conv (bias, zero pad) -> gate (TCL's GDecoder)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(channels, eps=1e-5)
        self.activ = nn.GELU()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=True)
        self.gate = Gate()

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.conv(self.activ(self.norm(x))))


class ResConv(nn.Module):
    """Nearest x2 upsampling, then two gated residual conv blocks: x += conv(x); x += conv2(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = ConvBlock(channels)
        self.conv2 = ConvBlock(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2)  # nearest, as TCL's ResConv(upsample=True)
        x = x + self.conv(x)
        return x + self.conv2(x)


class GDecoder(nn.Module):
    """TCL's gated decoder: ``layers`` ResConv blocks, ``[B, C, h, w]`` -> ``[B, C, 4h, 4w]``."""

    def __init__(self, channels: int, layers: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(*[ResConv(channels) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LNProj(nn.Module):
    """``ln`` then ``@ proj`` on every position: ``[B, C, H, W]`` -> ``[B, E, H, W]`` (TCL's LNProjLayer)."""

    def __init__(self, ln: nn.Module, proj: Tensor) -> None:
        super().__init__()
        self.ln = ln
        self.proj = nn.Parameter(proj)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        tokens = self.ln(x.flatten(2).transpose(1, 2)) @ self.proj  # [B, H*W, E]
        return tokens.transpose(1, 2).reshape(b, -1, h, w)


class Sim2Mask(nn.Module):
    """Soft mask ``sigmoid(cos * w + b)`` with 0-dim learned w, b (init 10, -2.5, as TCL's Sim2Mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(10.0))
        self.b = nn.Parameter(torch.tensor(-2.5))

    def forward(self, cosine: Tensor) -> Tensor:
        return torch.sigmoid(cosine * self.w + self.b)


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, 1+h*w, D]`` tokens (CLS first) -> ``[B, D, h, w]`` patch map, CLS dropped."""
    patches = tokens[:, 1:]
    return patches.transpose(1, 2).reshape(patches.shape[0], -1, grid[0], grid[1])


class TclMasker(nn.Module):
    """The learned part of TCL, shaped after the backbone ``visual`` (an open_clip ViT).

    ``grounder``: a copy of the last block (its weights come from the checkpoint), run with the
    MaskCLIP diagonal attention; ``decoder``: GDecoder at the tower width D; ``image_proj``:
    LN(D) + [D, E] projection; ``sim2mask``: the w, b mask head.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        width, embed = visual.proj.shape
        self.grounder = copy.deepcopy(visual.transformer.resblocks[-1])
        self.decoder = GDecoder(int(width))
        self.image_proj = LNProj(copy.deepcopy(visual.ln_post), visual.proj.detach().clone())
        self.sim2mask = Sim2Mask()
        self.requires_grad_(False)

    def embed(self, feats: Tensor, grid: tuple[int, int]) -> Tensor:
        """Last-block input ``[B, 1+h*w, D]`` -> E ``[B, E, 4h, 4w]`` (not normalised)."""
        x = clip_dense.last_block(self.grounder, feats, "maskclip", grid)
        return self.image_proj(self.decoder(tokens_to_map(x, grid)))


# ----------------------------------------------------------------------------- checkpoint
# Published key prefix of each TclMasker child, as TCL's module names give them (the released
# tcl.pth could not be inspected byte for byte here). The grounder keeps its block's index in
# CLIP's resblocks (L-1), and the decoder sits in a Sequential named "decoder" inside the
# masker's "decoder": hence the doubled decoder.decoder.
CHECKPOINT_PREFIXES = {
    "grounder": "masker.image_encoder.backbone.transformer.resblocks.{block}.",
    "decoder": "masker.image_encoder.decoder.decoder.",
    "image_proj": "masker.image_encoder.decoder.image_proj.",
    "sim2mask": "masker.sim2mask.",
}
# Loss temperatures are unused at inference; the frozen towers (in a full training checkpoint)
# come from --pretrained instead.
IGNORED_KEYS = re.compile(r".+_loss\..+|clip_(image|text)_encoder\..+")
_MAX_LISTED = 40


def published_key(name: str, block_index: int) -> str:
    """Checkpoint key of TclMasker parameter ``name`` (e.g. ``sim2mask.w`` -> ``masker.sim2mask.w``)."""
    head, _, rest = name.partition(".")
    return CHECKPOINT_PREFIXES[head].format(block=block_index) + rest


def remap_checkpoint(checkpoint: Any, expected: Mapping[str, tuple[int, ...]], *, block_index: int,
                     source: str) -> dict[str, Tensor]:
    """TCL's ``torch.save`` dict -> a TclMasker state dict, refusing any mismatch.

    Args:
        checkpoint: what ``torch.load`` returned; ``checkpoint["model"]`` is the state dict.
        expected: TclMasker parameter name -> shape (0-dim gates and w/b are ``()``).
        block_index: index of the grounder's block in the published keys (L-1, 11 for ViT-B/16).
        source: file name for the messages.

    Returns:
        Parameter name -> tensor for every name of ``expected``.

    Raises:
        WeightsError: listing every missing, unexpected and mis-shaped key (never a partial load).
    """
    state = _model_entry(checkpoint, source)
    wanted = {published_key(name, block_index): name for name in expected}
    published = {key: value for key, value in state.items()
                 if key in wanted or not IGNORED_KEYS.fullmatch(str(key))}
    mismatch = compare_state_dict(published, {key: expected[name] for key, name in wanted.items()})
    if mismatch:
        raise WeightsError(_mismatch_message(source, block_index, expected, mismatch))
    return {wanted[key]: value for key, value in published.items()}


def _model_entry(checkpoint: Any, source: str) -> Mapping[str, Any]:
    is_dict = isinstance(checkpoint, Mapping)
    state = checkpoint.get("model") if is_dict else None
    if not isinstance(state, Mapping):
        found = f"keys {sorted(map(str, checkpoint))[:5]}" if is_dict else type(checkpoint).__name__
        raise WeightsError(f"{source}: expected TCL's checkpoint format, a dict whose 'model' entry is the state "
                           f"dict, found {found}; pass the tcl.pth released at {TCL_CHECKPOINT_URL}")
    return state


def _mismatch_message(source: str, block_index: int, expected: Mapping[str, tuple[int, ...]],
                      mismatch: Mismatch) -> str:
    width, embed = expected["image_proj.proj"]
    return (f"{source}: not a TCL checkpoint for this backbone (grounder = resblocks.{block_index}, width "
            f"{width}, embedding {embed}): {mismatch.describe(_MAX_LISTED)}. Pass the tcl.pth released at "
            f"{TCL_CHECKPOINT_URL} with --model ViT-B-16 --pretrained openai, or a checkpoint in the same key "
            "layout made for --model")


# ----------------------------------------------------------------------------- adapter
@dataclasses.dataclass(frozen=True)
class TclVocabulary(Vocabulary):
    """A vocabulary whose query 0 may be TCL's constant background plane.

    ``bg_plane``: the plane's value (``embeddings`` row 0 is then an unused zero row and query 0
    belongs to class 0), or None for datasets without a background class.
    """

    bg_plane: float | None = None


class Tcl(DenseFeatureMethod):
    """Shared adapter; the registered names below bind it to their config files."""

    def __init__(self, config: TclConfig, weights: WeightsOptions, device: torch.device,
                 inputs: MethodInputs | None = None):
        self.config = config
        self.device = device
        self.normalisation = NORMALISATIONS[config.normalisation]
        checkpoint, self._checkpoint_record = self._checkpoint_file(weights.checkpoint)
        clip = load_clip(weights.model or config.model, weights.pretrained or config.pretrained, device)
        self.model, self.tokenizer, self._weights = clip.model, clip.tokenizer, clip.record
        self._weights_key = weights_key(self._weights)  # keys the trunk, asked for every batch
        visual = self.model.visual
        self.patch = int(visual.conv1.kernel_size[0])
        self.masker = TclMasker(visual)
        _load_masker(self.masker, checkpoint, block_index=len(visual.transformer.resblocks) - 1)
        self.masker.to(device).eval()
        self.pamr = PAMR(**TCL_PAMR).to(device) if config.pamr else None
        self.text = ClipTextEncoder(self.model, self.tokenizer, self._weights, templates=config.templates,
                                    average=config.template_average, device=device)

    def _checkpoint_file(self, given: Path | None) -> tuple[Path, dict[str, Any]]:
        if given is None:
            path, digest = fetch_checkpoint(self.config.checkpoint_url, what="TCL checkpoint")
            return path, {"checkpoint": self.config.checkpoint_url, "checkpoint_sha256": digest}
        path = Path(given).expanduser()
        if not path.is_file():
            raise WeightsError(f"--checkpoint {path}: file not found; pass the TCL checkpoint (tcl.pth from "
                               f"{self.config.checkpoint_url})")
        return path, {"checkpoint": str(path.resolve()), "checkpoint_sha256": sha256_file(path)}

    def weights(self) -> dict[str, Any]:
        return {**self._weights, **self._checkpoint_record}

    def settings(self, dataset: str) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        # weights() records the weights actually used, the result the variant and the preset.
        for key in ("model", "pretrained", "variant_of", "native_protocol"):
            cfg.pop(key)
        cfg["pamr_settings"] = dict(TCL_PAMR) if self.config.pamr else None
        cfg["pos_resize"] = "tcl"
        return cfg

    def encode_classes(self, classes: list[list[str]], info: DatasetInfo) -> TclVocabulary:
        """Text queries for every synonym of the classes; background is never text-encoded (as in tcl_seg.py)."""
        plane = info.background_class
        first = 1 if plane else 0
        names, queries = synonym_queries(classes, first)
        query_class = ([0] if plane else []) + queries
        embeddings = self.text.encode(names)
        if plane:
            embeddings = torch.cat([embeddings.new_zeros(1, embeddings.shape[1]), embeddings])
        return TclVocabulary(embeddings, torch.tensor(query_class, dtype=torch.long, device=self.device),
                             len(classes), bg_plane=self.config.bg_thresh if plane else None)

    def embed_windows(self, windows: Tensor) -> PaddedFeatures:
        """What TCL computes before any text: the grounder + decoder embedding, the PAMR guide and
        the KP branch's projected CLIP map, for windows zero-padded to a multiple of the patch.

        The vocabulary first enters in the masker's similarity (``TclMasker.forward``: the
        grounder, decoder and projection act on image features alone), then in PAMR (on the
        masks) and the KP mix (cosine with the text), all in :meth:`score`.
        """
        return DenseFeatureMethod.embed_windows(self, windows)

    def trunk(self, size: tuple[int, int]) -> Trunk:
        """The frozen tower up to the last block's input (TCL's hooked feats[0], the output of
        block L-2), on zero-padded windows with TCL's position rule; the grounder, the decoder
        and the frozen last block branch from it."""
        visual = self.model.visual
        padded = tuple(side + (-side % self.patch) for side in size)
        key = ("open_clip-vit/penultimate", self._weights_key, "pos:tcl", ("centre-pad", padded),
               str(visual.conv1.weight.dtype), str(self.device))
        return Trunk(key, f"CLIP blocks 0-{len(visual.transformer.resblocks) - 2} (TCL position rule)", self._penultimate)

    def _penultimate(self, windows: Tensor) -> tuple[Tensor, tuple[int, int], Tensor, tuple[int, int]]:
        padded, offset = clip_dense.pad_to_multiple(windows, self.patch)
        feats, grid = clip_dense.penultimate_tokens(self.model.visual, padded, pos_rule="tcl")
        return feats, grid, padded, offset

    def embed_from_trunk(self, shared: tuple[Tensor, tuple[int, int], Tensor, tuple[int, int]],
                         windows: Tensor) -> PaddedFeatures:
        feats, grid, padded, offset = shared
        visual = self.model.visual
        depth = len(visual.transformer.resblocks)
        embedding = F.normalize(self.masker.embed(feats, grid), dim=1, eps=NORM_EPS)
        maps = {"embedding": embedding}
        if self.pamr is not None:
            maps["guide"] = F.interpolate(padded, size=embedding.shape[-2:], mode="bilinear", align_corners=True)
        if self.config.kp_w:
            clip_tokens = clip_dense.last_block(visual.transformer.resblocks[depth - 1], feats, "maskclip", grid)
            kp = tokens_to_map(clip_dense.project_tokens(visual, clip_tokens), grid)
            maps["kp"] = F.normalize(kp, dim=1, eps=NORM_EPS)
        return PaddedFeatures(maps, (padded.shape[-2], padded.shape[-1]), offset)

    def score(self, features: PaddedFeatures, vocab: Vocabulary, size: tuple[int, int]) -> Tensor:
        """[B,Q,h,w] soft masks in [0, 1]: mask head, PAMR at 1/4, KP mix, bilinear to the padded
        window, unpadding. With a background plane, channel 0 is the constant ``bg_thresh`` (per
        window, as TCL's ``encode_decode``)."""
        bg_plane = getattr(vocab, "bg_plane", None)
        text = vocab.embeddings[1:] if bg_plane is not None else vocab.embeddings
        text = F.normalize(text, dim=-1, eps=NORM_EPS)
        maps = features.maps
        masks = self.masker.sim2mask(torch.einsum("bchw,nc->bnhw", maps["embedding"], text))
        if self.pamr is not None:
            masks = self.pamr(maps["guide"], masks)
        if self.config.kp_w:
            masks = self._kp_mix(maps["kp"], text, masks)
        masks = F.interpolate(masks, size=features.padded, mode="bilinear", align_corners=False)
        (top, left), (height, width) = features.offset, size
        masks = masks[:, :, top:top + height, left:left + width]
        if bg_plane is None:
            return masks
        return torch.cat([masks.new_full((masks.shape[0], 1, height, width), bg_plane), masks], dim=1)

    def _kp_mix(self, kp: Tensor, text: Tensor, masks: Tensor) -> Tensor:
        """TCL's KP mix: M <- kp_w * K + (1 - kp_w) * M, K = sigmoid((cos(clip_map, t) - shift) * temperature)."""
        cosine = torch.einsum("bchw,nc->bnhw", kp, text)
        keep = torch.sigmoid((cosine - self.config.kp_shift) * self.config.kp_temperature)
        keep = F.interpolate(keep, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return self.config.kp_w * keep + (1.0 - self.config.kp_w) * masks

    def postprocess(self, scores: Tensor, image: Tensor, vocab: Vocabulary, info: DatasetInfo) -> Tensor:
        """[Q,H,W] stitched masks -> [H,W] labels: max over synonyms, argmax of the float32 softmax (mmseg 0.27)."""
        return torch.softmax(synonym_max(scores.float(), vocab), dim=0).argmax(dim=0)


def _load_masker(masker: TclMasker, path: Path, *, block_index: int) -> None:
    expected = {name: tuple(value.shape) for name, value in masker.state_dict().items()}
    checkpoint = read_checkpoint(path, hint=f"pass the tcl.pth released at {TCL_CHECKPOINT_URL}")
    state = remap_checkpoint(checkpoint, expected, block_index=block_index, source=str(path))
    load_strict(masker, state, source=str(path))


# ----------------------------------------------------------------------------- variants
register_config_variants(Tcl, ("tcl", "tcl_nopamr"), load_tcl_config)
