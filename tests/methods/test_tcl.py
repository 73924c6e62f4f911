"""TCL (kakaobrain/tcl@bc2b551): checkpoint layout, per-window masks against an independent
computation, the background plane, the variants, and ``ovseg-bench run --method tcl`` end to end.

The checkpoint is written here in the published key layout (TCL's module names, spelled out below, not
taken from the adapter) with random values for the tiny test backbone (width 64, embedding 32,
3 blocks, so the grounder block is ``resblocks.2``). The reference masks are computed step by
step from the formulas of TCL's ``generate_masks`` in float64: explicit LayerNorm, per-head loops with the identity
attention, a hand-built bicubic matrix for the position table (``size=(h, w)``), explicit
decoder steps with F.conv2d, the KP branch; PAMR is called directly (it has its own parity test).
"""
from __future__ import annotations

import dataclasses
import json
import math
import urllib.error
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg_bench.errors import WeightsError
from ovseg_bench.methods import checkpoints, tcl
from ovseg_bench.methods.base import DatasetInfo, WeightsOptions
from ovseg_bench.methods.pamr import PAMR
from ovseg_bench.methods.prompts import load_templates
from ovseg_bench.registry import get_method
from tests.conftest import TINY_MODEL, call_cli, result_jsons, run_argv
from tests.methods.test_clip_dense import ref_bicubic_matrix, ref_block, ref_layer_norm

PATCH, TABLE_SIDE, WIDTH, EMBED, HEADS, BLOCK = 16, 14, 64, 32, 4, 2
VOC = DatasetInfo("voc", ("background", "cat", "dog"), True)
VOC20 = DatasetInfo("voc20", ("cat", "dog", "bird"), False)
ONE_LINE_ERROR = 2


