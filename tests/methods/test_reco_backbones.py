"""ReCo's image networks (NoelShin/reco@5c5e1bc): DeiT-S/16-SIN dense features and DenseCLIP.

DeiT: a tiny distilled ViT (timm's class, 32-d, 2 blocks, native grid 4x4) is saved with random
values in the published layout (``{"model": state}``); the dense features are checked against a
float64 computation from the state dict alone: patch embedding by unfold and einsum, CLS and
distillation tokens, the position table resized with F.interpolate (bicubic, align_corners=False,
no antialias), explicit LayerNorm (eps 1e-6), per-head attention, exact GELU, final norm, tokens
``[:, 2:]``. DenseCLIP: a tiny open_clip ModifiedResNet with random weights and BatchNorm
statistics; the trunk is open_clip's own, the projections are einsums over channels.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from timm.models.deit import VisionTransformerDistilled

from ovseg_bench.errors import WeightsError
from ovseg_bench.methods import reco_backbones as rb

DIM, DEPTH, HEADS, NATIVE = 32, 2, 2, 4  # tiny DeiT: 64 px native input, 4x4 patches of 16
EPS = 1e-6


def tiny_deit() -> VisionTransformerDistilled:
    return VisionTransformerDistilled(img_size=16 * NATIVE, patch_size=16, num_classes=10, embed_dim=DIM,
                                      depth=DEPTH, num_heads=HEADS).eval()


def random_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) * 0.3 for key, value in model.state_dict().items()}


@pytest.fixture
def deit_file(tmp_path):
    path = tmp_path / "deit_s_sin_dist.pth"
    state = random_state(tiny_deit())
    torch.save({"model": state, "epoch": torch.tensor(299)}, path)
    return path, state


# ----------------------------------------------------------------------------- DeiT: loading
def test_published_layout_loads_strictly(deit_file):
    path, state = deit_file
    model = tiny_deit()
    rb.load_deit_checkpoint(model, path)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_real_architecture_is_deit_small_distilled_with_eps_1e6():
    import timm

    model = timm.create_model(rb.DEIT_S_SIN_ARCH, pretrained=False)
    assert model.pos_embed.shape == (1, 2 + 14 * 14, 384) and model.dist_token.shape == (1, 1, 384)
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 6
    assert model.norm.eps == EPS and all(block.norm1.eps == block.norm2.eps == EPS for block in model.blocks)
    assert model.blocks[0].mlp.act.approximate == "none" and model.blocks[0].attn.qkv.bias is not None


@pytest.mark.parametrize("damage", ["missing", "misshaped"])
def test_file_that_does_not_fit_is_refused_listing_keys(tmp_path, deit_file, damage):
    _, state = deit_file
    state = dict(state)
    if damage == "missing":
        del state["blocks.1.mlp.fc2.weight"]
        expected = "missing (1): blocks.1.mlp.fc2.weight"
    else:
        state["dist_token"] = torch.zeros(1, 1, DIM + 1)
        expected = "dist_token (expected [1, 1, 32], found [1, 1, 33])"
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(WeightsError) as err:
        rb.load_deit_checkpoint(tiny_deit(), path)
    assert expected in str(err.value) and str(path) in str(err.value) and rb.DEIT_S_SIN_URL in str(err.value)


def test_checkpoint_without_model_entry_is_refused(tmp_path):
    path = tmp_path / "flat.pth"
    torch.save(tiny_deit().state_dict(), path)
    with pytest.raises(WeightsError, match="under 'model'"):
        rb.load_deit_checkpoint(tiny_deit(), path)


# ----------------------------------------------------------------------------- DeiT: features
def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * weight + bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(x, s, prefix):
    batch, count, dim = x.shape
    qkv = torch.einsum("bnc,oc->bno", x, s[f"{prefix}.qkv.weight"]) + s[f"{prefix}.qkv.bias"]
    q, k, v = qkv.reshape(batch, count, 3, HEADS, dim // HEADS).unbind(2)
    heads = []
    for head in range(HEADS):
        logits = torch.einsum("bnd,bmd->bnm", q[:, :, head], k[:, :, head]) / math.sqrt(dim // HEADS)
        heads.append(torch.einsum("bnm,bmd->bnd", logits.softmax(-1), v[:, :, head]))
    out = torch.cat(heads, dim=-1)
    return torch.einsum("bnc,oc->bno", out, s[f"{prefix}.proj.weight"]) + s[f"{prefix}.proj.bias"]


def reference_deit(state, images):
    """ReCo's DistilledVisionTransformer.forward (networks/vit/distilled_vision_transformer.py:410-440) by hand."""
    s = {key: value.double() for key, value in state.items()}
    images = images.double()
    batch, h, w = images.shape[0], images.shape[2] // 16, images.shape[3] // 16
    crop = images[:, :, :h * 16, :w * 16]  # partial patches dropped
    patches = crop.reshape(batch, 3, h, 16, w, 16).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, 3, 16, 16)
    x = torch.einsum("bncij,ocij->bno", patches, s["patch_embed.proj.weight"]) + s["patch_embed.proj.bias"]
    x = torch.cat((s["cls_token"].expand(batch, -1, -1), s["dist_token"].expand(batch, -1, -1), x), dim=1)
    table = s["pos_embed"][:, 2:].reshape(1, NATIVE, NATIVE, DIM).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    x = x + torch.cat((s["pos_embed"][:, :2], table.permute(0, 2, 3, 1).reshape(1, h * w, DIM)), dim=1)
    for i in range(DEPTH):
        p = f"blocks.{i}"
        x = x + attention(layer_norm(x, s[f"{p}.norm1.weight"], s[f"{p}.norm1.bias"]), s, f"{p}.attn")
        y = layer_norm(x, s[f"{p}.norm2.weight"], s[f"{p}.norm2.bias"])
        y = gelu(torch.einsum("bnc,oc->bno", y, s[f"{p}.mlp.fc1.weight"]) + s[f"{p}.mlp.fc1.bias"])
        x = x + torch.einsum("bnc,oc->bno", y, s[f"{p}.mlp.fc2.weight"]) + s[f"{p}.mlp.fc2.bias"]
    x = layer_norm(x, s["norm.weight"], s["norm.bias"])
    return x[:, 2:].reshape(batch, h, w, DIM).permute(0, 3, 1, 2)


