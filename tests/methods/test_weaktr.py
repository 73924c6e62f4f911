"""``weaktr`` / ``semples``: WeakTr's CAM generation (hustvl/WeakTr@3457ad3 models.py, AAF.py,
engine.py ``generate_attention_maps_ms``, datasets.py ``VOC12DatasetMS``) on a tiny random network in
the published key layout, each step against an independent computation written after WeakTr's
own tensor manipulations."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import ovseg_bench.methods.weaktr as weaktr  # registers `weaktr` and `semples`
from ovseg_bench.errors import ConfigError, WeightsError
from ovseg_bench.methods.base import DatasetInfo, WeightsOptions
from ovseg_bench.registry import get_method
from tests.conftest import call_cli, result_jsons

VOC = DatasetInfo("voc_train", ("background",) + tuple(f"c{i}" for i in range(1, 21)), True)
TINY = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, img_size=64, reduction=2.0, feat_reduction=8)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_config(**overrides) -> weaktr.WeakTrConfig:
    return dataclasses.replace(weaktr.load_weaktr_config("weaktr"), **{**TINY, **overrides})


def random_net(config: weaktr.WeakTrConfig, seed: int = 0) -> weaktr.WeakTrNet:
    torch.manual_seed(seed)
    net = weaktr.WeakTrNet(config)
    with torch.no_grad():
        for name, value in net.named_parameters():  # every tensor random, LayerNorms and biases included
            value.copy_(torch.randn_like(value) * (0.3 if "weight" in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return net.eval()


def write_checkpoint(path: Path, config: weaktr.WeakTrConfig, seed: int = 0) -> Path:
    torch.save({"model": random_net(config, seed).state_dict(), "epoch": 7}, path)
    return path


def write_variant(folder: Path, config: weaktr.WeakTrConfig, variant_of: str, name: str | None = None) -> Path:
    """``config`` as a ``--config`` variant of ``variant_of`` (YAML has no tuples: they become lists)."""
    name = name or f"{variant_of}_tiny"
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**fields, "name": name, "variant_of": variant_of}))
    return path


def image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- the oracle
def oracle_tokens(net, x):
    """The blocks' outputs, maps and features as WeakTr's forward_features collects them."""
    c = net.num_classes
    tokens = torch.cat((net.cls_token, net.patch_embed.proj(x).flatten(2).transpose(1, 2)), dim=1)
    tokens = tokens + oracle_pos_embed(net.pos_embed, c, x.shape[2], x.shape[3])
    maps, feats = [], []
    for block in net.blocks:
        tokens, w, o = block(tokens)
        maps.append(w)
        feats.append(o)
    return tokens, maps, feats


def oracle_pos_embed(pos, c, h, w):
    n = pos.shape[1] - c
    if (h // 16) * (w // 16) == n and h == w:
        return pos
    side = math.sqrt(n)
    grid = pos[:, c:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h // 16 + 0.1) / side, (w // 16 + 0.1) / side), mode="bicubic")
    return torch.cat((pos[:, :c], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])), dim=1)


def oracle_aaf(aaf, feats_bhknd):
    """AAF.forward_weight on [b, 72, n, m] features: pooling of the (c*m, n, 1) view, then the FFNs."""
    b, c, n, m = feats_bhknd.shape
    v = feats_bhknd.permute(0, 1, 3, 2).contiguous().view(b, c * m, n, 1)
    pool = torch.nn.AdaptiveMaxPool2d(1) if aaf.pool == "max" else torch.nn.AdaptiveAvgPool2d(1)
    pooled = pool(v).view(b * c, m)
    return aaf.attn_head_ffn(aaf.attn_feat_ffn(pooled).view(b, c)).view(b, c, -1, 1)


def oracle_forward(net, x, interleave=True):
    """models.py WeakTr.forward (return_att, fused) then engine.py's patch-attention refinement."""
    c = net.num_classes
    tokens, maps, feats = oracle_tokens(net, x)
    hf, wf = x.shape[2] // 16, x.shape[3] // 16
    patch = tokens[:, c:].reshape(1, hf, wf, -1).permute(0, 3, 1, 2).contiguous()
    coarse = F.relu(net.head(patch))
    maps, feats = torch.stack(maps), torch.stack(feats)
    k, b, h, n, m = maps.shape
    maps = maps.permute([1, 2, 0, 3, 4]).contiguous().view(b, h * k, n, m)
    if interleave:
        feats = feats.view(k, b, n, -1, h).permute([1, 4, 0, 2, 3]).contiguous().view(b, h * k, n, -1)
    else:  # contiguous split: the wrong reading, to show the test can tell
        feats = feats.view(k, b, n, h, -1).permute([1, 3, 0, 2, 4]).contiguous().view(b, h * k, n, -1)
    fused_maps = (maps * oracle_aaf(net.adaptive_attention_fusion, feats)).mean(1)
    cams = fused_maps[:, :c, c:].reshape(1, c, hf, wf) * coarse
    patch_attn = fused_maps[:, c:, c:].unsqueeze(0).sum(0)
    return torch.matmul(patch_attn.unsqueeze(1), cams.view(1, c, -1, 1)).reshape(1, c, hf, wf)