# ----------------------------------------------------------------------------- the published layout
def published_shapes(width: int, embed: int, block: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released minimal checkpoint, for any backbone size."""
    grounder = f"masker.image_encoder.backbone.transformer.resblocks.{block}."
    shapes = {grounder + "attn.in_proj_weight": (3 * width, width), grounder + "attn.in_proj_bias": (3 * width,),
              grounder + "attn.out_proj.weight": (width, width), grounder + "attn.out_proj.bias": (width,),
              grounder + "mlp.c_fc.weight": (4 * width, width), grounder + "mlp.c_fc.bias": (4 * width,),
              grounder + "mlp.c_proj.weight": (width, 4 * width), grounder + "mlp.c_proj.bias": (width,)}
    for ln in ("ln_1", "ln_2"):
        shapes.update({f"{grounder}{ln}.weight": (width,), f"{grounder}{ln}.bias": (width,)})
    for layer in (0, 1):
        for conv in ("conv", "conv2"):
            key = f"masker.image_encoder.decoder.decoder.net.{layer}.{conv}."
            shapes.update({key + "norm.weight": (width,), key + "norm.bias": (width,),
                           key + "conv.weight": (width, width, 3, 3), key + "conv.bias": (width,),
                           key + "gate.gate": ()})
    shapes.update({"masker.image_encoder.decoder.image_proj.ln.weight": (width,),
                   "masker.image_encoder.decoder.image_proj.ln.bias": (width,),
                   "masker.image_encoder.decoder.image_proj.proj": (width, embed),
                   "masker.sim2mask.w": (), "masker.sim2mask.b": ()})
    return shapes


def random_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """Random float32 values in the published layout for the tiny backbone, loss scales included."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_shapes(WIDTH, EMBED, BLOCK).items():
        value = torch.randn(shape, generator=gen)
        if key.endswith(("norm.weight", "ln.weight", "ln_1.weight", "ln_2.weight")):
            value = 1.0 + 0.2 * value
        elif len(shape) >= 2:
            value = value / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.2 * value
        state[key] = value
    gates = torch.tensor([0.7, -0.5, 0.9, 0.4])  # non-zero: the decoder is not the identity
    for i, (layer, conv) in enumerate((l, c) for l in (0, 1) for c in ("conv", "conv2")):
        state[f"masker.image_encoder.decoder.decoder.net.{layer}.{conv}.gate.gate"] = gates[i].clone()
    state["masker.sim2mask.w"], state["masker.sim2mask.b"] = torch.tensor(6.0), torch.tensor(-0.5)
    state["tcli_loss.logit_scale"] = torch.tensor(4.6)
    state["tclf_loss.logit_scale"] = torch.tensor(4.6)
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tcl") / "tcl_tiny.pth"
    torch.save({"model": random_state()}, path)
    return path


def _method(name: str, checkpoint: Path):
    return get_method(name)(WeightsOptions(model=TINY_MODEL, pretrained="none", checkpoint=checkpoint),
                            torch.device("cpu"))


@pytest.fixture(scope="module")
def methods(checkpoint):
    return {name: _method(name, checkpoint) for name in ("tcl", "tcl_nopamr")}


# ----------------------------------------------------------------------------- reference (float64)
def ref_pos(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """TCL's rule: resize unless the grid is the square one, to size=(h, w) (scale = out / in)."""
    if (h, w) == (TABLE_SIDE, TABLE_SIDE):
        return pos
    table = pos[1:].reshape(TABLE_SIDE, TABLE_SIDE, -1)
    mh = ref_bicubic_matrix(TABLE_SIDE, h, h / TABLE_SIDE).to(pos.dtype)
    mw = ref_bicubic_matrix(TABLE_SIDE, w, w / TABLE_SIDE).to(pos.dtype)
    return torch.cat([pos[:1], torch.einsum("ai,bj,ijd->abd", mh, mw, table).reshape(h * w, -1)])


def ref_tower(visual, images: torch.Tensor):
    """(input of the last block, frozen last block with identity attention), [B, 1+hw, D] each."""
    b, _, height, width = images.shape
    h, w = height // PATCH, width // PATCH
    patches = images.reshape(b, 3, h, PATCH, w, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
    x = patches @ visual.conv1.weight.reshape(WIDTH, -1).T
    x = torch.cat([visual.class_embedding.expand(b, 1, WIDTH), x], dim=1)
    x = ref_layer_norm(x + ref_pos(visual.positional_embedding, h, w), visual.ln_pre)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:-1]:
        x = ref_block(block, x, "vanilla", (h, w))
    return x, ref_block(blocks[-1], x, "maskclip", (h, w))


def ref_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def ref_grounder(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The checkpoint's block with identity attention: z = x + out_proj(v); z += MLP(LN2(z))."""
    p = f"masker.image_encoder.backbone.transformer.resblocks.{BLOCK}."
    y = ref_ln(x, s[p + "ln_1.weight"], s[p + "ln_1.bias"])
    v = y @ s[p + "attn.in_proj_weight"][2 * WIDTH:].T + s[p + "attn.in_proj_bias"][2 * WIDTH:]
    d = WIDTH // HEADS
    heads = []
    for head in range(HEADS):
        attention = torch.eye(x.shape[1], dtype=x.dtype)  # each token attends only to itself
        heads.append(attention @ v[..., head * d:(head + 1) * d])
    z = x + torch.cat(heads, -1) @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
    hidden = ref_ln(z, s[p + "ln_2.weight"], s[p + "ln_2.bias"]) @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"]
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU, as the CLIP block it copies
    return z + hidden @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]


def ref_decoder(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for layer in (0, 1):
        x = x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # nearest x2
        for conv in ("conv", "conv2"):
            k = f"masker.image_encoder.decoder.decoder.net.{layer}.{conv}."
            y = ref_ln(x.permute(0, 2, 3, 1), s[k + "norm.weight"], s[k + "norm.bias"]).permute(0, 3, 1, 2)
            y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))  # exact GELU
            y = F.conv2d(y, s[k + "conv.weight"], s[k + "conv.bias"], padding=1)
            x = x + torch.tanh(s[k + "gate.gate"]) * y
    return x


def to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens[:, 1:].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


def unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True)


