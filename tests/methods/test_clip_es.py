"""CLIP-ES (ovseg_bench/methods/clip_es.py) on tiny random open_clip ViT/16s, each step against an
independent computation of what linyq2117/CLIP-ES@3893f81 does (generate_cams_voc12.py ``perform``,
clip/model.py, pytorch_grad_cam, utils.py ``scoremap2bbox``, eval_cam.py)."""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovseg_bench.methods.clip_es as ce  # registers clip_es (until it is a built-in module)
from ovseg_bench.datasets.cams import Cams, pseudo_mask
from ovseg_bench.methods.base import DatasetInfo, WeightsOptions
from ovseg_bench.registry import get_method
from tests.conftest import TINY_MODEL, call_cli
from tests.label_synthetic import write_voc_label_tree

TINY12 = str(Path(__file__).parents[1] / "assets" / "tiny_vit16_12.json")  # 12 blocks: CAA's "last 8" is a choice
VOC_NAMES = tuple((Path(__file__).parents[2] / "datasets" / "classnames" / "mmseg" / "voc21.txt")
                  .read_text(encoding="utf-8").split())
VOC = DatasetInfo("voc_train", VOC_NAMES, True)


@pytest.fixture(scope="module", params=[TINY12, TINY_MODEL], ids=["12-blocks", "3-blocks"])
def method(request, tmp_path_factory):
    return get_method("clip_es")(WeightsOptions(model=request.param, pretrained="none"), torch.device("cpu"))


def _image(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth image (blobs), so the CAMs have structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size[1], size[0]), Image.BILINEAR))


# ----------------------------------------------------------------------------- independent oracles

