"""ReCo's two image networks as building blocks: DeiT-S/16-SIN dense features and DenseCLIP.

Paper: Shin, Xie, Albanie, "ReCo: Retrieve and Co-segment for Zero-shot Transfer", NeurIPS 2022.
Reference: github.com/NoelShin/reco@5c5e1bc, with OpenAI's CLIP (github.com/openai/CLIP@d05afc4).

- **DeiT-S/16-SIN** (utils/utils.py:30-38): a distilled DeiT-S (384-d, 12 blocks, 6 heads, patch 16,
  CLS + distillation tokens, LayerNorm eps 1e-6, qkv bias; networks/vit/distilled_vision_transformer.py:489-495)
  trained on Stylized ImageNet, weights ``deit_s_sin_dist.pth`` (the ``"model"`` entry, timm's key
  layout). Built here as timm's ``deit_small_distilled_patch16_224``, whose keys are the same.
  Dense features are ReCo's ``DistilledVisionTransformer.forward`` (same file, 410-440).
- **DenseCLIP** (networks/dense_clip.py:813-922): CLIP RN50x16's trunk, then attnpool's ``v_proj``
  and ``c_proj`` as 1x1 convolutions on the stride-32 map. ReCo rebuilds the trunk as an mmseg
  ``ResNetClip`` (deep stem, avg-down, CLIP-style bottleneck pooling, dense_clip.py:805-810), which
  computes what open_clip's ``ModifiedResNet`` stem and layers compute; we run the latter.

Quirks kept on purpose:
- ReCo loads DeiT with ``strict=False`` (utils/utils.py:37), so a wrong file would run on random
  tensors; here the load is strict.
- The position embedding is resized only when the patch *count* differs from the native one
  (distilled_vision_transformer.py:355-358): a grid of another shape but the same count gets the
  native embedding unresized, in its flattened order.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsError
from .checkpoints import fetch_checkpoint, load_strict, read_checkpoint

DEIT_S_SIN_ARCH = "deit_small_distilled_patch16_224"
# The URL ReCo downloads from (utils/utils.py:33-35).
DEIT_S_SIN_URL = ("https://github.com/Muzammal-Naseer/Intriguing-Properties-of-Vision-Transformers/"
                  "releases/download/v0/deit_s_sin_dist.pth")
DEIT_PREFIX_TOKENS = 2  # CLS and distillation tokens lead the sequence
_DEIT_HINT = f"pass ReCo's DeiT-S/16-SIN checkpoint, {DEIT_S_SIN_URL}"


# ----------------------------------------------------------------------------- DeiT-S/16-SIN
def build_deit_s_sin(checkpoint: Path | None = None, *, cache_dir: Path | None = None) -> nn.Module:
    """timm's distilled DeiT-S/16 with ReCo's SIN weights, in eval mode.

    ``checkpoint`` is a local ``deit_s_sin_dist.pth``; without one the release is fetched once into
    the cache (trust on first use). Raises WeightsError if the file does not fit key by key.
    """
    import timm

    model = timm.create_model(DEIT_S_SIN_ARCH, pretrained=False)
    if checkpoint is None:
        checkpoint, _ = fetch_checkpoint(DEIT_S_SIN_URL, cache_dir, what="DeiT-S/16-SIN checkpoint")
    load_deit_checkpoint(model, Path(checkpoint))
    return model.eval().requires_grad_(False)


def build_deit_for(path: Path) -> nn.Module:
    """A distilled DeiT shaped after the checkpoint at ``path`` (DeiT-S/16 for ReCo's file, a tiny
    one for tests): width, depth, patch, native grid and MLP ratio read off the tensors, 64-d
    heads as in every DeiT; then loaded strictly, eval mode."""
    from timm.models.deit import VisionTransformerDistilled

    state = deit_state_dict(read_checkpoint(path, hint=_DEIT_HINT), source=str(path))
    try:
        width, patch = int(state["cls_token"].shape[-1]), int(state["patch_embed.proj.weight"].shape[-1])
        side = math.isqrt(int(state["pos_embed"].shape[1]) - DEIT_PREFIX_TOKENS)
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    except (KeyError, IndexError) as exc:
        raise WeightsError(f"{path}: not a distilled DeiT state dict (no {exc}); {_DEIT_HINT}") from None
    model = VisionTransformerDistilled(img_size=side * patch, patch_size=patch, embed_dim=width, depth=depth,
                                       num_heads=max(1, width // 64), mlp_ratio=hidden / width, qkv_bias=True)
    load_strict(model, state, source=str(path), hint=_DEIT_HINT)
    return model.eval().requires_grad_(False)


def load_deit_checkpoint(model: nn.Module, path: Path) -> None:
    """Load the ``"model"`` entry of a DeiT training checkpoint into ``model``, strictly."""
    state = deit_state_dict(read_checkpoint(path, hint=_DEIT_HINT), source=str(path))
    load_strict(model, state, source=str(path), hint=_DEIT_HINT)


def deit_state_dict(checkpoint: Any, *, source: str) -> Mapping[str, Tensor]:
    """The weights in a DeiT release: ``checkpoint["model"]`` (ReCo reads that key, utils/utils.py:37)."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        found = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise WeightsError(f"{source}: expected a dict with the weights under 'model', found {found}; {_DEIT_HINT}")
    return checkpoint["model"]


