"""Dense CLIP features (MaskCLIP, SCLIP, ClearCLIP, NACLIP last blocks) against independent, explicit computations.

The references below are written from the formulas only: explicit LayerNorm, per-head loops,
softmax via exp/sum, Omega by a double loop over grid coordinates, and a hand-written bicubic
(A = -0.75, clamped borders, src = (dst + 0.5) / scale_factor - 0.5) for the position table.
Variant comparisons run the tiny random model in float64 so the tolerance can be tight.
"""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg_bench.errors import ConfigError
from ovseg_bench.methods.clip_dense import (
    ATTENTION_VARIANTS, attention_matrix, dense_features, embed_tokens, interpolate_pos_embed,
    last_block, project_tokens, run_blocks,
)

ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny_vit.json"
PATCH = 16
TABLE_SIDE = 14  # 224 / 16
SIZES = [(224, 224), (224, 288), (240, 200), (112, 448)]  # last: 7x28 = 196 patches
TIGHT = dict(rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- fixtures
def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial LN affine, biases and sharper attention, so every term is exercised."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
            if name.endswith("in_proj_weight"):
                p.mul_(2.0)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    open_clip.add_model_config(ASSET)
    torch.manual_seed(0)
    m = open_clip.create_model("tiny_vit", pretrained=None)
    _randomise(m.visual)
    return m.eval()


@pytest.fixture(scope="module")
def visual64(model) -> torch.nn.Module:
    return copy.deepcopy(model.visual).double().eval()


def _images(h: int, w: int, dtype=torch.float64, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(h * 1000 + w)
    return torch.randn(batch, 3, h, w, generator=gen).to(dtype)


# ----------------------------------------------------------------------------- references
def ref_layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_softmax(z):
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


@functools.lru_cache(maxsize=None)
def ref_omega(h: int, w: int, sigma: float) -> torch.Tensor:
    n = h * w
    om = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for i in range(n):
        ri, ci = divmod(i, w)
        for j in range(n):
            rj, cj = divmod(j, w)
            om[i + 1, j + 1] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma ** 2))
    return om


def ref_head_weights(qh, kh, variant, grid, sigma):
    s = 1.0 / math.sqrt(qh.shape[-1])
    t = qh.shape[-2]
    if variant == "maskclip":
        return torch.eye(t, dtype=qh.dtype).expand(qh.shape[0], t, t)
    if variant == "vanilla":
        return ref_softmax(s * qh @ kh.transpose(-1, -2))
    if variant == "sclip":
        return ref_softmax(s * qh @ qh.transpose(-1, -2)) + ref_softmax(s * kh @ kh.transpose(-1, -2))
    if variant == "clearclip":
        return ref_softmax(s * qh @ qh.transpose(-1, -2))
    assert variant == "naclip"
    return ref_softmax(s * kh @ kh.transpose(-1, -2) + ref_omega(*grid, sigma).to(qh.dtype))


def ref_attention(block, x, variant, grid, sigma=5.0):
    """(out_proj(A v) [B, T, D], per-head A list)."""
    d_model = x.shape[-1]
    heads = block.attn.num_heads
    d = d_model // heads
    w_in, b_in = block.attn.in_proj_weight, block.attn.in_proj_bias
    y = ref_layer_norm(x, block.ln_1)
    q = y @ w_in[:d_model].T + b_in[:d_model]
    k = y @ w_in[d_model:2 * d_model].T + b_in[d_model:2 * d_model]
    v = y @ w_in[2 * d_model:].T + b_in[2 * d_model:]
    outs, weights = [], []
    for hh in range(heads):
        sl = slice(hh * d, (hh + 1) * d)
        a = ref_head_weights(q[..., sl], k[..., sl], variant, grid, sigma)
        weights.append(a)
        outs.append(a @ v[..., sl])
    o = torch.cat(outs, dim=-1)
    return o @ block.attn.out_proj.weight.T + block.attn.out_proj.bias, weights


def ref_mlp(block, x):
    hidden = x @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU (OpenAI CLIP)
    return hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def ref_block(block, x, variant, grid, sigma=5.0):
    o, _ = ref_attention(block, x, variant, grid, sigma)
    if variant in ("clearclip", "naclip"):
        return o
    z = x + o
    return z + ref_mlp(block, ref_layer_norm(z, block.ln_2))


