"""`maskclip` computes what MaskCLIP's own code computes (chongzhou96/MaskCLIP@245d31f): mmseg's
ViT on CLIP's weights, checked against an independent float64 step-by-step computation written
from the state dict alone; `maskclip_clipblock` keeps CLIP's blocks; MaskCLIP's native protocol."""
from __future__ import annotations

import copy

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ovseg_bench.errors import ConfigError
from ovseg_bench.methods.base import DatasetInfo, WeightsOptions
from ovseg_bench.registry import get_method
from tests.conftest import TINY_MODEL, call_cli, result_jsons, run_argv

ADE = DatasetInfo("ade20k", ("wall", "floor", "sky"), False)


def build(name: str):
    method = get_method(name)(WeightsOptions(model=TINY_MODEL, pretrained="none"), torch.device("cpu"))
    # The family's methods share one loaded model (clip_family.family_clip): convert a copy of our own.
    method.model = copy.deepcopy(method.model).double()
    method.text.model = method.model
    return method


def ln(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu(x, quick: bool):
    return x * torch.sigmoid(1.702 * x) if quick else 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference_features(sd: dict, images: torch.Tensor, *, eps: float = 1e-6, quick: bool = False) -> torch.Tensor:
    """MaskCLIP's backbone and head, step by step from the state dict (float64)."""
    p = "visual."
    pad_h, pad_w = (-images.shape[-2]) % 16, (-images.shape[-1]) % 16
    x = F.pad(images, (0, pad_w, 0, pad_h))  # bottom/right, zeros
    x = F.conv2d(x, sd[p + "conv1.weight"], stride=16)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "class_embedding"].expand(x.shape[0], 1, -1), x], 1)
    pos = sd[p + "positional_embedding"]
    n = int(math.isqrt(pos.shape[0] - 1))
    if h * w != n * n:  # resized only when the token count differs, to size=(h, w)
        table = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], table.permute(0, 2, 3, 1).reshape(h * w, -1)])
    x = ln(x + pos, sd[p + "ln_pre.weight"], sd[p + "ln_pre.bias"], eps)
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(p + "transformer.resblocks.")})
    for i in layers:
        b = f"{p}transformer.resblocks.{i}."
        y = ln(x, sd[b + "ln_1.weight"], sd[b + "ln_1.bias"], eps)
        q, k, v = (y @ sd[b + "attn.in_proj_weight"].T + sd[b + "attn.in_proj_bias"]).chunk(3, -1)
        if i == layers[-1]:  # the value path: out_proj(v) + x, then the FFN with its residual
            z = x + v @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        else:
            heads = q.shape[-1] // 16
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
            a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(16), -1) @ split(v)
            a = a.transpose(1, 2).reshape(x.shape)
            z = x + a @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        f = gelu(ln(z, sd[b + "ln_2.weight"], sd[b + "ln_2.bias"], eps) @ sd[b + "mlp.c_fc.weight"].T
                 + sd[b + "mlp.c_fc.bias"], quick)
        x = z + f @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
    v = ln(x, sd[p + "ln_post.weight"], sd[p + "ln_post.bias"], eps) @ sd[p + "proj"]
    feats = v[:, 1:].transpose(1, 2).reshape(v.shape[0], -1, h, w)
    return feats / feats.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def methods():
    return {name: build(name) for name in ("maskclip", "maskclip_clipblock")}


def windows(h: int = 40, w: int = 56) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_features_equal_the_step_by_step_mmseg_vit(methods):
    method = methods["maskclip"]
    sd = {k: v.double() for k, v in method.model.state_dict().items()}
    with torch.inference_mode():
        got = method.embed_windows(windows()).maps
    want = reference_features(sd, windows())
    assert got.shape == want.shape == (2, 32, 3, 4)  # padded 48 x 64 -> a 3 x 4 grid
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("change", [{"eps": 1e-5}, {"quick": True}])
def test_each_difference_from_clips_block_matters(methods, change):
    """CLIP's eps or QuickGELU would give other features: the test above pins both."""
    sd = {k: v.double() for k, v in methods["maskclip"].model.state_dict().items()}
    mine, theirs = reference_features(sd, windows()), reference_features(sd, windows(), **change)
    assert (mine - theirs).abs().max() > 1e-6


def test_the_clip_block_variant_keeps_clips_arithmetic(methods):
    with torch.inference_mode():
        a = methods["maskclip"].embed_windows(windows(48, 64)).maps
        b = methods["maskclip_clipblock"].embed_windows(windows(48, 64)).maps
    assert a.shape == b.shape and (a - b).abs().max() > 1e-6


def test_padded_logits_are_resized_to_the_window_not_cut(methods):
    method = methods["maskclip"]
    sd = {k: v.double() for k, v in method.model.state_dict().items()}
    vocab = method.encode_classes([["wall"], ["floor"], ["sky"]], ADE)
    vocab = dataclasses.replace(vocab, embeddings=vocab.embeddings.double())
    with torch.inference_mode():
        got = method.forward_windows(windows(), vocab)
    cosine = torch.einsum("bchw,qc->bqhw", reference_features(sd, windows()), vocab.embeddings)
    want = F.interpolate(cosine, size=(40, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_duplicate_class_names_are_refused(methods):
    with pytest.raises(ConfigError, match="more than once"):
        methods["maskclip"].encode_classes([["wall"], ["floor"], ["wall"]], ADE)
    methods["maskclip_clipblock"].encode_classes([["wall"], ["floor"], ["wall"]], ADE)  # unchanged there


def test_native_is_maskclips_whole_image_protocol(synthetic_tree, tmp_path):
    root, ids = synthetic_tree
    code, _, stderr = call_cli(run_argv("maskclip", "voc", tmp_path, "--protocol", "native", data_root=root))
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path)
    import json

    result = json.loads(path.read_text())
    protocol = result["protocol"]
    assert protocol["requested"] == "native" and protocol["preset"] == "maskclip"
    assert protocol["settings"]["mode"] == "whole" and protocol["settings"]["short_side"] == 512
    assert result["images"]["windows"] == len(ids["voc"])  # one whole-image window per image
    from ovseg_bench.engine.protocol import load_protocol

    context = load_protocol("maskclip").settings_for("context")
    assert (context.short_side, context.long_side) == (520, 520)