def test_dense_features_match_hand_computation_on_odd_sizes(deit_file):
    path, state = deit_file
    model = tiny_deit()
    rb.load_deit_checkpoint(model, path)
    images = torch.randn(2, 3, 90, 61, generator=torch.Generator().manual_seed(1))  # grid 5x3, partial patches
    expected = reference_deit(state, images)
    with torch.no_grad():
        found64 = rb.deit_dense_features(model.double(), images.double())
        found32 = rb.deit_dense_features(model.float(), images)
    assert found64.shape == (2, DIM, 5, 3) and found32.dtype == torch.float32
    torch.testing.assert_close(found64, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(found32.double(), expected, rtol=1e-4, atol=1e-4)


def test_at_the_native_size_features_are_timms_final_norm_tokens(deit_file):
    path, _ = deit_file
    model = tiny_deit()
    rb.load_deit_checkpoint(model, path)
    images = torch.randn(1, 3, 16 * NATIVE, 16 * NATIVE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = model.forward_features(images)[:, 2:]
        found = rb.deit_dense_features(model, images)
    torch.testing.assert_close(found, tokens.transpose(1, 2).reshape(1, DIM, NATIVE, NATIVE))


def test_position_table_is_not_antialiased_and_kept_at_native_count(deit_file):
    path, _ = deit_file
    model = tiny_deit()
    rb.load_deit_checkpoint(model, path)
    shrunk = rb.deit_position_embedding(model, (2, 3))[:, 2:].reshape(1, 2, 3, DIM).permute(0, 3, 1, 2)
    table = model.pos_embed[:, 2:].reshape(1, NATIVE, NATIVE, DIM).permute(0, 3, 1, 2)
    plain = F.interpolate(table, size=(2, 3), mode="bicubic", align_corners=False)
    smooth = F.interpolate(table, size=(2, 3), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(shrunk, plain) and not torch.allclose(shrunk, smooth)
    # ReCo compares patch counts only (distilled_vision_transformer.py:355-358): 2x8 = 4x4 keeps the table.
    assert rb.deit_position_embedding(model, (2, 8)) is model.pos_embed


# ----------------------------------------------------------------------------- DenseCLIP
def tiny_resnet(seed: int = 0) -> ModifiedResNet:
    visual = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=32, heads=2, image_size=64, width=16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in visual.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise * 0.2)
    return visual


def test_denseclip_matches_projections_as_einsums():
    visual = rb.prepare_denseclip(tiny_resnet().double(), fp16_convs=False)
    images = torch.randn(2, 3, 96, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = visual.stem(images)
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
        pool = visual.attnpool
        v = torch.einsum("oc,bchw->bohw", pool.v_proj.weight, x) + pool.v_proj.bias[:, None, None]
        expected = torch.einsum("oc,bchw->bohw", pool.c_proj.weight, v) + pool.c_proj.bias[:, None, None]
        found = rb.denseclip_features(visual, images)
    assert found.shape == (2, 32, 3, 2) and x.shape[1] == 16 * 32
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-10)


def test_fp16_option_rounds_convs_and_projections_only():
    """As OpenAI's convert_weights (openai/CLIP@d05afc4:clip/model.py:378-382): Conv/Linear weights and biases."""
    before = tiny_resnet().state_dict()
    after = rb.prepare_denseclip(tiny_resnet(), fp16_convs=True).state_dict()
    layers = {name for name, module in tiny_resnet().named_modules()
              if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))}
    rounded = {key for key in before if key.rsplit(".", 1)[0] in layers}
    assert "conv1.weight" in rounded and "attnpool.v_proj.bias" in rounded and "attnpool.c_proj.weight" in rounded
    for key, value in before.items():
        expected = value.half().float() if key in rounded else value
        torch.testing.assert_close(after[key], expected, rtol=0, atol=0)
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])  # the rounding did something
    untouched = rb.prepare_denseclip(tiny_resnet(), fp16_convs=False).state_dict()
    assert all(torch.equal(untouched[key], value) for key, value in before.items())


def test_denseclip_refuses_a_vit_tower():
    with pytest.raises(WeightsError, match="ModifiedResNet"):
        rb.prepare_denseclip(tiny_deit())
