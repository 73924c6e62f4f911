"""WeakTr's CAM generator, and SemPLeS's (the same network, retrained), on the label-conditioned track.

Papers: Zhu, Li, Fang, Liu, Xin, Liu, Wang, "WeakTr: Exploring Plain Vision Transformer for
Weakly-supervised Semantic Segmentation", arXiv 2304.01184 (IEEE TIP); Lin, Wang, Wang, Chen,
"SemPLeS: Semantic Prompt Learning for Weakly-Supervised Semantic Segmentation", arXiv 2401.11791
(WACV 2025). Reference: hustvl/WeakTr@3457ad3 (models.py, AAF.py, vision_transformer.py, engine.py
``generate_attention_maps_ms``, datasets.py ``VOC12DatasetMS``, evaluation.py); SemPLeS's inference
files are WeakTr's (kuongan/SemPLeS@378af5b, reference notes §5.7).

Network (models.py ``WeakTr``): DeiT-S/16 (384-d, 12 blocks, 6 heads, LayerNorm eps 1e-6, qkv bias)
with C class tokens instead of one CLS token (C = 20 VOC, 90 COCO), a 3x3 conv head (zero padding)
on the patch grid, **no final LayerNorm** (``norm`` is in the checkpoint but unused), and Adaptive
Attention Fusion (AAF.py) weighting the depth x heads attention maps. Three CAMs:

- coarse = ReLU(head map) (``coarse_cam``);
- fused = (class-to-patch cross attention) * coarse, WeakTr's default ``--attention-type fused``;
- fine = (patch-to-patch attention) @ fused, computed in the engine (``--patch-attn-refine``, on by
  default) on the patch grid before upsampling. **The fine CAM is what WeakTr's CAM generation saves
  and evaluates, and what this adapter returns.**

Multi-scale inference (engine.py ``generate_attention_maps_ms``, datasets.py ``VOC12DatasetMS``):
per scale s the image is resized with PIL CUBIC to ``(round(W*s), round(H*s))`` (Python ``round``),
normalised (x / 255, ImageNet unit statistics), and run once as is and once flipped (the whole
normalised tensor is flipped, so the flipped pass's patch grid covers other columns); each fine CAM
is upsampled bilinearly to the first scale's size, multiplied by the image's labels, flipped back,
and summed (not averaged); each present class is then min-max normalised with eps 1e-8.

Quirks kept on purpose: the position embedding is interpolated with DINO's ``scale_factor=(h+0.1)/14``
rule (skipped only for 196 patches with H == W, so a 224x240 image is resampled at scale
14.1/14); the AAF's per-head features are channels j, j+6, ... (an interleaved view); the 72 maps
go head-major (head 0 of blocks 0..11, then head 1, ...), the order of models.py's
``permute([1, 2, 0, 3, 4])``, for both the features and the maps. WeakTr ran under CUDA fp16
autocast; ``cuda_autocast`` does the same on CUDA (and nothing on the CPU, as WeakTr's own code).

Left out: CRF pseudo masks (``evaluation.py --out-crf``), COCO's reduction-4 SemPLeS generator
(it is a config of the same class), the RandWeight AAF ablation, training. The weights load
strictly (WeakTr itself loads with ``strict=False``).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..errors import ConfigError, WeightsError
from ..imaging import NORMALISATIONS
from ..resources import configs_dir
from ..yamlconf import load_dataclass
from .base import CamMethod, DatasetInfo, MethodInputs, WeightsOptions, register_config_variants
from .checkpoints import fetch_checkpoint, load_strict, read_checkpoint

POOLS = ("max", "avg")


@dataclasses.dataclass(frozen=True)
class WeakTrConfig:
    """One ``configs/methods/{weaktr,semples}.yaml``; defaults are WeakTr's VOC recipe."""

    name: str
    paper: str
    variant_of: str | None = None
    native_protocol: str | None = None
    num_classes: int = 20            # class tokens (datasets.py build_dataset: 20 VOC, 90 COCO)
    embed_dim: int = 384             # models.py deit_small_WeakTr_patch16_224
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224              # native grid 14 x 14 (vision_transformer.py PatchEmbed)
    layer_norm_eps: float = 1e-6
    reduction: float = 8.0           # --reduction: AAF head FFN width int(depth*heads / reduction)
    pool: str = "max"                # --pool-type
    feat_reduction: int = 8          # --feat-reduction: AAF feature FFN 64 -> 64 / 8 -> 1
    scales: tuple[float, ...] = (1.0, 1.2)  # --scales
    flip: bool = True                # VOC12DatasetMS always adds the flipped copy
    normalisation: str = "imagenet_unit"
    min_max_eps: float = 1e-8
    cuda_autocast: bool = True       # engine.py torch.cuda.amp.autocast()
    bg_grid: tuple[int, int] = (40, 60)  # curve thresholds i / 100 for i in range(*bg_grid)
    bg_threshold: float = 0.43       # docs/Training.md `--t 43`
    checkpoint_url: str | None = None
    checkpoint_hint: str = ""        # where the checkpoint comes from, said when --checkpoint is missing
    crf: str | None = None           # the pseudo masks' dense CRF: a preset of methods/crf.py (weaktr_voc, weaktr_coco)

    def __post_init__(self) -> None:
        from .crf import CRF_PRESETS

        if self.crf is not None and self.crf not in CRF_PRESETS:
            raise ConfigError(f"method '{self.name}': crf '{self.crf}' is not one of {sorted(CRF_PRESETS)}")
        if self.pool not in POOLS:
            raise ConfigError(f"method '{self.name}': pool '{self.pool}' is not one of {POOLS}")
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"method '{self.name}': normalisation '{self.normalisation}' is not one of "
                              f"{sorted(NORMALISATIONS)}")
        if not self.scales or self.scales[0] != 1.0:
            raise ConfigError(f"method '{self.name}': scales must start with 1.0 (CAMs are upsampled to the "
                              f"first scale's size, which must be the image's), found {list(self.scales)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"method '{self.name}': embed_dim {self.embed_dim} is not a multiple of "
                              f"num_heads {self.num_heads}")
        if self.bg_threshold not in self.grid():
            raise ConfigError(f"method '{self.name}': bg_threshold {self.bg_threshold} is not on the grid "
                              f"range{tuple(self.bg_grid)} / 100")

    def grid(self) -> tuple[float, ...]:
        return tuple(i / 100 for i in range(*self.bg_grid))