def deit_dense_features(model: nn.Module, images: Tensor) -> Tensor:
    """ReCo's DeiT dense features: the final-norm patch tokens as a map.

    Args:
        model: a timm distilled ViT (``cls_token``, ``dist_token``, ``pos_embed`` with two prefix
            tokens, ``patch_embed.proj``, ``blocks``, ``norm``), eval mode.
        images: ``[B, 3, H, W]`` ImageNet-normalised, any float dtype; H, W >= patch size.

    Returns:
        ``[B, D, H // p, W // p]`` (D = 384, p = 16 for DeiT-S/16) in the model's dtype; the last
        ``H % p`` rows and ``W % p`` columns of pixels are not seen (the stride-p conv drops them).
    """
    patch = model.patch_embed.proj.stride
    height, width = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
    # timm's PatchEmbed insists on 224x224 unless built dynamic; its conv alone is ReCo's PatchEmbed (154-163).
    tokens = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    batch = tokens.shape[0]
    prefix = torch.cat((model.cls_token.expand(batch, -1, -1), model.dist_token.expand(batch, -1, -1)), dim=1)
    tokens = torch.cat((prefix, tokens), dim=1)  # order CLS, dist, patches (ReCo 426)
    tokens = model.pos_drop(tokens + deit_position_embedding(model, (height, width)))
    for block in model.blocks:
        tokens = block(tokens)
    tokens = model.norm(tokens)
    return tokens[:, DEIT_PREFIX_TOKENS:].transpose(1, 2).reshape(batch, -1, height, width)


def deit_position_embedding(model: nn.Module, grid: tuple[int, int]) -> Tensor:
    """``model.pos_embed`` for a ``grid`` of patches: ``[1, 2 + h*w, D]``, as ReCo resizes it (349-372).

    Bicubic, ``align_corners=False`` and no antialias (ReCo's ``F.interpolate`` call; timm's own
    resampler antialiases, which moves features by about 2e-2). Left as is when the patch count
    matches the native grid's, even if the shape does not (ReCo 357-358).
    """
    pos_embed = model.pos_embed
    native = tuple(model.patch_embed.grid_size)
    if grid[0] * grid[1] == native[0] * native[1]:
        return pos_embed
    prefix, patches = pos_embed[:, :DEIT_PREFIX_TOKENS], pos_embed[:, DEIT_PREFIX_TOKENS:]
    dim = patches.shape[-1]
    patches = patches.reshape(1, native[0], native[1], dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=False)
    return torch.cat((prefix, patches.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


# ----------------------------------------------------------------------------- DenseCLIP
def prepare_denseclip(visual: nn.Module, *, fp16_convs: bool = True) -> nn.Module:
    """open_clip's ``ModifiedResNet`` (e.g. ``create_model("RN50x16").visual``) set up as ReCo runs it.

    Eval mode (running BatchNorm statistics; ReCo's get_model calls ``eval()``, utils/utils.py:53-54),
    no gradients, and with ``fp16_convs`` every convolution and linear weight and bias rounded to
    fp16 and back. Why: ReCo converts its weights from ``clip.load(arch, device="cpu")``
    (dense_clip.py:854-890), and OpenAI's ``build_model`` rounds Conv/Linear parameters to fp16
    (openai/CLIP@d05afc4:clip/model.py:375-396, 434) before ``model.float()`` (clip/clip.py:139-141)
    while BatchNorm keeps full precision. On OpenAI's released weights, already fp16 values, the
    rounding changes nothing; on weights from other sources it is ReCo's numerics. Changes
    ``visual`` in place and returns it.
    """
    if not isinstance(getattr(visual, "attnpool", None), nn.Module) or not hasattr(visual, "layer4"):
        raise WeightsError(f"DenseCLIP needs a CLIP ResNet visual tower (open_clip ModifiedResNet, e.g. RN50x16), "
                           f"found {type(visual).__name__}; pass open_clip.create_model('RN50x16').visual")
    visual.eval().requires_grad_(False)
    if fp16_convs:
        round_to_fp16(visual)
    return visual


@torch.no_grad()
def round_to_fp16(module: nn.Module) -> None:
    """Round every Conv/Linear weight and bias in ``module`` to fp16 and back to its dtype, in place.

    The modules OpenAI's ``convert_weights`` touches in a ResNet tower (clip/model.py:378-382);
    BatchNorm parameters and buffers and attnpool's positional embedding stay as they are.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            for param in (layer.weight, layer.bias):
                if param is not None:
                    param.copy_(param.half().to(param.dtype))


def denseclip_features(visual: nn.Module, images: Tensor) -> Tensor:
    """ReCo's DenseCLIP map: trunk, then ``v_proj`` and ``c_proj`` as 1x1 convolutions with biases.

    Args:
        visual: open_clip ``ModifiedResNet`` prepared by ``prepare_denseclip``.
        images: ``[B, 3, H, W]`` ImageNet-normalised (ReCo feeds DeiT's tensor to DenseCLIP too).

    Returns:
        ``[B, E, h, w]`` in the tower's dtype, E = ``c_proj.out_features`` (768 for RN50x16),
        h = ceil(H / 2) // 16 (= H // 32 for even H), likewise w. Attnpool's positional embedding,
        q/k and attention are not used (dense_clip.py:916-922).
    """
    x = visual.stem(images)
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = layer(x)
    pool = visual.attnpool
    x = _conv1x1(x, pool.v_proj)  # ReCo's v_proj: Conv2d(C, C, 1) loaded from attnpool (847, 901-909)
    return _conv1x1(x, pool.c_proj)


def _conv1x1(x: Tensor, linear: nn.Linear) -> Tensor:
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)
