"""Dense patch features of an open_clip ViT with a replaceable last block.

One code path serves vanilla CLIP (openai/CLIP, clip/model.py) and the training-free "last
block" variants: MaskCLIP (chongzhou96/MaskCLIP@245d31f:mmseg/models/backbones/vit.py), SCLIP
(wangf3014/SCLIP@b56bd30:clip/model.py), ClearCLIP (mc-lan/ClearCLIP@ad68a40:
open_clip/transformer.py) and NACLIP (sinahmr/NACLIP@0cac3a6:clip/model.py). TCL
(kakaobrain/tcl@bc2b551:models/tcl/tcl.py, sclip/model.py) reuses the same pieces (embedding,
first L-1 blocks, MaskCLIP last block, ln_post/proj).

Token layout used by every public function here: batch-first, ``[B, 1+N, D]`` with the CLS
token first and the N = h*w patch tokens in row-major grid order. open_clip's own layout
(``transformer.batch_first``) is respected internally when its blocks are called.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg_bench.errors import ConfigError

ATTENTION_VARIANTS = ("vanilla", "maskclip", "sclip", "clearclip", "naclip")
POS_RESIZE_RULES = ("sclip", "tcl", "maskclip")
# MaskCLIP's backbone is mmseg's VisionTransformer (chongzhou96/MaskCLIP@245d31f
# configs/_base_/models/maskclip_vit16.py: act_cfg GELU, norm_cfg LN eps 1e-6), not CLIP's block.
MMSEG_LN_EPS = 1e-6

# Vanilla CLIP, MaskCLIP and SCLIP keep the block's residual and FFN; ClearCLIP
# (``ignore_residual=True``) and NACLIP (its 'reduced' architecture) output out_proj(A v) alone.
_RESIDUAL_VARIANTS = frozenset({"vanilla", "maskclip", "sclip"})


def _check_variant(variant: str) -> None:
    if variant not in ATTENTION_VARIANTS:
        raise ConfigError(
            f"unknown attention variant {variant!r}; expected one of {ATTENTION_VARIANTS}"
        )


def _check_visual(visual: nn.Module) -> None:
    """Refuse towers whose token path is not the OpenAI-CLIP ViT one (openai/CLIP clip/model.py)."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer",
              "ln_post", "proj")
    missing = [name for name in needed if getattr(visual, name, None) is None]
    if missing:
        raise ConfigError(
            f"{type(visual).__name__} is not an open_clip ViT with a class token and a "
            f"projection (missing {missing}); dense CLIP features need one"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(
            visual, "final_ln_after_pool", False):
        # With an attentional pooler or LN-after-pool, "ln_post then proj on every token"
        # is not what the model was trained with.
        raise ConfigError(
            "vision towers with an attentional pooler or final_ln_after_pool are not "
            "supported for dense CLIP features"
        )


def _check_block(block: nn.Module) -> None:
    """Refuse blocks that are not open_clip's plain ResidualAttentionBlock."""
    attn = getattr(block, "attn", None)
    ok = (isinstance(attn, nn.MultiheadAttention)
          and getattr(attn, "in_proj_weight", None) is not None
          and all(hasattr(block, n) for n in ("ln_1", "ln_2", "mlp"))
          and not hasattr(block, "ln_1_kv"))
    if not ok:
        raise ConfigError(
            f"{type(block).__name__} is not an open_clip ResidualAttentionBlock with a fused "
            "in_proj (nn.MultiheadAttention); custom attention blocks are not supported"
        )


def _check_grid(x: Tensor, grid: tuple[int, int]) -> None:
    if grid[0] * grid[1] + 1 != x.shape[1]:
        raise ValueError(f"grid {tuple(grid)} does not match {x.shape[1]} tokens (1 + h*w)")


def interpolate_pos_embed(pos: Tensor, grid: tuple[int, int], *, rule: str = "sclip") -> Tensor:
    """Position table for a (h, w) patch grid.

    Args:
        pos: ``[1+N, D]`` learned table (CLS row first, N = n*n patches of a square grid).
        grid: target patch grid ``(h, w)``.
        rule: ``"sclip"`` (the SCLIP, ClearCLIP and NACLIP repos), ``"tcl"`` (TCL's) or
            ``"maskclip"`` (mmseg's ViT as MaskCLIP runs it), see below.

    Returns:
        ``[1+h*w, D]`` in ``pos.dtype``, CLS row kept; ``pos`` itself (not a copy) when the rule
        skips the resize. ``sclip``: resized only when the token count changes (a non-square
        grid with exactly N patches gets the square table added flattened), with the DINO scale
        factor. ``tcl``: resized whenever the grid is not the square (n, n) one, to ``size=(h, w)``.
        ``maskclip``: resized only when the token count changes, to ``size=(h, w)``
        (chongzhou96/MaskCLIP@245d31f mmseg/models/backbones/vit.py ``_pos_embeding`` and
        ``resize_pos_embed``). All bicubic, ``align_corners=False``, no antialias.
    """
    if rule not in POS_RESIZE_RULES:
        raise ConfigError(f"unknown position-resize rule {rule!r}; expected one of {POS_RESIZE_RULES}")
    h, w = grid
    n = _table_side(pos)
    if (h * w == n * n) if rule in ("sclip", "maskclip") else ((h, w) == (n, n)):
        return pos
    table = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    if rule in ("tcl", "maskclip"):
        # TCL's sclip/model.py helper takes the target shape (H, W) and resizes to it.
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
    else:
        # SCLIP/ClearCLIP/NACLIP pass the DINO scale factor (grid+0.1)/sqrt(N), not size=(h, w); the factor also
        # sets the sampling positions (dst+0.5)*sqrt(N)/(grid+0.1)-0.5.
        scale = ((h + 0.1) / n, (w + 0.1) / n)
        table = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(table.shape[-2:]) != (h, w):
        # floor(n*(g+0.1)/n) == g for every realistic g (checked for g < 400, n <= 32); never
        # crop or pad silently, since either would change the reference numerics.
        raise RuntimeError(
            f"bicubic position resize gave {tuple(table.shape[-2:])}, expected {(h, w)}"
        )
    table = table.permute(0, 2, 3, 1).reshape(h * w, -1)
    return torch.cat([pos[:1], table], dim=0)


def _table_side(pos: Tensor) -> int:
    """n for a ``[1+n*n, D]`` position table; refuses non-square tables."""
    num_patches = pos.shape[0] - 1
    n = math.isqrt(num_patches)
    if n * n != num_patches:
        raise ConfigError(f"position table has {num_patches} patch rows, not a square grid")
    return n


def pad_to_multiple(images: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad ``[B, C, H, W]`` symmetrically to multiples of ``multiple`` (ClearCLIP, TCL).

    Returns:
        The padded images (``images`` itself when no padding is needed) and the ``(top, left)``
        offsets of the original pixels: left = pad // 2, right = the rest (same for top/bottom).
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return images, (0, 0)
    top, left = pad_h // 2, pad_w // 2
    return F.pad(images, (left, pad_w - left, top, pad_h - top)), (top, left)


def embed_tokens(visual: nn.Module, images: Tensor, *,
                 pos_rule: str = "sclip") -> tuple[Tensor, tuple[int, int]]:
    """Patch embedding, CLS token, resized position table and ``ln_pre``.

    Args:
        visual: open_clip ``VisionTransformer``.
        images: ``[B, 3, H, W]`` normalised images, any size >= one patch.
        pos_rule: position-table resize rule of :func:`interpolate_pos_embed`.

    Returns:
        ``x`` ``[B, 1+h*w, D]`` (input of block 0) and the grid ``(h, w) = (H//p, W//p)``:
        the stride-p convolution drops the last ``H mod p`` rows / ``W mod p`` columns (as in SCLIP/NACLIP).
    """
    _check_visual(visual)
    patches = visual.conv1(images)  # [B, D, h, w]
    grid = (patches.shape[-2], patches.shape[-1])
    x = patches.flatten(2).transpose(1, 2)  # [B, h*w, D], row-major grid order
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_pos_embed(visual.positional_embedding, grid, rule=pos_rule).to(x.dtype)
    # patch_dropout is deliberately skipped: it is the identity at inference and would break
    # the grid during training.
    return visual.ln_pre(x), grid


def run_blocks(visual: nn.Module, x: Tensor, stop: int) -> Tensor:
    """Apply ``visual.transformer.resblocks[:stop]`` exactly as open_clip does.

    Args:
        visual: open_clip ``VisionTransformer``.
        x: ``[B, T, D]`` batch-first tokens.
        stop: number of leading blocks to run (0 returns ``x``).

    Returns:
        ``[B, T, D]`` batch-first tokens.
    """
    blocks = visual.transformer.resblocks
    if not 0 <= stop <= len(blocks):
        raise ValueError(f"stop={stop} outside [0, {len(blocks)}]")
    # open_clip >= 2.24 builds batch-first blocks; older layouts were sequence-first (LND).
    if _autocast_on(x):
        for block in blocks[:stop]:
            x = _autocast_block(block, x)
        return x
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in blocks[:stop]:
        x = block(x)
    return x if batch_first else x.transpose(0, 1)


def _autocast_on(x: Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def _autocast_block(block: nn.Module, x: Tensor) -> Tensor:
    """One residual block, batch-first, for mixed precision.

    Under autocast ``nn.MultiheadAttention`` leaves its fast path and, for batches above one,
    expands the input projection weight over every token (pytorch/pytorch#126973): gigabytes of
    copies per block. The same arithmetic written out (in_proj, scaled-dot-product attention,
    out_proj, MLP) avoids it; fp32 keeps open_clip's own call, bit-identical to the model.
    """
    _check_block(block)
    q, k, v = _qkv(block, x)
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    x = x + block.ls_1(block.attn.out_proj(attended))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """``[B, T, D]`` -> ``[B, heads, T, D/heads]``."""
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


def _qkv(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of ``ln_1(x)`` via the fused ``in_proj`` (CLIP's packed projection), each ``[B, H, T, d]``."""
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    heads = attn.num_heads
    return _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)


def _neighbourhood_bias(grid: tuple[int, int], sigma: float, like: Tensor) -> Tensor:
    """NACLIP Omega: ``[1+N, 1+N]``, exp(-|p_i-p_j|^2/(2 sigma^2)) on grid coordinates.

    As ``gaussian_window`` / ``get_attention_addition`` in sinahmr/NACLIP@0cac3a6:clip/model.py:
    sigma is in patch units and fixed whatever the grid; the Gaussian is unnormalised (peak 1)
    and the CLS row and column are 0.
    """
    h, w = grid
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    omega = torch.zeros(h * w + 1, h * w + 1, dtype=torch.float64)
    omega[1:, 1:] = torch.exp(-dist2 / (2.0 * sigma ** 2))
    return omega.to(dtype=like.dtype, device=like.device)


def _weights(q: Tensor, k: Tensor, variant: str, grid: tuple[int, int],
             sigma: float) -> Tensor:
    """A from per-head q, k ``[B, H, T, d]`` -> ``[B, H, T, T]`` (repositories in the module docstring)."""
    s = q.shape[-1] ** -0.5  # s = d^(-1/2), as in nn.MultiheadAttention
    if variant == "maskclip":
        eye = torch.eye(q.shape[-2], dtype=q.dtype, device=q.device)
        return eye.expand(q.shape[0], q.shape[1], -1, -1)
    if variant == "vanilla":
        return torch.softmax((s * q) @ k.transpose(-2, -1), dim=-1)
    if variant == "sclip":
        # SCLIP's custom_attn: the two softmaxes are summed without renormalisation (rows sum to 2).
        return (torch.softmax((s * q) @ q.transpose(-2, -1), dim=-1)
                + torch.softmax((s * k) @ k.transpose(-2, -1), dim=-1))
    if variant == "clearclip":
        return torch.softmax((s * q) @ q.transpose(-2, -1), dim=-1)
    # naclip: Omega is added after scaling, inside the softmax, not scaled by s (NACLIP's custom_attn).
    omega = _neighbourhood_bias(grid, sigma, q)
    return torch.softmax((s * k) @ k.transpose(-2, -1) + omega, dim=-1)


def attention_matrix(block: nn.Module, x: Tensor, variant: str, grid: tuple[int, int], *,
                     naclip_sigma: float = 5.0) -> Tensor:
    """Attention weights A of the variant for block input ``x``.

    Args:
        block: open_clip ``ResidualAttentionBlock``.
        x: ``[B, 1+N, D]`` batch-first block input.
        variant: one of ``ATTENTION_VARIANTS``.
        grid: patch grid ``(h, w)`` with ``h*w == N`` (used by NACLIP).
        naclip_sigma: NACLIP Gaussian width in patches.

    Returns:
        ``[B, H, 1+N, 1+N]`` in ``x.dtype``. Rows sum to 1, except SCLIP's, which sum to 2
        (SCLIP does not renormalise); MaskCLIP gives the identity (its last block uses the value path only).
    """
    _check_variant(variant)
    _check_block(block)
    _check_grid(x, grid)
    q, k, _ = _qkv(block, x)
    return _weights(q, k, variant, grid, naclip_sigma)


def _attention_branch(block: nn.Module, x: Tensor, variant: str, grid: tuple[int, int],
                      sigma: float) -> Tensor:
    """``out_proj(A v)`` with heads merged, ``[B, 1+N, D]``."""
    q, k, v = _qkv(block, x)
    if variant == "maskclip":
        out = v  # A = I: each token takes its own value (MaskCLIP's vit.py); skip the identity matmul
    else:
        out = _weights(q, k, variant, grid, sigma) @ v
    out = out.transpose(1, 2).reshape(x.shape)
    return block.attn.out_proj(out)


def last_block(block: nn.Module, x: Tensor, variant: str, grid: tuple[int, int], *,
               naclip_sigma: float = 5.0) -> Tensor:
    """The variant's version of residual block ``block``.

    Args:
        block: open_clip ``ResidualAttentionBlock`` (normally the last one).
        x: ``[B, 1+N, D]`` batch-first block input.
        variant: one of ``ATTENTION_VARIANTS``.
        grid: patch grid ``(h, w)``, ``h*w == N``.
        naclip_sigma: NACLIP Gaussian width in patches (NACLIP's default 5).

    Returns:
        ``[B, 1+N, D]``, same dtype as ``x``. vanilla calls the block itself (bit-identical to
        open_clip); maskclip/sclip: z = x + out_proj(A v), z += MLP(LN2(z)); clearclip/naclip:
        z = out_proj(A v) only.
    """
    _check_variant(variant)
    _check_block(block)
    _check_grid(x, grid)
    if variant == "vanilla":
        batch_first = block.attn.batch_first
        return block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    # ls_1/ls_2 are the block's layer scales (Identity for every CLIP checkpoint); they are
    # applied to the attention and MLP branches exactly where open_clip applies them.
    z = block.ls_1(_attention_branch(block, x, variant, grid, naclip_sigma))
    if variant in _RESIDUAL_VARIANTS:
        z = x + z
        z = z + block.ls_2(block.mlp(block.ln_2(z)))
    return z


def project_tokens(visual: nn.Module, x: Tensor) -> Tensor:
    """``ln_post`` then ``@ proj`` on every token (CLIP's image head): ``[B, T, D]`` -> ``[B, T, E]``."""
    _check_visual(visual)
    return visual.ln_post(x) @ visual.proj


def dense_features(visual: nn.Module, images: Tensor, variant: str, *,
                   naclip_sigma: float = 5.0) -> Tensor:
    """Patch embeddings with the variant's last block.

    Args:
        visual: open_clip ``VisionTransformer``.
        images: ``[B, 3, H, W]`` normalised images.
        variant: one of ``ATTENTION_VARIANTS``.
        naclip_sigma: NACLIP Gaussian width in patches.

    Returns:
        ``[B, E, H//p, W//p]`` in the tower's dtype; CLS dropped, NOT L2-normalised.
    """
    _check_variant(variant)
    x, grid = penultimate_tokens(visual, images)
    return finish_dense(visual, x, grid, variant, naclip_sigma=naclip_sigma)


def penultimate_tokens(visual: nn.Module, images: Tensor, *,
                       pos_rule: str = "sclip") -> tuple[Tensor, tuple[int, int]]:
    """The input of the last block: embedding, then every block but the last. What the last-block
    variants (and TCL's grounder) share: ``[B, 1+h*w, D]`` and the grid."""
    x, grid = embed_tokens(visual, images, pos_rule=pos_rule)
    return run_blocks(visual, x, len(visual.transformer.resblocks) - 1), grid


def finish_dense(visual: nn.Module, x: Tensor, grid: tuple[int, int], variant: str, *,
                 naclip_sigma: float = 5.0) -> Tensor:
    """The variant's last block on the penultimate tokens ``x``, ``ln_post``/``proj``, CLS dropped:
    ``[B, E, h, w]`` in the tower's dtype, not normalised."""
    _check_variant(variant)
    x = last_block(visual.transformer.resblocks[-1], x, variant, grid, naclip_sigma=naclip_sigma)
    tokens = project_tokens(visual, x)[:, 1:]  # [B, h*w, E]
    b, _, e = tokens.shape
    return tokens.transpose(1, 2).reshape(b, e, grid[0], grid[1])


# ----------------------------------------------------------------------------- MaskCLIP's own arithmetic

def _mmseg_ln(ln: nn.Module, x: Tensor) -> Tensor:
    """A CLIP LayerNorm's weights with mmseg's eps 1e-6, in the input's dtype (as open_clip casts)."""
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, MMSEG_LN_EPS).to(x.dtype)


def _mmseg_mlp(block: nn.Module, x: Tensor) -> Tensor:
    """CLIP's c_fc / c_proj with the exact (erf) GELU of mmseg's FFN instead of QuickGELU."""
    return block.mlp.c_proj(F.gelu(block.mlp.c_fc(x)))


def _mmseg_block(block: nn.Module, x: Tensor) -> Tensor:
    """One transformer layer as mmseg's ViT computes it: x + attn(LN1 x), then x + FFN(LN2 x)."""
    _check_block(block)
    h = _mmseg_ln(block.ln_1, x)
    # need_weights left at its default, as mmcv's MultiheadAttention calls nn.MultiheadAttention
    # in MaskCLIP: that is the explicit softmax(q k^T) v path, not the fused kernel.
    if block.attn.batch_first:
        attended = block.attn(h, h, h)[0]
    else:
        t = h.transpose(0, 1)
        attended = block.attn(t, t, t)[0].transpose(0, 1)
    x = x + block.ls_1(attended)
    return x + block.ls_2(_mmseg_mlp(block, _mmseg_ln(block.ln_2, x)))


def _mmseg_value_block(block: nn.Module, x: Tensor) -> Tensor:
    """MaskCLIP's last layer (vit.py:96-104): v of LN1(x) from the packed in-projection,
    out_proj(v), plus the block input x, then the FFN with its own residual."""
    _check_block(block)
    attn = block.attn
    qkv = F.linear(_mmseg_ln(block.ln_1, x), attn.in_proj_weight, attn.in_proj_bias)
    v = attn.out_proj(qkv.chunk(3, dim=-1)[2])
    z = x + block.ls_1(v)
    return z + block.ls_2(_mmseg_mlp(block, _mmseg_ln(block.ln_2, z)))


def mmseg_vit_features(visual: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Dense features of MaskCLIP's own code: mmseg's ViT on CLIP's weights, value path last.

    Patch embedding (bias-free conv), CLS, position table (the ``maskclip`` rule), LN eps 1e-6
    everywhere, exact GELU, the last layer's value path, ``ln_post`` on v, then the bias-free
    projection ``visual.proj`` as MaskCLIP's 1x1 conv (decode_heads/maskclip_head.py). Returns
    ``[B, E, h, w]`` (CLS dropped, not normalised) and the grid; ``images`` should already be
    padded to a multiple of the patch (MaskCLIP pads bottom/right, :func:`pad_bottom_right`).
    """
    _check_visual(visual)
    patches = visual.conv1(images)
    grid = (patches.shape[-2], patches.shape[-1])
    x = patches.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(visual.positional_embedding, grid, rule="maskclip").to(x.dtype)
    x = _mmseg_ln(visual.ln_pre, x)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = _mmseg_block(block, x)
    v = _mmseg_ln(visual.ln_post, _mmseg_value_block(blocks[-1], x))
    tokens = (v @ visual.proj)[:, 1:]
    b, _, e = tokens.shape
    return tokens.transpose(1, 2).reshape(b, e, grid[0], grid[1]), grid


def pad_bottom_right(images: Tensor, multiple: int) -> Tensor:
    """Zero padding (in normalised space) at the bottom and right to a multiple of the patch, as
    mmseg's PatchEmbed with ``padding='corner'`` does (mmseg/models/utils/embed.py)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