def load_weaktr_config(name: str, path: Path | None = None) -> WeakTrConfig:
    return load_dataclass(WeakTrConfig, path or configs_dir() / "methods" / f"{name}.yaml")


# ----------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """vision_transformer.py ``Attention``: explicit softmax; returns (proj output, probabilities)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block returning (tokens, attention probabilities, attention output after ``proj``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, weights = self.attn(self.norm1(x))
        x = x + out
        return x + self.mlp(self.norm2(x)), weights, out


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class AAF(nn.Module):
    """Adaptive Attention Fusion (AAF.py ``AAF``): one weight in (0, 1) per attention map.

    Per map: pool its [tokens, head_dim] features over all tokens (class tokens included), a
    linear 64 -> 64/r_f -> 1 (no activation between), then over the maps' vector a bias-free
    FFN 72 -> int(72/r) -> ReLU -> 72 -> sigmoid.
    """

    def __init__(self, maps: int, reduction: float, head_dim: int, feat_reduction: int, pool: str):
        super().__init__()
        self.pool = pool
        hidden = int(maps / reduction)
        self.attn_head_ffn = nn.Sequential(nn.Linear(maps, hidden, bias=False), nn.ReLU(),
                                           nn.Linear(hidden, maps, bias=False), nn.Sigmoid())
        self.attn_feat_ffn = nn.Sequential(nn.Linear(head_dim, int(head_dim / feat_reduction)),
                                           nn.Linear(int(head_dim / feat_reduction), 1))

    def weights(self, feats: Tensor) -> Tensor:
        """[B, M, N, d] per-map features -> [B, M, 1, 1] weights."""
        pooled = feats.amax(dim=2) if self.pool == "max" else feats.mean(dim=2)  # [B, M, d]
        per_map = self.attn_feat_ffn(pooled).squeeze(-1)  # [B, M]
        return self.attn_head_ffn(per_map)[..., None, None]