def ref_bicubic_matrix(n_in: int, n_out: int, scale_factor: float) -> torch.Tensor:
    """[n_out, n_in] 1-D bicubic (A=-0.75, align_corners=False, clamped taps)."""
    a = -0.75

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for dst in range(n_out):
        src = (dst + 0.5) / scale_factor - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[dst, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return m


def ref_pos(pos, h, w):
    n = TABLE_SIDE
    if h * w == n * n:
        return pos
    table = pos[1:].reshape(n, n, -1)
    mh = ref_bicubic_matrix(n, h, (h + 0.1) / n).to(pos.dtype)
    mw = ref_bicubic_matrix(n, w, (w + 0.1) / n).to(pos.dtype)
    out = torch.einsum("ai,bj,ijd->abd", mh, mw, table).reshape(h * w, -1)
    return torch.cat([pos[:1], out], dim=0)


def ref_dense(visual, images, variant, sigma=5.0):
    b, _, height, width = images.shape
    h, w = height // PATCH, width // PATCH
    patches = images[:, :, :h * PATCH, :w * PATCH].reshape(b, 3, h, PATCH, w, PATCH)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, 3 * PATCH * PATCH)
    d_model = visual.conv1.weight.shape[0]
    x = patches @ visual.conv1.weight.reshape(d_model, -1).T
    x = torch.cat([visual.class_embedding.expand(b, 1, d_model), x], dim=1)
    x = ref_layer_norm(x + ref_pos(visual.positional_embedding, h, w), visual.ln_pre)
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:-1]:
        x = ref_block(blk, x, "vanilla", (h, w))
    x = ref_block(blocks[-1], x, variant, (h, w), sigma)
    x = ref_layer_norm(x, visual.ln_post) @ visual.proj
    return x[:, 1:].reshape(b, h, w, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- tests
def test_tiny_config_is_openai_style_vit(model):
    v = model.visual
    assert type(v).__name__ == "VisionTransformer"
    assert tuple(v.positional_embedding.shape) == (TABLE_SIDE * TABLE_SIDE + 1, 64)
    assert tuple(v.proj.shape) == (64, 32) and v.attn_pool is None
    assert not v.final_ln_after_pool and v.pool_type == "tok"
    assert isinstance(v.ln_pre, torch.nn.LayerNorm) and len(v.transformer.resblocks) == 3
    block = v.transformer.resblocks[0]
    assert type(block).__name__ == "ResidualAttentionBlock" and block.attn.num_heads == 4
    assert type(block.mlp.gelu).__name__ == "QuickGELU"
    assert isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)
    tokens = open_clip.get_tokenizer("tiny_vit")(["a photo of a cat."])
    assert tuple(tokens.shape) == (1, 77)
    with torch.no_grad():
        assert tuple(model.encode_text(tokens).shape) == (1, 32)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_dense_features_match_reference(visual64, variant, size):
    images = _images(*size)
    with torch.no_grad():
        got = dense_features(visual64, images, variant)
        want = ref_dense(visual64, images, variant)
    assert got.shape == (2, 32, size[0] // PATCH, size[1] // PATCH)
    torch.testing.assert_close(got, want, **TIGHT)


def test_naclip_sigma_is_used(visual64):
    images = _images(240, 200)
    with torch.no_grad():
        got = dense_features(visual64, images, "naclip", naclip_sigma=2.0)
        want = ref_dense(visual64, images, "naclip", sigma=2.0)
        default = dense_features(visual64, images, "naclip")
    torch.testing.assert_close(got, want, **TIGHT)
    assert (got - default).abs().max() > 1e-3


def test_float32_close_to_float64_reference(model, visual64):
    images = _images(240, 200)
    for variant in ATTENTION_VARIANTS:
        with torch.no_grad():
            got = dense_features(model.visual, images.float(), variant)
            want = ref_dense(visual64, images, variant)
        assert got.dtype == torch.float32
        # the randomised residual stream reaches ~40, so float32 rounding is ~1e-4 here
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


def _last_block_input(visual, size):
    x, grid = embed_tokens(visual, _images(*size))
    return run_blocks(visual, x, len(visual.transformer.resblocks) - 1), grid


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_attention_matrix_matches_reference(visual64, variant):
    block = visual64.transformer.resblocks[-1]
    with torch.no_grad():
        x, grid = _last_block_input(visual64, (240, 200))
        got = attention_matrix(block, x, variant, grid)
        _, ref = ref_attention(block, x, variant, grid)
    torch.testing.assert_close(got, torch.stack(ref, dim=1), **TIGHT)
    row_sum = 2.0 if variant == "sclip" else 1.0  # SCLIP: no renormalisation
    torch.testing.assert_close(got.sum(-1), torch.full_like(got.sum(-1), row_sum), **TIGHT)
    if variant != "maskclip":
        assert got.min() > 0  # a real softmax, not the MaskCLIP identity


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_ffn_dependence(model, variant):
    visual = model.visual
    perturbed = copy.deepcopy(visual)
    with torch.no_grad():
        for p in perturbed.transformer.resblocks[-1].mlp.parameters():
            p.add_(0.5 * torch.randn_like(p))
        images = _images(224, 288, dtype=torch.float32)
        before = dense_features(visual, images, variant)
        after = dense_features(perturbed, images, variant)
    if variant in ("clearclip", "naclip"):  # ClearCLIP/NACLIP: FFN dropped
        assert torch.equal(before, after)
    else:  # vanilla/MaskCLIP/SCLIP: residual and FFN kept
        assert (before - after).abs().max() > 1e-3


def test_vanilla_equals_open_clip(model):
    visual = model.visual
    images = _images(224, 224, dtype=torch.float32)
    depth = len(visual.transformer.resblocks)
    with torch.no_grad():
        x, grid = embed_tokens(visual, images)
        tokens = project_tokens(visual, run_blocks(visual, x, depth))
        # Not bit-equal: [B, T, D] @ proj takes another BLAS path than open_clip's [B, D] @ proj.
        torch.testing.assert_close(tokens[:, 0], model.encode_image(images), rtol=1e-6, atol=1e-6)
        last = last_block(visual.transformer.resblocks[-1],
                          run_blocks(visual, x, depth - 1), "vanilla", grid)
        assert torch.equal(project_tokens(visual, last), tokens)
        inter = visual.forward_intermediates(images, indices=[depth - 1],
                                             normalize_intermediates=True)
        want = torch.einsum("bdhw,de->behw", inter["image_intermediates"][0], visual.proj)
        torch.testing.assert_close(dense_features(visual, images, "vanilla"), want,
                                   rtol=1e-5, atol=1e-6)


def test_run_blocks_layouts(model):
    """run_blocks is open_clip's Transformer, also for a sequence-first (LND) layout."""
    visual = model.visual
    lnd = copy.deepcopy(visual)
    lnd.transformer.batch_first = False
    for block in lnd.transformer.resblocks:
        block.attn.batch_first = False
    with torch.no_grad():
        x, grid = embed_tokens(visual, _images(240, 200, dtype=torch.float32))
        assert torch.equal(run_blocks(visual, x, 0), x)
        full = run_blocks(visual, x, 3)
        assert torch.equal(full, visual.transformer(x))
        assert torch.equal(run_blocks(lnd, x, 3), lnd.transformer(x))
        # LND and NLD attention kernels differ at float level (~1e-5 of a stream of ~40).
        torch.testing.assert_close(run_blocks(lnd, x, 3), full, rtol=1e-4, atol=1e-3)
        lnd_last, nld_last = lnd.transformer.resblocks[-1], visual.transformer.resblocks[-1]
        want = lnd_last(x.transpose(0, 1)).transpose(0, 1)
        assert torch.equal(last_block(lnd_last, x, "vanilla", grid), want)
        assert torch.equal(last_block(nld_last, x, "vanilla", grid), nld_last(x))
        for variant in ("maskclip", "sclip", "clearclip", "naclip"):
            assert torch.equal(last_block(lnd_last, x, variant, grid),
                               last_block(nld_last, x, variant, grid))


@pytest.mark.parametrize("grid", [(15, 12), (14, 18), (20, 20), (7, 7), (1, 30)])
def test_pos_embed_matches_independent_bicubic(visual64, grid):
    pos = visual64.positional_embedding.detach()
    got = interpolate_pos_embed(pos, grid)
    assert got.shape == (1 + grid[0] * grid[1], pos.shape[1])
    assert torch.equal(got[0], pos[0])  # CLS row kept
    torch.testing.assert_close(got, ref_pos(pos, *grid), rtol=1e-9, atol=1e-9)


def test_pos_embed_scale_factor_not_size(visual64):
    """SCLIP-family rule: resizing with size=(h, w) samples other source positions than the factor does."""
    pos = visual64.positional_embedding.detach()
    h, w = 15, 12
    table = pos[1:].reshape(1, TABLE_SIDE, TABLE_SIDE, -1).permute(0, 3, 1, 2)
    by_size = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
    by_size = by_size.permute(0, 2, 3, 1).reshape(h * w, -1)
    got = interpolate_pos_embed(pos, (h, w))[1:]
    assert (got - by_size).abs().max() > 1e-3


@pytest.mark.parametrize("grid", [(14, 14), (7, 28), (28, 7), (196, 1)])
def test_pos_embed_unchanged_when_token_count_equal(visual64, grid):
    pos = visual64.positional_embedding.detach()
    assert interpolate_pos_embed(pos, grid) is pos


def test_pos_embed_output_size_exact(model):
    pos = model.visual.positional_embedding.detach()
    for h in range(1, 49):
        for w in (1, 13, 15, 47):
            assert interpolate_pos_embed(pos, (h, w)).shape[0] == 1 + h * w


def test_patch_grid_drops_remainder(model):
    images = _images(230, 250, dtype=torch.float32)
    with torch.no_grad():
        x, grid = embed_tokens(model.visual, images)
        full = dense_features(model.visual, images, "clearclip")
        cropped = dense_features(model.visual, images[:, :, :224, :240], "clearclip")
    assert grid == (14, 15) and x.shape[1] == 1 + 14 * 15
    assert full.shape == (2, 32, 14, 15)
    assert torch.equal(full, cropped)


def test_bad_inputs_raise(model):
    visual = model.visual
    images = _images(224, 224, dtype=torch.float32)
    with pytest.raises(ConfigError, match="unknown attention variant"):
        dense_features(visual, images, "csa")
    x, _ = embed_tokens(visual, images)
    with pytest.raises(ValueError, match="does not match"):
        last_block(visual.transformer.resblocks[-1], x, "naclip", (14, 15))
    with pytest.raises(ValueError, match="outside"):
        run_blocks(visual, x, 4)


def test_run_blocks_under_autocast_matches_open_clip_blocks_per_window():
    """Mixed precision takes clip_dense's own block (no MHA slow path); per window it equals open_clip's."""
    import open_clip

    open_clip.add_model_config(str(Path(__file__).parents[1] / "assets" / "tiny_vit.json"))
    torch.manual_seed(0)
    visual = open_clip.create_model("tiny_vit", pretrained=None).visual.eval()
    images = torch.randn(3, 3, 64, 80)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        x, _ = embed_tokens(visual, images)
        ours = run_blocks(visual, x, len(visual.transformer.resblocks))
        reference = torch.cat([visual.transformer(x[i:i + 1]) for i in range(3)])
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("grid", [(15, 12), (7, 28), (3, 5), (20, 20)])
def test_pos_embed_tcl_rule_resizes_to_size(visual64, grid):
    """TCL's rule: every grid but the square one is resized, to size=(h, w) (scale = out / in)."""
    pos = visual64.positional_embedding.detach()
    h, w = grid
    table = pos[1:].reshape(TABLE_SIDE, TABLE_SIDE, -1)
    mh = ref_bicubic_matrix(TABLE_SIDE, h, h / TABLE_SIDE)
    mw = ref_bicubic_matrix(TABLE_SIDE, w, w / TABLE_SIDE)
    want = torch.cat([pos[:1], torch.einsum("ai,bj,ijd->abd", mh, mw, table).reshape(h * w, -1)])
    torch.testing.assert_close(interpolate_pos_embed(pos, grid, rule="tcl"), want, rtol=1e-9, atol=1e-9)


def test_pos_embed_tcl_rule_keeps_only_the_square_table(visual64):
    pos = visual64.positional_embedding.detach()
    assert interpolate_pos_embed(pos, (TABLE_SIDE, TABLE_SIDE), rule="tcl") is pos
    assert interpolate_pos_embed(pos, (7, 28)) is pos  # the default (SCLIP) rule is unchanged
    assert interpolate_pos_embed(pos, (7, 28), rule="tcl") is not pos
    with pytest.raises(ConfigError, match="position-resize rule"):
        interpolate_pos_embed(pos, (7, 28), rule="dino")