def oracle_multiscale(net, img, target, scales):
    """generate_attention_maps_ms: [s1, flip(s1), s2, flip(s2), ...], odd entries flipped back."""
    pil = Image.fromarray(img)
    inputs = []
    for s in scales:
        size = (round(pil.size[0] * s), round(pil.size[1] * s))
        scaled = np.asarray(pil.resize(size, resample=Image.Resampling.BICUBIC))
        t = torch.from_numpy(scaled.copy()).permute(2, 0, 1).float().div(255)
        t = (t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        inputs += [t, torch.flip(t, [-1])]
    h0, w0 = inputs[0].shape[1:]
    cams = []
    for s, x in enumerate(inputs):
        cam = F.interpolate(oracle_forward(net, x[None]), size=(h0, w0), mode="bilinear", align_corners=False)[0]
        cam = cam * target.view(-1, 1, 1)
        cams.append(torch.flip(cam, dims=[-1]) if s % 2 == 1 else cam)
    total = torch.sum(torch.stack(cams), dim=0)
    out = {}
    for k in range(total.shape[0]):
        if target[k] > 0:
            cam = total[k]
            out[k] = ((cam - cam.min()) / (cam.max() - cam.min() + 1e-8)).numpy()
    return out


# ----------------------------------------------------------------------------- steps
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_aaf_weights_match_weaktr(pool):
    net = random_net(tiny_config(pool=pool))
    feats = torch.randn(1, 4, 23, 32)
    with torch.no_grad():
        ours = net.adaptive_attention_fusion.weights(feats)
        ref = oracle_aaf(net.adaptive_attention_fusion, feats)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    assert ours.shape == (1, 4, 1, 1) and ((ours > 0) & (ours < 1)).all()


@pytest.mark.parametrize("size", [(64, 64), (64, 72), (80, 53), (50, 96)])
def test_forward_matches_weaktr(size):
    net = random_net(tiny_config())
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = net(x)
        ref = oracle_forward(net, x)
        wrong = oracle_forward(net, x, interleave=False)
    torch.testing.assert_close(out["fine"], ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["fine"], wrong, rtol=1e-5, atol=1e-6)  # the interleaving matters
    n = (size[0] // 16) * (size[1] // 16)
    assert out["cross"].shape == (1, 20, n) and out["patch"].shape == (1, n, n)
    assert (out["coarse"] >= 0).all()
    # The averages are means of AAF-weighted probabilities, not renormalised: rows sum below 1.
    assert (out["patch"].sum(-1) < 1).all()


def test_position_embedding_rule():
    pos = torch.randn(1, 20 + 16, 8)
    assert weaktr.weaktr_position_embedding(pos, 20, (64, 64), 16) is pos           # 16 patches, H == W
    assert weaktr.weaktr_position_embedding(pos, 20, (70, 79), 16) is not pos       # 16 patches, H != W
    same_count = weaktr.weaktr_position_embedding(pos, 20, (64, 79), 16)
    assert same_count.shape == pos.shape and not torch.equal(same_count, pos)  # resampled at scale 4.1/4
    for size in [(96, 80), (33, 130), (64, 79)]:
        torch.testing.assert_close(weaktr.weaktr_position_embedding(pos, 20, size, 16),
                                   oracle_pos_embed(pos, 20, *size), rtol=0, atol=0)
    grid = F.interpolate(pos[:, 20:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(6, 5), mode="bicubic")
    ours = weaktr.weaktr_position_embedding(pos, 20, (96, 80), 16)[:, 20:]
    assert not torch.allclose(ours, grid.permute(0, 2, 3, 1).reshape(1, -1, 8))  # scale_factor, not size=


@pytest.mark.parametrize("size", [(50, 70), (64, 64), (47, 83)])
def test_multiscale_cams_match_weaktr(tmp_path, size):
    config = tiny_config()
    net = random_net(config)
    img = image(np.random.default_rng(sum(size)), *size)
    target = torch.zeros(20)
    target[[0, 4, 14]] = 1
    with torch.no_grad():
        ref = oracle_multiscale(net, img, target, config.scales)
        total = weaktr.multiscale_cams(net, img, target, config, torch.device("cpu"))
        ours = weaktr.min_max(total[[0, 4, 14]], 1e-8).numpy()
    assert ours.shape == (3, *size)
    assert (total[[1, 2, 3]] == 0).all()  # absent classes are multiplied by 0
    for k, cls in enumerate([0, 4, 14]):
        np.testing.assert_allclose(ours[k], ref[cls], rtol=1e-5, atol=1e-6)
        assert ours[k].min() == 0 and 0.999 < ours[k].max() <= 1


def test_min_max_eps():
    cams = torch.tensor([[[0.0, 1e-6], [5e-7, 2e-7]]])
    out = weaktr.min_max(cams, 1e-8)
    torch.testing.assert_close(out, cams / (1e-6 + 1e-8), rtol=0, atol=0)
    assert out.max() < 1  # eps 1e-8 keeps the maximum below 1


def test_flip_before_truncation_and_sum():
    """A width that is no multiple of 16: the flipped pass sees the last columns; the total is the sum."""
    config = tiny_config(scales=(1.0,))
    net = random_net(config)
    img = image(np.random.default_rng(3), 48, 71)
    target = torch.ones(20)
    with torch.no_grad():
        total = weaktr.multiscale_cams(net, img, target, config, torch.device("cpu"))
        x = weaktr.NORMALISATIONS["imagenet_unit"].apply(torch.from_numpy(img).permute(2, 0, 1)[None])
        up = lambda t: F.interpolate(t, size=(48, 71), mode="bilinear", align_corners=False)[0]  # noqa: E731
        plain = up(net(x)["fine"])
        flipped = torch.flip(up(net(torch.flip(x, [-1]))["fine"]), [-1])
        cut_then_flip = torch.flip(up(net(torch.flip(x[..., :64], [-1]))["fine"]), [-1])
    torch.testing.assert_close(total, plain + flipped, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(flipped, cut_then_flip)


def test_scaled_inputs_use_python_round_and_pil_cubic():
    img = image(np.random.default_rng(0), 45, 55)
    out = weaktr.scaled_inputs(img, (1.0, 1.5, 1.2))
    assert np.array_equal(out[0], img)
    assert out[1].shape[:2] == (68, 82)  # round half to even: 67.5 -> 68, 82.5 -> 82
    assert np.array_equal(out[2], np.asarray(Image.fromarray(img).resize((66, 54), Image.Resampling.BICUBIC)))


# ----------------------------------------------------------------------------- the adapter
def tiny_method(tmp_path, name="weaktr", **overrides):
    config = tiny_config(**overrides)
    path = write_checkpoint(tmp_path / "ckpt.pth", config)
    return weaktr.WeakTr(dataclasses.replace(config, name=name), WeightsOptions(checkpoint=path),
                         torch.device("cpu")), config


def test_cams_labels_order_and_determinism(tmp_path):
    method, config = tiny_method(tmp_path)
    img = image(np.random.default_rng(5), 52, 77)
    cams = method.cams(img, (15, 1, 5), VOC, image_id="x")
    again = method.cams(img, (15, 1, 5), VOC, image_id="x")
    assert cams.classes == (1, 5, 15) and cams.maps.dtype == np.float32 and cams.maps.shape == (3, 52, 77)
    assert np.array_equal(cams.maps, again.maps)  # fp32 on the CPU: bit-identical
    target = torch.zeros(20)
    target[[0, 4, 14]] = 1
    with torch.no_grad():
        ref = oracle_multiscale(method.model, img, target, config.scales)
    np.testing.assert_allclose(cams.maps, np.stack([ref[0], ref[4], ref[14]]), rtol=1e-5, atol=1e-6)
    assert method.cams(img, (), VOC, image_id="y").maps.shape == (0, 52, 77)


def test_curve_and_settings(tmp_path):
    method, _ = tiny_method(tmp_path)
    grid, fixed = method.curve("voc_train")
    assert grid == tuple(i / 100 for i in range(40, 60)) and fixed == 0.43 and fixed in grid
    assert method.settings("voc_train")["cam"] == "fine"


def test_strict_loading_lists_keys(tmp_path):
    config = tiny_config()
    state = random_net(config).state_dict()
    state["head.extra"] = torch.zeros(3)
    del state["adaptive_attention_fusion.attn_head_ffn.0.weight"]
    state["cls_token"] = torch.zeros(1, 21, 64)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(WeightsError) as err:
        weaktr.build_weaktr(config, path)
    text = str(err.value)
    assert "head.extra" in text and "adaptive_attention_fusion.attn_head_ffn.0.weight" in text
    assert "cls_token (expected [1, 20, 64], found [1, 21, 64])" in text
    torch.save(state, tmp_path / "flat.pth")
    with pytest.raises(WeightsError, match="under 'model'"):
        weaktr.build_weaktr(config, tmp_path / "flat.pth")


def test_published_layout_keys():
    keys = set(weaktr.WeakTrNet(weaktr.load_weaktr_config("weaktr")).state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight", "head.bias",
            "blocks.11.attn.qkv.bias", "adaptive_attention_fusion.attn_head_ffn.2.weight",
            "adaptive_attention_fusion.attn_feat_ffn.1.bias"} <= keys
    shapes = {k: tuple(v.shape) for k, v in weaktr.WeakTrNet(weaktr.load_weaktr_config("weaktr")).state_dict().items()}
    assert shapes["cls_token"] == (1, 20, 384) and shapes["pos_embed"] == (1, 216, 384)
    assert shapes["head.weight"] == (20, 384, 3, 3)
    assert shapes["adaptive_attention_fusion.attn_head_ffn.0.weight"] == (9, 72)
    assert shapes["adaptive_attention_fusion.attn_feat_ffn.0.weight"] == (8, 64)


@pytest.mark.parametrize("name, words", [("weaktr", "Google Drive"), ("semples", "three training stages")])
def test_checkpoint_required(name, words):
    with pytest.raises(ConfigError, match=words):
        get_method(name)(WeightsOptions(), torch.device("cpu"))


# ----------------------------------------------------------------------------- CLI
def test_run_through_cli(tmp_path):
    from tests.label_synthetic import write_voc_label_tree

    config = tiny_config()
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", config)
    variant = write_variant(tmp_path, config, "weaktr")
    root = tmp_path / "data"
    write_voc_label_tree(root, num_train=3, seed=4)
    code, _, stderr = call_cli(["run", "--method", "weaktr", "--dataset", "voc_train", "--checkpoint", ckpt,
                                "--config", variant, "--data-root", root, "--output", tmp_path / "out",
                                "--workers", "0", "--quiet", "--device", "cpu"])
    assert code == 0, stderr
    [result] = result_jsons(tmp_path / "out")
    data = json.loads(result.read_text())
    assert data["method"]["name"] == "weaktr" and data["dataset"]["track"] == "label-conditioned"
    assert data["metrics"]["bg_threshold"] == "0.43" and len(data["metrics"]["curve"]) == 20


def test_token_label_mapping(tmp_path):
    method, _ = tiny_method(tmp_path)
    assert method.key_labels(VOC) == tuple(range(1, 21))
    coco = DatasetInfo("coco_train", ("background",) + tuple(f"c{i}" for i in range(80)), True)
    with pytest.raises(ConfigError, match="20 class tokens"):
        method.key_labels(coco)
    method.config = dataclasses.replace(method.config, num_classes=90)
    keys = method.key_labels(coco)
    assert keys[0] == 1 and keys[11] == -1 and keys[12] == 12 and keys[89] == 80  # ids 1, 12 unused, 13, 90


def test_given_the_file_the_image_is_decoded_as_weaktr_does_with_pil_and_no_exif(tmp_path):
    from PIL import Image

    from ovseg_bench.imaging import decode_image

    method, _ = tiny_method(tmp_path)
    pixels = image(np.random.default_rng(6), 48, 64)
    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: rotated 180 degrees
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    harness = np.ascontiguousarray(decode_image(path)[:, :, ::-1])  # cv2 applies the EXIF rotation
    pil = np.array(Image.open(path).convert("RGB"))
    assert not np.array_equal(harness, pil)
    from_file = method.cams(harness, (3,), VOC, image_id="r", image_path=path)
    assert np.array_equal(from_file.maps, method.cams(pil, (3,), VOC, image_id="r").maps)


def test_saved_cams_and_pseudo_masks_rescore_to_the_same_counts(tmp_path):
    """--save-cams writes WeakTr's format, --save-predictions the fixed threshold's pseudo masks;
    `--method predictions` on either gives the run's own counts at that threshold."""
    from PIL import Image

    from ovseg_bench.datasets.cams import read_npy_dict
    from tests.label_synthetic import write_voc_label_tree

    config = tiny_config()
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", config)
    variant = write_variant(tmp_path, config, "weaktr")
    root = tmp_path / "data"
    write_voc_label_tree(root, num_train=3, seed=4)
    common = ["--dataset", "voc_train", "--data-root", root, "--workers", "0", "--quiet", "--device", "cpu"]
    code, _, stderr = call_cli(["run", "--method", "weaktr", "--checkpoint", ckpt, "--config", variant,
                                "--output", tmp_path / "out", "--save-cams", "--save-predictions", *common])
    assert code == 0, stderr
    (run,) = [json.loads(p.read_text()) for p in result_jsons(tmp_path / "out")]
    cams_dir = tmp_path / "out" / "cams" / "weaktr" / "voc_train"
    files = sorted(cams_dir.glob("*.npy"))
    assert len(files) == 3
    content = read_npy_dict(files[0])
    assert all(isinstance(k, int) and v.dtype == np.float32 for k, v in content.items())
    masks_dir = tmp_path / "out" / "predictions" / "weaktr" / "voc_train"
    assert set(np.unique(np.array(Image.open(sorted(masks_dir.glob("*.png"))[0]))).tolist()) <= set(range(21))

    def fixed_point(result):
        return next(point for point in result["metrics"]["curve"] if float(point["bg_threshold"]) == 0.43)

    code, _, stderr = call_cli(["run", "--method", "predictions", "--predictions", cams_dir, "--bg-threshold", "0.43",
                                "--output", tmp_path / "again", *common])
    assert code == 0, stderr
    (again,) = [json.loads(p.read_text()) for p in result_jsons(tmp_path / "again")]
    assert fixed_point(again) == fixed_point(run)
    code, _, stderr = call_cli(["run", "--method", "predictions", "--predictions", masks_dir,
                                "--output", tmp_path / "masks", *common])
    assert code == 0, stderr
    (masks,) = [json.loads(p.read_text()) for p in result_jsons(tmp_path / "masks")]
    assert masks["metrics"]["mIoU"] == fixed_point(run)["mIoU"]


def test_the_crf_variant_refines_the_fixed_thresholds_pseudo_mask_as_weaktrs_evaluation(tmp_path):
    from PIL import Image

    from ovseg_bench.datasets.cams import pseudo_mask
    from ovseg_bench.methods.crf import WEAKTR_VOC, label_crf
    from tests.label_synthetic import write_voc_label_tree

    config = dataclasses.replace(tiny_config(), name="weaktr_crf", crf="weaktr_voc", bg_grid=(43, 44))
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", config)
    variant = write_variant(tmp_path, config, "weaktr_crf")
    root = tmp_path / "data"
    write_voc_label_tree(root, num_train=2, seed=5)
    code, _, stderr = call_cli(["run", "--method", "weaktr_crf", "--checkpoint", ckpt, "--config", variant,
                                "--dataset", "voc_train", "--data-root", root, "--output", tmp_path / "out",
                                "--save-predictions", "--workers", "0", "--quiet", "--device", "cpu"])
    assert code == 0, stderr
    method = weaktr.WeakTr(config, WeightsOptions(checkpoint=ckpt), torch.device("cpu"))
    from ovseg_bench.datasets.cards import load_card
    from ovseg_bench.datasets.label_conditioned import list_label_conditioned

    card = load_card("voc_train")
    refined = 0
    for ref in list_label_conditioned(card, root):
        rgb = np.array(Image.open(ref.image_path).convert("RGB"))
        gt = np.array(Image.open(ref.gt_path))
        labels = tuple(int(v) for v in np.unique(gt) if 0 < v < 255)
        cams = method.cams(rgb, labels, VOC, image_id=ref.image_id)
        mask = pseudo_mask(cams, 0.43, gt.shape)
        key = np.array([0, *cams.classes])
        compact = np.searchsorted(np.sort(key), mask)  # file order is ascending for WeakTr's CAMs
        want = key[label_crf(compact, len(key), rgb, params=WEAKTR_VOC)] if len(key) > 1 else mask
        saved = np.array(Image.open(tmp_path / "out" / "predictions" / "weaktr_crf" / "voc_train" / f"{ref.image_id}.png"))
        assert np.array_equal(saved, want)
        refined += len(key) > 1
    assert refined  # at least one image went through the CRF


def test_coco_configs_follow_weaktrs_coco_recipe_and_run(tmp_path):
    from tests.label_synthetic import write_coco2014_tree

    coco, crf = weaktr.load_weaktr_config("weaktr_coco"), weaktr.load_weaktr_config("weaktr_coco_crf")
    assert (coco.num_classes, coco.reduction, coco.pool, coco.scales, coco.bg_threshold) == (90, 8.0, "max",
                                                                                          (1.0, 0.8, 1.2), 0.42)
    assert crf.crf == "weaktr_coco" and crf.grid() == (0.42,)
    semples = weaktr.load_weaktr_config("semples_coco")
    assert (semples.reduction, semples.pool) == (4.0, "avg")
    assert weaktr.load_weaktr_config("semples_coco_crf").crf == "weaktr_voc"  # SemPLeS drops the COCO CRF choice
    config = dataclasses.replace(coco, **TINY)
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", config)
    variant = write_variant(tmp_path, config, "weaktr_coco")
    root = tmp_path / "data"
    write_coco2014_tree(root, split="train", seed=1)
    write_coco2014_tree(root, split="val", seed=2)  # data prepare coco2014 renders both splits
    code, _, stderr = call_cli(["data", "prepare", "coco2014", "--data-root", root, "--quiet"])
    assert code == 0, stderr
    code, _, stderr = call_cli(["run", "--method", "weaktr_coco", "--checkpoint", ckpt, "--config", variant,
                                "--dataset", "coco2014_train", "--data-root", root, "--output", tmp_path / "out",
                                "--workers", "0", "--quiet", "--device", "cpu"])
    assert code == 0, stderr
    [result] = result_jsons(tmp_path / "out")
    assert json.loads(result.read_text())["metrics"]["bg_threshold"] == "0.42"