def _bilinear(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[..., h, w] float64 -> [..., out_h, out_w]: half-pixel bilinear with edge clamping (what
    torch's ``interpolate(bilinear, align_corners=False)`` and ``cv2.resize`` INTER_LINEAR compute)."""
    def axis(n_in, n_out):
        pos = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(pos).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo
    (y0, y1, wy), (x0, x1, wx) = axis(src.shape[-2], out_h), axis(src.shape[-1], out_w)
    rows = src[..., y0, :] * (1 - wy)[:, None] + src[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def _oracle_input(image: np.ndarray) -> torch.Tensor:
    """CLIP-ES's own transform: torchvision Resize((ceil16 h, ceil16 w), BICUBIC), ToTensor, Normalize."""
    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    h, w = (int(np.ceil(s / 16) * 16) for s in image.shape[:2])
    transform = Compose([Resize((h, w), interpolation=InterpolationMode.BICUBIC), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return transform(Image.fromarray(image))[None]


def _head_mean_attention(block, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of ``ln_1(x)`` by hand, averaged over heads: [B,T,T]."""
    attn = block.attn
    q, k, _ = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, t, d = q.shape
    heads = attn.num_heads
    q, k = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k))
    return torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1).mean(dim=1)


def _oracle_tokens(visual, pixels: torch.Tensor):
    """Block-0 input with the position table resized by :func:`_bilinear` and rounded to fp16."""
    patches = visual.conv1(pixels)
    h, w = patches.shape[-2:]
    pos = visual.positional_embedding.detach().double().numpy()
    n = int(round((pos.shape[0] - 1) ** 0.5))
    grid = _bilinear(pos[1:].T.reshape(-1, n, n), h, w).reshape(pos.shape[1], -1).T
    table = torch.from_numpy(np.concatenate([pos[:1], grid])).float().half().float()
    x = torch.cat([visual.class_embedding.view(1, 1, -1), patches.flatten(2).transpose(1, 2)], dim=1) + table
    return visual.ln_pre(x), (h, w)


def _oracle_forward(model, pixels: torch.Tensor, text: torch.Tensor):
    """open_clip's own blocks (their usual attention path), a forward hook at the last ``ln_1`` as
    pytorch_grad_cam has, and the score of ``forward_last_layer``: (act, probs, attentions, grid)."""
    visual, saved = model.visual, {}
    with torch.no_grad():
        x, grid = _oracle_tokens(visual, pixels)
        attentions = []
        for block in visual.transformer.resblocks[:-1]:
            attentions.append(_head_mean_attention(block, x))
            x = block(x)
    last = visual.transformer.resblocks[-1]
    attentions.append(_head_mean_attention(last, x).detach())

    def hook(module, inputs, output):
        saved["act"] = output.detach().requires_grad_(True)
        return saved["act"]

    handle = last.ln_1.register_forward_hook(hook)
    try:
        y = last(x)
    finally:
        handle.remove()
    feats = F.normalize(visual.ln_post(y)[:, 1:].mean(dim=1) @ visual.proj, dim=-1)
    probs = (model.logit_scale.exp() * feats @ F.normalize(text, dim=-1).t()).softmax(dim=-1)
    return saved["act"], probs, attentions, grid


def _minmax(cam: np.ndarray) -> np.ndarray:
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


def _oracle_gradcam(act: torch.Tensor, probs: torch.Tensor, k: int, grid) -> np.ndarray:
    (grads,) = torch.autograd.grad(probs[0, k], act, retain_graph=True)
    weights = grads[0, 1:].double().mean(dim=0)            # spatial mean per channel
    cam = (act[0, 1:].detach().double() @ weights).reshape(grid).numpy()
    return _minmax(np.maximum(_minmax(np.maximum(cam, 0)), 0))  # ReLU, min-max, the aggregate's again


def _oracle_transition(attn: np.ndarray) -> np.ndarray:
    trans = attn.astype(np.float64)
    for _ in range(3):
        trans = trans / trans.sum(axis=0, keepdims=True)
        trans = trans / trans.sum(axis=1, keepdims=True)
    trans = (trans + trans.T) / 2
    return trans @ trans


def _components(binary: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (y0, x0, y1, x1 inclusive) of the 8-connected components, by flood fill."""
    seen, boxes = np.zeros_like(binary, dtype=bool), []
    for start in zip(*np.nonzero(binary)):
        if seen[start]:
            continue
        queue, seen[start], cells = deque([start]), True, []
        while queue:
            y, x = queue.popleft()
            cells.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < binary.shape[0] and 0 <= nx < binary.shape[1] and binary[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        ys, xs = zip(*cells)
        boxes.append((min(ys), min(xs), max(ys), max(xs)))
    return boxes


def _oracle_box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """Boxes of the components above int(threshold * max) of the uint8 map; exclusive ends
    min(end + 1, size - 1) as ``perform`` slices them."""
    u8 = (cam * 255).astype(np.uint8)
    mask = np.zeros(cam.shape)
    for y0, x0, y1, x1 in _components(u8 > int(threshold * u8.max())):
        mask[y0:min(y1 + 1, cam.shape[0] - 1), x0:min(x1 + 1, cam.shape[1] - 1)] = 1
    return mask


def _oracle_cams(method, image: np.ndarray, labels: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The whole of ``perform`` from the oracles: ([K,H,W] float64 CAMs, the grid-level GradCAMs)."""
    fg, bg = (t.clone() for t in method._text_rows(VOC))
    text = torch.cat([fg[[label - 1 for label in labels]], bg])
    act, probs, attentions, grid = _oracle_forward(method.model, _oracle_input(image), text)
    mean = torch.stack(attentions)[-8:].mean(dim=0)[0, 1:, 1:].double().numpy()
    trans, out, gradcams = _oracle_transition(mean), [], []
    for k in range(len(labels)):
        cam = _oracle_gradcam(act, probs, k, grid)
        gradcams.append(cam)
        refined = ((trans * _oracle_box_mask(cam, 0.4).reshape(1, -1)) @ cam.reshape(-1)).reshape(grid)
        out.append(_bilinear(_minmax(refined), *image.shape[:2]))
    return np.stack(out), gradcams


# ----------------------------------------------------------------------------- steps

@pytest.mark.parametrize("size", [(70, 45), (64, 48), (33, 80)])
def test_input_is_ceil16_bicubic_with_clip_unit_statistics(size):
    image = _image(1, size)
    resized = ce.resize_input(image)
    assert resized.shape[:2] == tuple(int(np.ceil(s / 16) * 16) for s in size)
    ours = ce.CLIP_UNIT.apply(torch.from_numpy(resized.copy()).permute(2, 0, 1)[None])
    assert torch.equal(ours, _oracle_input(image))


def test_position_table_bilinear_every_call_and_fp16():
    torch.manual_seed(0)
    pos = torch.randn(1 + 14 * 14, 8)
    for grid in [(14, 14), (5, 3), (20, 31)]:
        table = ce.upsample_pos_embed(pos, grid)
        assert table.dtype == torch.float16 and table.shape == (1 + grid[0] * grid[1], 8)
        expected = _bilinear(pos[1:].double().numpy().T.reshape(8, 14, 14), *grid).reshape(8, -1).T
        np.testing.assert_allclose(table[1:].float().numpy(), expected, rtol=2e-3, atol=2e-3)
        assert torch.equal(table[0], pos[0].half())
    assert torch.equal(ce.upsample_pos_embed(pos, (14, 14), fp16=False), pos)  # same grid: the table itself


def test_prefix_attention_and_gradcam_match_autograd_oracle(method):
    image, labels = _image(2, (70, 45)), (15, 3, 9)
    fg, bg = (t.clone() for t in method._text_rows(VOC))
    text = torch.cat([fg[[label - 1 for label in labels]], bg])
    pixels = ce.CLIP_UNIT.apply(torch.from_numpy(ce.resize_input(image).copy()).permute(2, 0, 1)[None])
    x, grid = ce.embed(method.model.visual, pixels)
    x, attention = ce.prefix_blocks(method.model.visual, x)
    normed, probs, last = ce.last_block_probabilities(method.model, x, text)
    act, oracle_probs, oracle_attn, oracle_grid = _oracle_forward(method.model, _oracle_input(image), text)
    assert grid == oracle_grid == (5, 3) and probs.shape == (1, len(labels) + 25)
    assert len(attention) == len(method.model.visual.transformer.resblocks) - 1
    for ours, theirs in zip([*attention, last], oracle_attn):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, oracle_probs, rtol=1e-4, atol=1e-6)
    for k in range(len(labels)):
        (grads,) = torch.autograd.grad(probs[:, k].sum(), normed, retain_graph=True)
        cam = ce.gradcam(ce._to_maps(normed, grid), ce._to_maps(grads, grid))
        assert cam.dtype == np.float32 and cam.shape == grid
        np.testing.assert_allclose(cam, _oracle_gradcam(act, oracle_probs, k, grid), atol=1e-4)


def test_text_path_is_open_clip_text_tower_with_explicit_attention(method):
    tokens = method.tokenizer(["a clean origami bird avian.", "a clean origami sign."])
    torch.testing.assert_close(ce.encode_text(method.model, tokens), method.model.encode_text(tokens),
                               rtol=1e-5, atol=1e-6)
    rows = ce.zeroshot_classifier(method.model, method.tokenizer, ["sky", "cat"], method.templates, "cpu")
    expected = F.normalize(method.model.encode_text(method.tokenizer(["a clean origami sky.", "a clean origami cat."])))
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)


def test_transition_rounds_symmetrise_and_square():
    rng = np.random.default_rng(3)
    attn = torch.from_numpy(rng.random((12, 12)).astype(np.float32)).softmax(dim=1)
    trans = ce.transition_matrix(attn)
    np.testing.assert_allclose(trans.numpy(), _oracle_transition(attn.numpy()), rtol=1e-5, atol=1e-7)
    one = ce.transition_matrix(attn, rounds=1, powers=0)
    assert torch.allclose(one, one.T) and one.dtype == torch.float32


def test_box_mask_from_contours_at_04_of_the_maximum():
    cam = np.zeros((9, 11), np.float32)
    cam[1:4, 1:4] = 0.9       # a blob with a hole: RETR_TREE's inner contour lies inside its box
    cam[2, 2] = 0.1
    cam[5, 5], cam[6, 6] = 0.8, 0.7  # diagonal neighbours: one 8-connected component
    cam[4:9, 8:11] = 1.0      # touches the bottom-right border: loses its last row and column
    cam[7, 1] = 0.35          # under 0.4 * max: no box
    mask = ce.box_mask(cam, 0.4)
    assert mask.shape == (1, cam.size) and mask.dtype == torch.float32
    expected = _oracle_box_mask(cam, 0.4)
    np.testing.assert_array_equal(mask.view(cam.shape).numpy(), expected)
    assert expected[4:8, 8:10].all() and not expected[8].any() and not expected[:, 10].any()
    assert not ce.box_mask(np.zeros((4, 4), np.float32), 0.4).any()  # no contour: all zero


def test_refine_is_masked_transition_times_cam():
    rng = np.random.default_rng(4)
    cam = rng.random((3, 4)).astype(np.float32)
    trans, mask = torch.rand(12, 12), (torch.rand(1, 12) > 0.5).float()
    expected = (trans.double().numpy() * mask.numpy()) @ cam.reshape(-1).astype(np.float64)
    np.testing.assert_allclose(ce.refine(trans, mask, cam), expected.reshape(3, 4), rtol=1e-5)


@pytest.mark.parametrize("size", [(120, 90), (97, 130)])
def test_cams_match_the_oracle_pipeline(method, size):
    image, labels = _image(5, size), (15, 3)
    with torch.inference_mode():  # as the engine calls it
        cams = method.cams(image, labels, VOC, image_id="a")
    assert isinstance(cams, Cams) and cams.classes == labels and cams.source == "clip-es"
    assert cams.file_dtype == "float16" and cams.maps.shape == (2, *size) and cams.maps.dtype == np.float32
    assert np.array_equal(cams.maps, cams.maps.astype(np.float16).astype(np.float32))
    expected, gradcams = _oracle_cams(method, image, labels)
    assert all(_oracle_box_mask(cam, 0.4).sum() >= 4 for cam in gradcams)  # boxes survive: CAA is exercised
    np.testing.assert_allclose(cams.maps, expected, atol=2e-3)
    assert cams.maps.min() >= 0 and cams.maps.max() <= 1


def test_77_token_quirk_runs_every_block_first(method):
    visual = method.model.visual
    x = torch.randn(1, 77, visual.conv1.out_channels)
    depth = len(visual.transformer.resblocks)
    assert len(ce.prefix_blocks(visual, x)[1]) == depth
    assert len(ce.prefix_blocks(visual, x, quirk=False)[1]) == depth - 1
    assert len(ce.prefix_blocks(visual, x[:, :76])[1]) == depth - 1


def test_fp32_cams_are_deterministic(method):
    image = _image(6, (40, 52))
    first = method.cams(image, (12, 1), VOC, image_id="a").maps
    assert np.array_equal(first, method.cams(image, (12, 1), VOC, image_id="a").maps)


def test_no_labels_gives_no_maps(method):
    cams = method.cams(_image(7, (20, 30)), (), VOC, image_id="a")
    assert cams.classes == () and cams.maps.shape == (0, 20, 30)


# ----------------------------------------------------------------------------- background rule

@pytest.mark.parametrize("k", [1.0, 2.0])
def test_threshold_plane_equals_clip_es_power_rule(k):
    threshold = ce.power_threshold(k)
    rng = np.random.default_rng(int(k))
    near = np.float16(threshold) + np.arange(-8, 9) * np.float16(2 ** -12)
    values = np.concatenate([rng.random(401), near, [0, 1]]).astype(np.float16)
    maps = np.stack([rng.permutation(values), rng.permutation(values) * np.float16(0.9)]).reshape(2, 21, 20)
    keys = np.array([14, 2])                                 # CLIP-ES keys, 0-based
    bg = np.power(1 - np.max(maps, axis=0, keepdims=True), k)  # eval_cam.py, float16
    reference = np.pad(keys + 1, (1, 0))[np.argmax(np.concatenate([bg, maps]), axis=0)]
    cams = Cams((15, 3), maps.astype(np.float32), "clip-es", "float16")
    np.testing.assert_array_equal(pseudo_mask(cams, threshold, (21, 20)), reference)


def test_curve_is_the_power_thresholds(method):
    grid, fixed = method.curve("voc_train")
    assert grid == (0.382080078125, 0.5) and fixed == 0.382080078125  # k = 2, eval_cam.py's default
    assert method.settings("voc_train")["bg_thresholds"] == {"1.0": 0.5, "2.0": 0.382080078125}


# ----------------------------------------------------------------------------- config and CLI

def test_shipped_config_holds_clip_es_text():
    cfg = ce.load_clip_es_config("clip_es")
    voc, coco = cfg.class_sets["voc"], cfg.class_sets["coco"]
    assert len(voc.names) == 20 and len(voc.background_words) == 25 and voc.box_threshold == 0.4
    assert len(coco.names) == 80 and len(coco.background_words) == 23 and coco.box_threshold == 0.7
    assert voc.names[14] == "person with clothes,people,human" and set(coco.background_words) < set(voc.background_words)
    from ovseg_bench.methods.prompts import load_templates

    assert load_templates(cfg.templates) == ("a clean origami {}.",)
    assert (cfg.model, cfg.pretrained, cfg.caa_layers, cfg.bg_power) == ("ViT-B-16", "openai", 8, 2.0)


def test_unknown_dataset_is_refused(method):
    from ovseg_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="no class names for dataset 'ade20k'"):
        method.check_datasets(("ade20k",))


def test_cli_run_on_synthetic_voc_train(tmp_path):
    write_voc_label_tree(tmp_path / "data", num_train=3, seed=3)
    argv = ["run", "--method", "clip_es", "--dataset", "voc_train", "--model", TINY_MODEL, "--pretrained", "none",
            "--data-root", tmp_path / "data", "--output", tmp_path / "out", "--workers", "0", "--quiet",
            "--device", "cpu"]
    code, out, err = call_cli(argv)
    assert code == 0, out + err
    (path,) = [p for p in (tmp_path / "out").rglob("*.json") if "sidecar" not in p.name]
    result = json.loads(path.read_text(encoding="utf-8"))
    metrics = result["metrics"]
    assert metrics["bg_threshold"] == "0.38208" and [c["bg_threshold"] for c in metrics["curve"]] == ["0.38208", "0.50"]


def test_the_crf_variant_labels_are_clip_es_crf_path_redone_independently(tmp_path):
    """eval_cam_with_crf.py step by step with pydensecrf itself: scores [(1 - max)^1, CAMs] in
    float16, the BGR image minus the mean cast to uint8, STEGO's kernels, argmax, keys."""
    import pydensecrf.densecrf as dcrf
    import pydensecrf.utils as utils
    from PIL import Image as PILImage

    from ovseg_bench.datasets.cards import load_card
    from ovseg_bench.datasets.label_conditioned import list_label_conditioned

    root = tmp_path / "data"
    write_voc_label_tree(root, num_train=2, seed=9)
    argv = ["run", "--method", "clip_es_crf", "--dataset", "voc_train", "--model", TINY_MODEL, "--pretrained", "none",
            "--data-root", root, "--output", tmp_path / "out", "--save-predictions", "--workers", "0", "--quiet",
            "--device", "cpu"]
    code, out, err = call_cli(argv)
    assert code == 0, out + err
    method = get_method("clip_es_crf")(WeightsOptions(model=TINY_MODEL, pretrained="none"), torch.device("cpu"))
    refined = 0
    for ref in list_label_conditioned(load_card("voc_train"), root):
        rgb = np.array(PILImage.open(ref.image_path).convert("RGB"))
        gt = np.array(PILImage.open(ref.gt_path))
        labels = tuple(int(v) for v in np.unique(gt) if 0 < v < 255)
        cams = method.cams(rgb, labels, VOC, image_id=ref.image_id, image_path=ref.image_path)
        saved = np.array(PILImage.open(tmp_path / "out" / "predictions" / "clip_es_crf" / "voc_train"
                                       / f"{ref.image_id}.png"))
        if not labels:
            assert (saved == 0).all()
            continue
        maps = cams.maps.astype(np.float16)
        prob = np.concatenate([np.power(1 - np.max(maps, axis=0, keepdims=True), 1), maps], axis=0)
        image = cv2.imread(str(ref.image_path), cv2.IMREAD_COLOR).astype(np.float32)
        image -= (104.008, 116.669, 122.675)
        image = image.transpose(2, 0, 1).astype(np.uint8).transpose(1, 2, 0)
        c, h, w = prob.shape
        d = dcrf.DenseCRF2D(w, h, c)
        d.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(prob)))
        d.addPairwiseGaussian(sxy=1, compat=3)
        d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
        q = np.array(d.inference(10)).reshape((c, h, w))
        keys = np.pad(np.array(cams.classes) - 1 + 1, (1, 0), mode="constant")
        assert np.array_equal(saved, keys[np.argmax(q, axis=0)])
        refined += 1
    assert refined


def test_precision_applies_to_the_cam_passes_and_is_recorded(tmp_path):
    root = tmp_path / "data"
    write_voc_label_tree(root, num_train=2, seed=3)
    argv = ["run", "--method", "clip_es", "--dataset", "voc_train", "--model", TINY_MODEL, "--pretrained", "none",
            "--data-root", root, "--workers", "0", "--quiet", "--device", "cpu"]
    results = {}
    for precision in ("fp32", "bf16"):
        code, out, err = call_cli(argv + ["--output", tmp_path / precision, "--precision", precision])
        assert code == 0, out + err
        (path,) = [p for p in (tmp_path / precision).rglob("*.json") if "sidecar" not in p.name]
        results[precision] = json.loads(path.read_text(encoding="utf-8"))
    assert results["bf16"]["protocol"]["precision"] == "bf16"
    method = get_method("clip_es")(WeightsOptions(model=TINY_MODEL, pretrained="none"), torch.device("cpu"))
    image = _image(4, (64, 80))
    full = method.cams(image, (3, 12), VOC, image_id="x").maps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = method.cams(image, (3, 12), VOC, image_id="x").maps
    assert full.dtype == low.dtype == np.float32 and not np.array_equal(full, low)


def test_saved_clip_es_cams_rescore_to_the_same_counts_at_k_1(tmp_path):
    """--save-cams writes CLIP-ES's {keys, attn_highres}; predictions reads them with CLIP-ES's rule.
    k = 1 is the threshold 0.5, on predictions' grid (k = 2's 0.38208 is not)."""
    root = tmp_path / "data"
    write_voc_label_tree(root, num_train=3, seed=8)
    common = ["--dataset", "voc_train", "--data-root", root, "--workers", "0", "--quiet", "--device", "cpu"]
    code, out, err = call_cli(["run", "--method", "clip_es", "--model", TINY_MODEL, "--pretrained", "none",
                               "--output", tmp_path / "out", "--save-cams", *common])
    assert code == 0, out + err
    cams_dir = tmp_path / "out" / "cams" / "clip_es" / "voc_train"
    code, out, err = call_cli(["run", "--method", "predictions", "--predictions", cams_dir, "--bg-threshold", "0.5",
                               "--output", tmp_path / "again", *common])
    assert code == 0, out + err

    def point(folder, label):
        (path,) = [p for p in folder.rglob("*.json") if "sidecar" not in p.name and "cams" not in p.parts]
        curve = json.loads(path.read_text(encoding="utf-8"))["metrics"]["curve"]
        return next(c for c in curve if c["bg_threshold"] == label)

    assert point(tmp_path / "again", "0.50") == point(tmp_path / "out", "0.50")