def reference_masks(method, s: dict[str, torch.Tensor], windows: torch.Tensor, text: torch.Tensor, *,
                    pamr: bool, bg: float | None) -> torch.Tensor:
    """TCL's per-window masks for float64 ``windows`` [B,3,h,w] and raw class embeddings ``text`` [N,E]."""
    b, _, height, width = windows.shape
    pad_h, pad_w = -height % PATCH, -width % PATCH
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(windows, (left, pad_w - left, top, pad_h - top))
    h, w = padded.shape[-2] // PATCH, padded.shape[-1] // PATCH
    visual = method.model.visual
    feats, clip_tokens = ref_tower(visual, padded)
    emb = ref_decoder(s, to_map(ref_grounder(s, feats), h, w)).permute(0, 2, 3, 1)
    proj = "masker.image_encoder.decoder.image_proj."
    emb = ref_ln(emb, s[proj + "ln.weight"], s[proj + "ln.bias"]) @ s[proj + "proj"]
    text = unit(text, -1)
    cos = torch.einsum("bhwc,nc->bnhw", unit(emb, -1), text)
    masks = torch.sigmoid(s["masker.sim2mask.w"] * cos + s["masker.sim2mask.b"])
    if pamr:
        guide = F.interpolate(padded, size=masks.shape[-2:], mode="bilinear", align_corners=True)
        masks = PAMR(10, (1, 2, 4, 8, 12, 24))(guide.float(), masks.float()).double()
    clip_map = ref_layer_norm(to_map(clip_tokens, h, w).permute(0, 2, 3, 1), visual.ln_post) @ visual.proj
    keep = torch.sigmoid(10.0 * (torch.einsum("bhwc,nc->bnhw", unit(clip_map, -1), text) - 0.25))
    keep = F.interpolate(keep, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    masks = 0.3 * keep + 0.7 * masks
    masks = F.interpolate(masks, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    masks = masks[:, :, top:top + height, left:left + width]
    if bg is None:
        return masks
    return torch.cat([torch.full((b, 1, height, width), bg, dtype=masks.dtype), masks], dim=1)


def _double(method):
    method.model.double()
    method.masker.double()
    return method


# ----------------------------------------------------------------------------- tests
def test_masker_of_vit_b16_has_the_published_key_table():
    """The adapter's expected keys for ViT-B/16 (built on the meta device) are the published key table."""
    with torch.device("meta"):
        visual = open_clip.create_model("ViT-B-16", pretrained=None, device="meta").visual
        masker = tcl.TclMasker(visual)
    expected = {name: tuple(v.shape) for name, v in masker.state_dict().items()}
    published = {tcl.published_key(name, 11): shape for name, shape in expected.items()}
    assert published == published_shapes(768, 512, 11)
    assert sum(math.prod(shape) for shape in published.values()) == 28_725_510  # TCL's learned parameters


@pytest.mark.parametrize("name", ["tcl", "tcl_nopamr"])
def test_window_masks_equal_the_step_by_step_reference(methods, checkpoint, name):
    method = _double(_method(name, checkpoint))
    state = {k: v.double() for k, v in torch.load(checkpoint, weights_only=True)["model"].items()}
    vocab = method.encode_classes([["background"], ["cat"], ["dog"]], VOC)
    vocab = dataclasses.replace(vocab, embeddings=vocab.embeddings.double())
    windows = torch.randn(2, 3, 40, 70, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.inference_mode():
        got = method.forward_windows(windows, vocab)
    want = reference_masks(method, state, windows, vocab.embeddings[1:], pamr=name == "tcl",
                           bg=0.4 if name == "tcl" else 0.5)
    assert got.shape == (2, 3, 40, 70)
    # float64 throughout except PAMR, which computes in float32 (~1e-8 here)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if name == "tcl" else 1e-12)
    assert 0.05 < float(got[:, 1:].std())  # masks are not saturated: the comparison means something


def test_float32_windows_are_close_to_the_reference(methods, checkpoint):
    method = methods["tcl"]
    state = {k: v.double() for k, v in torch.load(checkpoint, weights_only=True)["model"].items()}
    vocab = method.encode_classes([["cat"], ["dog"], ["bird"]], VOC20)
    windows = torch.randn(3, 3, 37, 50, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        got = method.forward_windows(windows, vocab)
    reference_model = _double(_method("tcl", checkpoint))
    want = reference_masks(reference_model, state, windows.double(), vocab.embeddings.double(), pamr=True, bg=None)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-5)  # float32 rounding, ~6e-6 here


def test_text_queries_are_raw_template_means_of_the_nine_templates(methods):
    method = methods["tcl"]
    vocab = method.encode_classes([["background", "sky"], ["cat", "kitten"], ["dog"]], VOC)
    templates = load_templates("tcl9")
    assert len(templates) == 9 and templates[-1] == "a photo of {}s."
    with torch.no_grad():
        raw = method.model.encode_text(method.tokenizer([t.format("kitten") for t in templates]))
    torch.testing.assert_close(vocab.embeddings[2], unit(raw.mean(0), -1), rtol=0, atol=1e-6)
    # background (and its synonyms) is never text-encoded: query 0 is the plane, its row unused
    assert vocab.query_class.tolist() == [0, 1, 1, 2] and vocab.bg_plane == 0.4
    assert not vocab.embeddings[0].any()


def test_background_plane_is_channel_zero_only_for_background_datasets(methods):
    method = methods["tcl"]
    windows = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(7))
    voc = method.encode_classes([["background"], ["cat"], ["dog"]], VOC)
    voc20 = method.encode_classes([["cat"], ["dog"], ["bird"]], VOC20)
    with torch.inference_mode():
        with_bg, no_bg = method.forward_windows(windows, voc), method.forward_windows(windows, voc20)
    assert with_bg.shape[1] == 3 and torch.all(with_bg[:, 0] == 0.4)
    assert no_bg.shape[1] == 3 and no_bg[:, 0].std() > 0
    torch.testing.assert_close(with_bg[:, 1:], no_bg[:, :2])  # the same cat/dog masks


def test_postprocess_takes_synonym_maxima_then_the_softmax_argmax(methods):
    method = methods["tcl"]
    vocab = method.encode_classes([["background"], ["cat", "kitten"], ["dog"]], VOC)
    scores = torch.tensor([[0.4, 0.4, 0.4], [0.3, 0.5, 0.1], [0.45, 0.2, 0.1], [0.2, 0.45, 0.4]]).view(4, 1, 3)
    labels = method.postprocess(scores, torch.zeros(3, 1, 3), vocab, VOC)
    assert labels.flatten().tolist() == [1, 1, 0]  # 0.45 kitten; 0.5 cat; 0.4 dog ties the plane -> 0


def test_nopamr_variant_differs_only_in_pamr_and_background(methods):
    a, b = (dataclasses.asdict(methods[n].config) for n in ("tcl", "tcl_nopamr"))
    assert {k for k in a if a[k] != b[k]} == {"name", "pamr", "bg_thresh"}
    assert (a["pamr"], a["bg_thresh"], b["pamr"], b["bg_thresh"]) == (True, 0.4, False, 0.5)
    assert a["kp_w"] == 0.3 and a["templates"] == "tcl9" and a["template_average"] == "raw"
    assert methods["tcl"].pamr is not None and methods["tcl_nopamr"].pamr is None
    assert methods["tcl"].normalisation.name == "imagenet"


# ----------------------------------------------------------------------------- wrong checkpoints
def test_a_wrong_checkpoint_lists_every_bad_key(tmp_path):
    state = random_state()
    del state["masker.sim2mask.b"]
    state["masker.extra.weight"] = torch.zeros(3)
    state["masker.image_encoder.decoder.decoder.net.1.conv.gate.gate"] = torch.zeros(1)
    state["masker.image_encoder.decoder.decoder.net.0.conv.conv.weight"] = torch.zeros(1).expand(768, 768, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(WeightsError) as err:
        _method("tcl", path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert "missing (1): masker.sim2mask.b" in message
    assert "unexpected (1): masker.extra.weight" in message
    assert "masker.image_encoder.decoder.decoder.net.1.conv.gate.gate (expected [], found [1])" in message
    assert ("masker.image_encoder.decoder.decoder.net.0.conv.conv.weight (expected [64, 64, 3, 3], "
            "found [768, 768, 3, 3])") in message
    assert "tcli_loss" not in message


def test_a_vit_b16_checkpoint_on_the_tiny_backbone_is_refused_through_the_cli(synthetic_tree, tmp_path):
    """The published layout at ViT-B/16 sizes (resblocks.11): every key named, exit 2, no result."""
    state = {k: torch.zeros(1).expand(s) if s else torch.zeros(()) for k, s in published_shapes(768, 512, 11).items()}
    path = tmp_path / "vitb16.pth"
    torch.save({"model": state}, path)
    out = tmp_path / "runs"
    code, _, stderr = call_cli(run_argv("tcl", "voc", out, "--checkpoint", path, data_root=synthetic_tree[0]))
    assert code == ONE_LINE_ERROR and len(stderr.strip().splitlines()) == 1, stderr
    assert str(path) in stderr and "resblocks.2" in stderr
    assert "missing (12): masker.image_encoder.backbone.transformer.resblocks.2.ln_1.weight" in stderr
    assert "unexpected (12): masker.image_encoder.backbone.transformer.resblocks.11." in stderr
    assert "masker.image_encoder.decoder.image_proj.proj (expected [64, 32], found [768, 512])" in stderr
    assert result_jsons(out) == []


@pytest.mark.parametrize("content", [b"not a checkpoint", "state_dict"])
def test_unreadable_or_unwrapped_checkpoints_are_refused(tmp_path, checkpoint, content):
    path = tmp_path / "x.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:  # a bare state dict, without TCL's {"model": ...} wrapper
        torch.save(torch.load(checkpoint, weights_only=True)["model"], path)
    with pytest.raises(WeightsError, match=str(path)):
        _method("tcl", path)


# ----------------------------------------------------------------------------- download and cache
def test_offline_without_checkpoint_says_what_to_download(synthetic_tree, tmp_path, monkeypatch):
    def no_network(url, target):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoints, "_download", no_network)
    out = tmp_path / "runs"
    code, _, stderr = call_cli(run_argv("tcl", "voc", out, data_root=synthetic_tree[0]))
    assert code == ONE_LINE_ERROR and len(stderr.strip().splitlines()) == 1, stderr
    assert tcl.TCL_CHECKPOINT_URL in stderr and "--checkpoint PATH" in stderr and "Traceback" not in stderr
    assert result_jsons(out) == []


def test_first_download_records_the_sha256_and_later_uses_check_it(tmp_path, monkeypatch, checkpoint):
    calls = []

    def fake_download(url, target):
        calls.append(url)
        Path(target).write_bytes(checkpoint.read_bytes())

    monkeypatch.setattr(checkpoints, "_download", fake_download)
    cache = tmp_path / "cache"
    path, digest = tcl.fetch_checkpoint(tcl.TCL_CHECKPOINT_URL, cache)
    assert path == cache / "tcl.pth" and calls == [tcl.TCL_CHECKPOINT_URL]
    record = json.loads((cache / "tcl.pth.sha256.json").read_text())
    assert record["sha256"] == digest and record["url"] == tcl.TCL_CHECKPOINT_URL
    assert tcl.fetch_checkpoint(tcl.TCL_CHECKPOINT_URL, cache) == (path, digest) and len(calls) == 1
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match="differs from"):
        tcl.fetch_checkpoint(tcl.TCL_CHECKPOINT_URL, cache)


# ----------------------------------------------------------------------------- end to end
def test_cli_runs_tcl_with_a_checkpoint_end_to_end(synthetic_tree, tmp_path, checkpoint):
    root, ids = synthetic_tree
    code, stdout, stderr = call_cli(run_argv("tcl", "voc,voc20", tmp_path, "--checkpoint", checkpoint,
                                             data_root=root))
    assert code == 0, stderr
    results = {json.loads(p.read_text())["dataset"]["name"]: json.loads(p.read_text()) for p in result_jsons(tmp_path)}
    assert sorted(results) == ["voc", "voc20"]
    for dataset, result in results.items():
        method = result["method"]
        assert method["name"] == "tcl" and method["weights"]["random"] is True
        assert method["weights"]["checkpoint"] == str(checkpoint.resolve())
        assert len(method["weights"]["checkpoint_sha256"]) == 64
        assert method["config"]["pamr"] is True and method["config"]["bg_thresh"] == 0.4
        assert method["config"]["pamr_settings"] == {"num_iter": 10, "dilations": [1, 2, 4, 8, 12, 24]}
        assert result["images"]["seen"] == len(ids[dataset]) and result["images"]["windows"] == 6
        assert sum(result["counts"]["pred"]) == sum(result["counts"]["label"])
    assert "RANDOM WEIGHTS" in stdout
