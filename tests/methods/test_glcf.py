"""``glcf``: GLCF's arithmetic (Seonghoon-Yu/Zero-shot-RIS@75ff6ed) on tiny random CLIP weights
and synthetic refer data, each step against an independent computation written the way GLCF's
own code runs it (sequence-first tokens, one proposal at a time, NumPy bilinear weights)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg_bench.errors import ConfigError, DataError
from ovseg_bench.methods import glcf
from ovseg_bench.methods.base import MethodInputs, ReferringInfo, WeightsOptions
from ovseg_bench.methods.proposals import encode_mask, write_proposals
from ovseg_bench.registry import get_method
from tests.conftest import TINY_MODEL, call_cli, result_jsons, run_argv
from tests.referring_synthetic import write_refer_tree

TINY_B32 = str(Path(__file__).resolve().parents[1] / "assets" / "tiny_vit_b32.json")
INFO = ReferringInfo("refcoco_val", "refcoco")


# ----------------------------------------------------------------------------- the crop box
def test_freesolo_box_of_a_gap_free_mask_is_shifted_and_loses_the_last_row_and_column():
    mask = torch.zeros(1, 10, 12, dtype=torch.bool)
    mask[0, 2:6, 3:8] = True  # rows 2..5, columns 3..7
    # cx = 5, width 5 -> trunc(2.5) = 2, trunc(7.5) = 7; cy = 3.5, height 4 -> trunc(1.5) = 1, trunc(5.5) = 5
    assert glcf.freesolo_boxes(mask).tolist() == [[2, 1, 7, 5]]


def test_freesolo_box_of_a_mask_with_gaps_is_narrower_than_its_bounding_box():
    mask = torch.zeros(1, 6, 12, dtype=torch.bool)
    mask[0, 1, 0] = mask[0, 1, 9] = mask[0, 4, 9] = True  # columns {0, 9}, rows {1, 4}
    # cx = 4.5, width 2 -> 3.5, 5.5 -> 3, 5; cy = 2.5, height 2 -> 1.5, 3.5 -> 1, 3
    assert glcf.freesolo_boxes(mask).tolist() == [[3, 1, 5, 3]]


# ----------------------------------------------------------------------------- the two branches
def bilinear_weights(src: int, dst: int) -> np.ndarray:
    """[dst, src] matrix of align_corners=False bilinear resampling (no antialias), by formula."""
    w = np.zeros((dst, src))
    for i in range(dst):
        x = max((i + 0.5) * src / dst - 0.5, 0.0)
        lo = min(int(np.floor(x)), src - 1)
        hi = min(lo + 1, src - 1)
        frac = x - lo
        w[i, lo] += 1 - frac
        w[i, hi] += frac
    return w


def test_masks_reach_the_token_grid_by_bilinear_point_sampling_without_antialias():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 37, 53, generator=gen) > 0.5
    got = glcf.resize(masks.float()[:, None], (7, 7))[:, 0]
    rows, cols = bilinear_weights(37, 7), bilinear_weights(53, 7)
    want = np.einsum("ih,nhw,jw->nij", rows, masks.double().numpy(), cols)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-5)  # torch's float32 source index


@pytest.fixture(scope="module")
def model():
    from ovseg_bench.methods.clip_model import load_clip

    return load_clip(TINY_B32, "none").model


def test_token_masking_matches_one_proposal_at_a_time_in_glcfs_layout(model):
    visual = model.visual
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(3, 224, 224, generator=gen)
    masks = torch.rand(4, 50, 70, generator=gen) > 0.4
    with torch.no_grad():
        got = glcf.token_masked_features(visual, image, masks, 1)
        for n, mask in enumerate(masks):
            grid = torch.from_numpy(np.einsum("ih,hw,jw->ij", bilinear_weights(50, 7), mask.double().numpy(),
                                              bilinear_weights(70, 7))).float()
            x = visual.conv1(image[None]).reshape(1, visual.conv1.out_channels, -1).permute(0, 2, 1)
            x = torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1) + visual.positional_embedding
            x = visual.ln_pre(x).permute(1, 0, 2)  # LND, as GLCF's vendored CLIP
            for index, block in enumerate(visual.transformer.resblocks):
                if index >= 1:
                    x = torch.cat([x[:1], x[1:] * grid.flatten()[:, None, None]], dim=0)
                x = block(x.permute(1, 0, 2)).permute(1, 0, 2)
            want = visual.ln_post(x[0]) @ visual.proj
            torch.testing.assert_close(got[n:n + 1], want, rtol=0, atol=2e-5)


def test_masked_crop_fills_in_normalised_space_then_resizes_the_freesolo_box():
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(3, 20, 30, generator=gen)
    mask = torch.zeros(1, 20, 30, dtype=torch.bool)
    mask[0, 4:15, 6:25] = True
    mask[0, 8, 10] = False
    got = glcf.masked_crops(image, mask, 16)[0]
    filled = image.numpy().copy()
    for c, value in enumerate((0.485, 0.456, 0.406)):
        filled[c][~mask[0].numpy()] = value
    x1, y1, x2, y2 = glcf.freesolo_boxes(mask)[0].tolist()
    assert (x1, y1, x2, y2) == (5, 3, 24, 14)
    crop = filled[:, y1:y2, x1:x2]
    want = np.einsum("ih,chw,jw->cij", bilinear_weights(y2 - y1, 16), crop, bilinear_weights(x2 - x1, 16))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_an_empty_box_is_widened_to_one_pixel_instead_of_failing():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 3:6, 0] = True  # only column 0: cx 0, width 1 -> x1 = trunc(-0.5) = 0 = x2
    assert glcf.freesolo_boxes(mask)[0, 0] == glcf.freesolo_boxes(mask)[0, 2] == 0
    assert glcf.masked_crops(torch.zeros(3, 8, 8), mask, 4).shape == (1, 3, 4, 4)


def test_the_800_pixel_input_is_pillows_bilinear_short_side_then_imagenet_statistics():
    from torchvision import transforms as T

    rgb = np.random.default_rng(3).integers(0, 256, (30, 47, 3), dtype=np.uint8)
    got = glcf.glcf_input(rgb, 40)
    want = T.Compose([T.Resize(40), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(
        Image.fromarray(rgb))
    assert got.shape == (3, 40, 62)  # int(40 * 47 / 30) = 62
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_scores_are_scaled_cosines_and_ties_take_the_first_proposal():
    visual = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[3.0, 0.1]])
    scores = glcf.fused_scores(visual, text, torch.tensor(np.log(100.0)))
    cos = np.array([3.0, 3.0 * 2, 0.1]) / (np.array([1.0, 2.0, 1.0]) * np.hypot(3.0, 0.1))
    np.testing.assert_allclose(scores[0].numpy(), 100 * cos, rtol=1e-6)
    assert int(scores.argmax(dim=1)) == 0  # proposals 0 and 1 tie: the first wins


# ----------------------------------------------------------------------------- the adapter
@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    from ovseg_bench.datasets.refer import convert_refs

    root = write_refer_tree(tmp_path_factory.mktemp("refer") / "data")
    convert_refs(root, "refcoco", "unc")
    return root


def image_sizes(root: Path) -> dict[str, tuple[int, int]]:
    data = json.loads((root / "refcoco" / "instances.json").read_text())
    return {str(im["id"]): (im["height"], im["width"]) for im in data["images"]}


def write_random_proposals(root: Path, path: Path, *, empty: tuple[str, ...] = (), count: int = 5,
                           seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = {}
    for image_id, (h, w) in image_sizes(root).items():
        entries = []
        for k in range(0 if image_id in empty else count):
            mask = np.zeros((h, w), dtype=bool)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[y:y + rng.integers(3, h // 2), x:x + rng.integers(3, w // 2)] = True
            entries.append({"rle": encode_mask(mask), "score": float(1 - k / 10)})
        images[image_id] = entries
    write_proposals(path, "test", {"seed": seed}, images)
    return path


def build(proposals: Path):
    return get_method("glcf")(WeightsOptions(model=TINY_B32, pretrained="none"), torch.device("cpu"),
                              inputs=MethodInputs(proposals=proposals))


def independent_choice(method, rgb: np.ndarray, masks: torch.Tensor, raw: str, alpha: float) -> int:
    """GLCF's main loop for one sample, from its pieces written out again here."""
    from torchvision import transforms as T

    from ovseg_bench.methods.noun_phrase import glcf_texts

    h, w = rgb.shape[:2]
    x = T.Compose([T.Resize(800), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(
        Image.fromarray(rgb))
    resized = F.interpolate(x[None], size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    original = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    visual = method.model.visual
    with torch.no_grad():
        global_f = glcf.token_masked_features(visual, resized[0], masks, 9)
        crops = []
        for mask, (x1, y1, x2, y2) in zip(masks, glcf.freesolo_boxes(masks).tolist()):
            m = mask.to(torch.uint8)[None, None]
            masked = original * m + (1 - m) * torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            crops.append(F.interpolate(masked[:, :, y1:y2, x1:x2], size=(224, 224), mode="bilinear",
                                       align_corners=False, antialias=False)[0])
        local_f = method.model.encode_image(torch.stack(crops))
        v = alpha * global_f + (1 - alpha) * local_f
        (sentence, phrase), = glcf_texts(method.parser, [raw])
        tok = method.tokenizer
        t = 0.5 * method.model.encode_text(tok([sentence])) + 0.5 * method.model.encode_text(tok([phrase]))
        score = method.model.logit_scale.exp() * (v / v.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).t()
    return int(torch.argmax(score))


def test_each_expression_picks_the_proposal_of_the_independent_computation(refer_root, tmp_path):
    from ovseg_bench.datasets.cards import load_card
    from ovseg_bench.datasets.refer import read_referring

    proposals = write_random_proposals(refer_root, tmp_path / "p.json", count=6)
    method = build(proposals)
    card = load_card("refcoco_val")
    refs, index = read_referring(card, refer_root)
    for ref in refs:
        rgb = np.array(Image.open(ref.image_path).convert("RGB"))
        state = method.embed_image(rgb, str(ref.image_id), INFO)
        (answer,) = method.masks(state, method.encode_expressions([ref.text]))
        masks = method.proposals.masks(str(ref.image_id), rgb.shape[:2])
        chosen = independent_choice(method, rgb, masks, ref.text, 0.95)
        assert torch.equal(answer, masks[chosen])


def test_a_run_saves_the_chosen_masks_and_leaves_out_images_without_proposals(refer_root, tmp_path):
    sizes = image_sizes(refer_root)
    empty = next(iter(sizes))
    proposals = write_random_proposals(refer_root, tmp_path / "p.json", empty=(empty,))
    argv = run_argv("glcf", "refcoco_val", tmp_path / "out", "--proposals", proposals, "--save-predictions",
                    data_root=refer_root, tiny=False) + ["--model", TINY_B32, "--pretrained", "none"]
    code, _, stderr = call_cli(argv)
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    result = json.loads(path.read_text())
    from ovseg_bench.datasets.cards import load_card
    from ovseg_bench.datasets.refer import read_referring
    from ovseg_bench.engine.metrics.referring import summary_of_rows

    refs, index = read_referring(load_card("refcoco_val"), refer_root)
    skipped = [r.sample_id for r in refs if str(r.image_id) == empty]
    assert skipped and sorted(u["image_id"] for u in result["images"]["unanswered"]) == sorted(skipped)
    folder = tmp_path / "out" / "predictions" / "glcf" / "refcoco_val"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(r.sample_id for r in refs if r.sample_id not in skipped)
    rows = []
    from ovseg_bench.datasets.refer import gt_mask

    for ref in refs:
        if ref.sample_id in skipped:
            continue
        info = index.image(ref.image_id)
        pred = np.array(Image.open(folder / f"{ref.sample_id}.png")) > 0
        gt = gt_mask(index, ref.ann_id, info.height, info.width, "sum_eq_1")
        rows.append(((pred & gt).sum(), (pred | gt).sum()))
    summary = summary_of_rows(np.array(rows, dtype=np.int64), glcf_float32=True)
    assert result["metrics"]["mIoU"] == summary.miou and result["metrics"]["oIoU"] == summary.oiou
    assert result["method"]["config"]["iou_arithmetic"] == "float32"
    assert result["method"]["config"]["proposals"]["sha256"] and result["method"]["config"]["spacy"]


def test_proposals_are_required_and_a_bad_file_is_refused(refer_root, tmp_path):
    with pytest.raises(ConfigError, match="--proposals"):
        get_method("glcf")(WeightsOptions(model=TINY_B32, pretrained="none"), torch.device("cpu"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"source": "x", "params": {}, "images": {"1": [{"score": 1.0}]}}))
    argv = run_argv("glcf", "refcoco_val", tmp_path / "out", "--proposals", bad, data_root=refer_root,
                    tiny=False) + ["--model", TINY_B32, "--pretrained", "none"]
    code, _, stderr = call_cli(argv)
    assert code == 2 and str(bad) in stderr and len(stderr.strip().splitlines()) == 1
    assert not result_jsons(tmp_path / "out")


def test_an_expression_over_77_tokens_fails_naming_it(refer_root, tmp_path):
    method = build(write_random_proposals(refer_root, tmp_path / "p.json"))
    with pytest.raises(DataError, match="over the 77"):
        method.encode_expressions(["the " * 80 + "cat"])


def test_alpha_follows_the_refer_dataset(refer_root, tmp_path):
    method = build(write_random_proposals(refer_root, tmp_path / "p.json"))
    assert method._alpha(ReferringInfo("refcocog_val", "refcocog")) == 0.85
    assert method._alpha(INFO) == 0.95


def test_sam_proposals_from_the_command_drive_a_glcf_run(refer_root, tmp_path, monkeypatch):
    from ovseg_bench.methods import proposals as props
    from tests.methods.test_proposals import FAST, TINY, tiny_sam

    torch.save(tiny_sam().state_dict(), tmp_path / "tiny_sam.pth")
    monkeypatch.setitem(props.SAM_ARCHITECTURES, "vit_b", TINY)
    config = tmp_path / "sam.yaml"
    config.write_text("model_type: vit_b\ngenerator:\n" + "".join(
        f"  {k}: {getattr(FAST, k)}\n" for k in ("points_per_side", "points_per_batch", "pred_iou_thresh",
                                                 "stability_score_thresh", "box_nms_thresh")))
    out = tmp_path / "sam.json"
    code, stdout, stderr = call_cli(["proposals", "--source", "sam", "--dataset", "refcoco_val", "--out", out,
                                     "--model-type", "vit_b", "--checkpoint", tmp_path / "tiny_sam.pth", "--config",
                                     config, "--data-root", refer_root, "--device", "cpu", "--quiet"])
    assert code == 0, stderr
    argv = run_argv("glcf", "refcoco_val", tmp_path / "out", "--proposals", out, data_root=refer_root,
                    tiny=False) + ["--model", TINY_B32, "--pretrained", "none"]
    code, _, stderr = call_cli(argv)
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    assert json.loads(path.read_text())["method"]["config"]["proposals"]["source"] == "sam"
    assert TINY_MODEL  # the ViT-B/16-shaped tiny model is not used: GLCF's grid is ViT-B/32's 7 x 7


# ----------------------------------------------------------------------------- the semantic extension
def test_proposals_are_painted_lowest_first_and_uncovered_pixels_follow_the_rule():
    masks = torch.zeros(3, 4, 6, dtype=torch.bool)
    masks[0, :, :3] = True       # class 1, score 0.9: wins its overlap with proposal 1
    masks[1, :2, 2:5] = True     # class 2, score 0.5
    masks[2, 3, 5] = True        # class 3, score 0.5: a tie with proposal 1, painted after it
    classes, scores = torch.tensor([1, 2, 3]), torch.tensor([0.9, 0.5, 0.5])
    with_bg = glcf.paint_proposals(masks, classes, scores, background=True)
    want = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 2, 2, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 3]])
    assert torch.equal(with_bg, want)
    nearest = glcf.paint_proposals(masks, classes, scores, background=False)
    # (2,3): nearest covered pixels (1,3)=2 and (2,2)=1 are both at distance 1; OpenCV's labels
    # pick one; every other uncovered pixel has a single nearest class.
    assert nearest[0, 5] == 2 and nearest[2, 5] == 3 and nearest[3, 4] == 3 and nearest[3, 3] == 1
    assert (nearest >= 1).all()


def test_glcf_runs_on_the_semantic_track_as_an_extension(tmp_path):
    from tests.synthetic import write_dataset

    root = tmp_path / "data"
    ids = write_dataset("voc", root, num_images=2, seed=4)
    rng = np.random.default_rng(1)
    images = {}
    for image_id in ids:
        h, w = np.array(Image.open(root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg")).shape[:2]
        entries = []
        for _ in range(3):
            mask = np.zeros((h, w), dtype=bool)
            mask[rng.integers(0, h // 2):, rng.integers(0, w // 2):] = True
            entries.append({"rle": encode_mask(mask), "score": 1.0})
        images[image_id] = entries
    proposals = tmp_path / "voc.json"
    write_proposals(proposals, "test", {}, images)
    argv = run_argv("glcf", "voc", tmp_path / "out", "--proposals", proposals, data_root=root,
                    tiny=False) + ["--model", TINY_B32, "--pretrained", "none"]
    code, stdout, stderr = call_cli(argv)
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    assert json.loads(path.read_text())["images"]["seen"] == 2