class WeakTrNet(nn.Module):
    """WeakTr's network in its checkpoint's key layout (``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.*``, ``norm``, ``head``, ``adaptive_attention_fusion.*``)."""

    def __init__(self, config: WeakTrConfig):
        super().__init__()
        c, d = config.num_classes, config.embed_dim
        self.num_classes, self.patch = c, config.patch_size
        grid = config.img_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, c, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, c + grid * grid, d))
        self.blocks = nn.ModuleList(Block(d, config.num_heads, config.mlp_ratio, config.layer_norm_eps)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # in the checkpoint; WeakTr never applies it
        self.head = nn.Conv2d(d, c, kernel_size=3, stride=1, padding=1)
        self.adaptive_attention_fusion = AAF(config.depth * config.num_heads, config.reduction,
                                             d // config.num_heads, config.feat_reduction, config.pool)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """[B, 3, H, W] normalised -> coarse, fused, fine [B, C, H//p, W//p] and the averaged
        cross [B, C, N] and patch [B, N, N] attention (N = (H//p) * (W//p))."""
        b, _, height, width = x.shape
        hf, wf = height // self.patch, width // self.patch
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + weaktr_position_embedding(self.pos_embed, self.num_classes, (height, width), self.patch)
        maps, feats = [], []
        for block in self.blocks:
            tokens, weights, out = block(tokens)
            maps.append(weights)
            feats.append(out)
        c = self.num_classes
        patches = tokens[:, c:].reshape(b, hf, wf, -1).permute(0, 3, 1, 2).contiguous()
        coarse = F.relu(self.head(patches))
        attn = fuse_attention(torch.stack(maps), torch.stack(feats), self.adaptive_attention_fusion)
        cross = attn[:, :c, c:]
        patch_attn = attn[:, c:, c:]
        fused = cross.reshape(b, c, hf, wf) * coarse
        fine = torch.matmul(patch_attn.unsqueeze(1), fused.reshape(b, c, -1, 1)).reshape(b, c, hf, wf)
        return {"coarse": coarse, "fused": fused, "fine": fine, "cross": cross, "patch": patch_attn}


def fuse_attention(maps: Tensor, feats: Tensor, aaf: AAF) -> Tensor:
    """The AAF-weighted mean of all maps: [K, B, h, N, N] probabilities and [K, B, N, D] attention
    outputs of K blocks -> [B, N, N] (models.py ``forward``; not renormalised)."""
    k, b, h, n, _ = maps.shape
    ordered = maps.permute(1, 2, 0, 3, 4).reshape(b, h * k, n, n)  # head-major: index head * K + block
    # "head" j of the features holds channels j, j + h, j + 2h, ... (view(..., -1, h)).
    per_head = feats.reshape(k, b, n, -1, h).permute(1, 4, 0, 2, 3).reshape(b, h * k, n, -1)
    return (ordered * aaf.weights(per_head)).mean(dim=1)


def weaktr_position_embedding(pos_embed: Tensor, num_classes: int, size: tuple[int, int], patch: int) -> Tensor:
    """``pos_embed`` [1, C + N0, D] for an input of ``size`` (H, W): unchanged when the patch count
    is N0 and H == W, else the patch part resampled bicubically (align_corners=False) with
    ``scale_factor=((H//p + 0.1) / sqrt(N0), (W//p + 0.1) / sqrt(N0))`` (models.py
    ``interpolate_pos_encoding``, DINO's rule)."""
    height, width = size
    hf, wf = height // patch, width // patch
    native = pos_embed.shape[1] - num_classes
    if hf * wf == native and height == width:
        return pos_embed
    side, dim = math.sqrt(native), pos_embed.shape[-1]
    grid = pos_embed[:, num_classes:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((hf + 0.1) / side, (wf + 0.1) / side), mode="bicubic")
    if tuple(grid.shape[-2:]) != (hf, wf):
        raise ConfigError(f"position embedding resampled to {list(grid.shape[-2:])}, not the {hf}x{wf} patch grid")
    return torch.cat((pos_embed[:, :num_classes], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


# ----------------------------------------------------------------------------- weights
def weaktr_state_dict(checkpoint: Any, *, source: str, hint: str) -> Mapping[str, Tensor]:
    """The weights of a WeakTr training checkpoint: ``checkpoint["model"]`` (main.py saves
    ``{'model': model.state_dict(), 'epoch': ...}`` and ``--gen_attention_maps`` reads that key)."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        found = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise WeightsError(f"{source}: expected a dict with the weights under 'model', found {found}; {hint}")
    return checkpoint["model"]


def build_weaktr(config: WeakTrConfig, path: Path, *, hint: str = "") -> WeakTrNet:
    """The network of ``config`` with the checkpoint at ``path`` loaded strictly, eval mode."""
    model = WeakTrNet(config)
    state = weaktr_state_dict(read_checkpoint(path, hint=hint), source=str(path), hint=hint)
    load_strict(model, state, source=str(path), hint=hint)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- multi-scale CAMs
def scaled_inputs(image: np.ndarray, scales: tuple[float, ...]) -> list[np.ndarray]:
    """[H, W, 3] uint8 -> per scale the PIL-CUBIC resize to ``(round(W*s), round(H*s))`` with Python's
    ``round`` (datasets.py ``VOC12DatasetMS``); at scale 1.0 PIL returns the image unchanged.
    WeakTr's ``PIL.Image.CUBIC`` is the old name of ``Resampling.BICUBIC`` (3), gone in Pillow 10."""
    pil = Image.fromarray(image)
    width, height = pil.size
    cubic = Image.Resampling.BICUBIC
    return [np.array(pil.resize((round(width * s), round(height * s)), resample=cubic)) for s in scales]


def multiscale_cams(model: WeakTrNet, image: np.ndarray, present: Tensor, config: WeakTrConfig,
                    device: torch.device) -> Tensor:
    """WeakTr's summed fine CAMs: [C] multi-hot ``present`` -> [C, H, W] float32 (before min-max)."""
    norm = NORMALISATIONS[config.normalisation]
    size = image.shape[:2]
    present = present.to(device).view(-1, 1, 1)
    total = None
    autocast = config.cuda_autocast and device.type == "cuda"
    for scaled in scaled_inputs(image, config.scales):
        x = norm.apply(torch.from_numpy(scaled).permute(2, 0, 1)[None].to(device))
        for flipped in ((False, True) if config.flip else (False,)):
            with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
                fine = model(torch.flip(x, dims=[-1]) if flipped else x)["fine"]
                cam = F.interpolate(fine, size=size, mode="bilinear", align_corners=False)[0] * present
                cam = torch.flip(cam, dims=[-1]) if flipped else cam
            total = cam.float() if total is None else total + cam.float()
    return total


def min_max(cams: Tensor, eps: float) -> Tensor:
    """Per map ``(x - min) / (max - min + eps)`` (engine.py)."""
    flat = cams.flatten(1)
    low, high = flat.min(dim=1).values[:, None, None], flat.max(dim=1).values[:, None, None]
    return (cams - low) / (high - low + eps)


# ----------------------------------------------------------------------------- adapter
class WeakTr(CamMethod):
    """Shared adapter of ``weaktr`` and ``semples``; the registered names bind it to their configs.

    ``cams`` returns the min-max normalised fine CAMs of the present classes, ascending by token
    index, float32 at the image's size (WeakTr's saved ``{class index: map}``).
    """

    normalisation = NORMALISATIONS["imagenet_unit"]

    def __init__(self, config: WeakTrConfig, weights: WeightsOptions, device: torch.device,
                 inputs: MethodInputs | None = None):
        self.config, self.device = config, device
        self.normalisation = NORMALISATIONS[config.normalisation]
        checkpoint = weights.checkpoint
        if checkpoint is None and config.checkpoint_url is None:
            raise ConfigError(f"method '{config.name}' needs --checkpoint PATH: {config.checkpoint_hint}")
        if checkpoint is None:
            checkpoint, _ = fetch_checkpoint(config.checkpoint_url, what=f"{config.name} checkpoint")
        self.checkpoint = Path(checkpoint)
        self.model = build_weaktr(config, self.checkpoint, hint=config.checkpoint_hint).to(device)

    def weights(self) -> dict[str, Any]:
        from ..atomic import sha256_file

        c = self.config
        standard = (c.embed_dim, c.depth, c.patch_size) == (384, 12, 16)
        architecture = "DeiT-S-16" if standard else f"DeiT-{c.embed_dim}d-{c.depth}l-p{c.patch_size}"
        return {"architecture": architecture, "checkpoint": str(self.checkpoint.resolve()),
                "checkpoint_sha256": sha256_file(self.checkpoint), "random": False}

    def settings(self, dataset: str) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        for key in ("variant_of", "native_protocol", "checkpoint_url", "checkpoint_hint", "paper"):
            cfg.pop(key)
        cfg["cam"] = "fine"
        return cfg

    def curve(self, dataset: str) -> tuple[tuple[float, ...], float]:
        return self.config.grid(), self.config.bg_threshold

    def refine_pseudo_masks(self, masks: np.ndarray, cams: Any, image_path: Path | None,
                            image: np.ndarray) -> np.ndarray:
        """With ``crf`` set, each pseudo mask through WeakTr's label CRF (evaluation.py: the argmax
        in file order, ``crf_inference_label``, then back to label ids) on Pillow's RGB image."""
        if self.config.crf is None or not len(cams.classes):
            return masks
        from ..imaging import decode_pil_rgb
        from .crf import CRF_PRESETS, label_crf

        rgb = decode_pil_rgb(image_path) if image_path is not None else image
        label_key = np.array([0, *cams.classes], dtype=masks.dtype)
        compact = np.zeros(256, dtype=np.int64)
        compact[label_key] = np.arange(len(label_key))
        params = CRF_PRESETS[self.config.crf]
        return np.stack([label_key[label_crf(compact[m], len(label_key), rgb, params=params)] for m in masks])

    def key_labels(self, info: DatasetInfo) -> tuple[int, ...]:
        """Label id of each class token: VOC token k -> k + 1; COCO's 90 tokens (category id - 1)
        -> the 81-class cards' labels, -1 for the ten unused ids."""
        tokens = self.config.num_classes
        if tokens == info.num_classes - 1:
            return tuple(range(1, tokens + 1))
        if tokens == 90 and info.num_classes == 81:
            from ..datasets.cams import weaktr_coco_key_labels

            return weaktr_coco_key_labels()
        raise ConfigError(f"method '{self.config.name}' has {tokens} class tokens; dataset '{info.name}' has "
                          f"{info.num_classes} classes (WeakTr serves VOC with 20 tokens, COCO with 90)")

    def cams(self, image: np.ndarray, labels: tuple[int, ...], info: DatasetInfo, *, image_id: str,
             image_path: Path | None = None) -> Any:
        from ..datasets.cams import Cams
        from ..imaging import decode_pil_rgb

        if image_path is not None:  # WeakTr decodes with PIL, EXIF not applied (hustvl/WeakTr@3457ad3:datasets.py)
            image = decode_pil_rgb(image_path)

        keys = self.key_labels(info)
        tokens = sorted(keys.index(label) for label in set(labels))
        height, width = image.shape[:2]
        if not tokens:
            return Cams((), np.zeros((0, height, width), np.float32))
        present = torch.zeros(self.config.num_classes)
        present[tokens] = 1.0
        with torch.inference_mode():
            total = multiscale_cams(self.model, image, present, self.config, self.device)
            maps = min_max(total[tokens], self.config.min_max_eps)
        return Cams(tuple(keys[t] for t in tokens), maps.cpu().float().numpy())


register_config_variants(WeakTr, ("weaktr", "semples", "weaktr_crf", "semples_crf", "weaktr_coco", "weaktr_coco_crf",
                                  "semples_coco", "semples_coco_crf"), load_weaktr_config)
