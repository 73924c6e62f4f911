"""Mask proposals: the file format, its checks, and SAM proposals end to end on a tiny network.

The tiny SAM is built here from segment_anything.modeling directly (not through
ovseg_bench.methods.proposals.build_sam) and saved as ``Sam.state_dict()``, the layout of the
published checkpoints; loading it through ``build_sam_generator`` and getting the same masks as
SAM's own generator over this network checks the architecture, the strict load and the order.
"""
from __future__ import annotations

import hashlib
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from ovseg_bench.errors import ConfigError, DataError, WeightsError
from ovseg_bench.methods import proposals as props
from ovseg_bench.proposals import ProposalsRequest, precompute_proposals
from tests.referring_synthetic import IMAGES, IMAGES_REFCOCO, write_refer_tree

import segment_anything.modeling as sam_modeling  # the "sam" extra; CI installs it (Makefile)

TINY = props.SamArchitecture(
    "tiny_test", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
    image_size=64, patch_size=8, window_size=4, prompt_embed_dim=32, mask_in_chans=4, decoder_depth=2,
    decoder_mlp_dim=64, decoder_num_heads=2, iou_head_depth=3, iou_head_hidden_dim=32)
# Thresholds and box NMS off so a random network keeps its 3 masks per point (their boxes all span
# the image); a 4 x 4 point grid keeps it fast.
FAST = props.SamSettings(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                         box_nms_thresh=1.0)
FAST_ARGS = {k: getattr(FAST, k) for k in ("points_per_side", "points_per_batch", "pred_iou_thresh",
                                          "stability_score_thresh", "box_nms_thresh")}
# refcoco val: ref 10 (image 581857, two sentences), then ref 5 (image 262145).
VAL_IMAGES = [str(IMAGES_REFCOCO[0].image_id), str(IMAGES_REFCOCO[2].image_id)]


# ----------------------------------------------------------------------------- helpers
def tiny_sam(seed: int = 0) -> torch.nn.Module:
    """TINY's network, written out with segment_anything's modules and build_sam.py's fixed arguments."""
    m = sam_modeling
    torch.manual_seed(seed)
    encoder = m.ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
                                out_chans=32, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                use_rel_pos=True, window_size=4, global_attn_indexes=(1,))
    prompt = m.PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=4)
    decoder = m.MaskDecoder(transformer_dim=32, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32,
                            transformer=m.TwoWayTransformer(depth=2, embedding_dim=32, num_heads=2, mlp_dim=64))
    sam = m.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
                pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    with torch.no_grad():  # rel_pos starts at zero: noise on every tensor so all of them matter
        for tensor in sam.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.05)
    return sam.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(tiny_sam().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory) -> Path:
    from ovseg_bench.datasets.refer import convert_refs

    root = write_refer_tree(tmp_path_factory.mktemp("refer") / "data")
    convert_refs(root, "refcoco", "unc")
    return root


def fast_config(path: Path, **changes: object) -> Path:
    generator = {**FAST_ARGS, **changes}
    lines = ["model_type: vit_b", "generator:"] + [f"  {k}: {v}" for k, v in generator.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def request(tmp_path: Path, refer_root: Path, checkpoint: Path, **changes: object) -> ProposalsRequest:
    fields = dict(source="sam", dataset="refcoco_val", out=tmp_path / "out" / "sam.json", model_type=TINY,
                  checkpoint=checkpoint, data_root=refer_root, config=fast_config(tmp_path / "sam_fast.yaml"),
                  device="cpu", save_every=1, quiet=True)
    return ProposalsRequest(**{**fields, **changes})


def decoded_rgb(root: Path, image_id: int) -> np.ndarray:
    """What the referring track decodes (cv2, EXIF orientation ignored), written out independently."""
    import cv2

    path = root / IMAGES / f"COCO_train2014_{image_id:012d}.jpg"
    bgr = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def sam_reference(image_rgb: np.ndarray, seed: int = 0) -> list[tuple[str, float]]:
    """SAM's own generator over the tiny network built here: (counts, predicted_iou) in its order."""
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(tiny_sam(seed), output_mode="coco_rle", **FAST_ARGS)
    return [(r["segmentation"]["counts"], r["predicted_iou"]) for r in generator.generate(image_rgb)]


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def one_image(entries: list, **top: object) -> dict:
    return {"source": "test", "params": {}, "images": {"7": entries}, **top}


RLE_4x5 = props.encode_mask(np.eye(4, 5, dtype=bool))


# ----------------------------------------------------------------------------- the file format
def test_round_trip_keeps_masks_order_scores_and_records(tmp_path):
    rng = np.random.default_rng(3)
    # Ids in neither text nor numeric order; masks not square (a transposition shows); scores unsorted, tied.
    masks = {"391895": [rng.random((5, 7)) < p for p in (0.2, 0.5, 0.8)],
             "5": [np.zeros((6, 3), bool), np.ones((6, 3), bool)], "12": []}
    masks["5"][0][1, 2] = True
    scores = {"391895": [0.5, 0.9, 0.5], "5": [0.25, 1.0], "12": []}
    images = {i: [{"rle": props.encode_mask(m), "score": s} for m, s in zip(masks[i], scores[i])] for i in masks}
    path = tmp_path / "p.json"
    props.write_proposals(path, "sam", {"points_per_side": 4}, images, extra={"note": "hi", "runs": [{"n": 1}]})

    for i, expected in masks.items():  # pycocotools alone reads what encode_mask wrote
        for entry, mask in zip(images[i], expected):
            rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
            assert np.array_equal(coco_mask.decode(rle).astype(bool), mask)
    loaded = props.ProposalFile(path)
    assert loaded.image_ids() == ["391895", "5", "12"]
    for i, expected in masks.items():
        shape = expected[0].shape if expected else (2, 2)
        got = loaded.masks(i, shape)
        assert got.dtype == torch.bool and got.shape == (len(expected), *shape)
        assert all(torch.equal(g, torch.from_numpy(m)) for g, m in zip(got, expected))
        assert loaded.scores(i) == scores[i]
    record = loaded.record()
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["source"] == "sam" and record["params"] == {"points_per_side": 4}
    assert record["extra"] == {"note": "hi", "runs": [{"n": 1}]}
    assert (record["num_images"], record["num_proposals"], record["path"]) == (3, 5, str(path))


def test_zero_proposals_is_an_empty_tensor(tmp_path):
    loaded = props.ProposalFile(write_json(tmp_path / "p.json", {"source": "s", "params": {}, "images": {"1": []}}))
    masks = loaded.masks("1", (7, 9))
    assert masks.shape == (0, 7, 9) and masks.dtype == torch.bool
    assert loaded.scores("1") == [] and loaded.record()["num_proposals"] == 0


def test_encode_mask_refuses_other_arrays():
    with pytest.raises(DataError, match="bool"):
        props.encode_mask(np.zeros((3, 4), np.uint8))


def test_rle_runs_total_matches_pycocotools():
    rng = np.random.default_rng(0)
    for h, w, p in ((1, 1, 0.5), (300, 41, 0.001), (64, 2000, 0.5), (2000, 1500, 0.0)):
        mask = rng.random((h, w)) < p
        mask[: h // 2, : w // 3] = True  # long runs: multi-character counts, negative differences
        assert props.rle_runs_total(props.encode_mask(mask)["counts"]) == h * w
    assert props.rle_runs_total("5") == 5 and props.rle_runs_total("zzzz") is None


BAD_FILES = [
    ("not json", b"{not json", "not a JSON proposal file (Expecting property name"),
    ("not utf-8", b"\xff\xfe{", "not a JSON proposal file (not UTF-8"),
    ("a list", [1], "expected a JSON object with 'source', 'params' and 'images', found list"),
    ("no source", {"params": {}, "images": {}}, "'source' must be a text naming what made the proposals"),
    ("source not text", {"source": 3, "params": {}, "images": {}}, "'source' must be a text"),
    ("no images", {"source": "s", "params": {}}, "'images' must map image ids to lists of proposals, found nothing"),
    ("images a list", {"source": "s", "params": {}, "images": []}, "'images' must map image ids"),
    ("no params", {"source": "s", "images": {}}, "'params' must be a mapping"),
    ("other format", {"format": "x/2", "source": "s", "params": {}, "images": {}}, "format 'x/2' is not"),
    ("image not a list", {"source": "s", "params": {}, "images": {"7": {}}}, "images['7'] must be a list"),
    ("entry not a mapping", one_image([3]), "images['7'][0] must be a mapping with 'rle' and 'score'"),
    ("no rle", one_image([{"score": 1.0}]), "images['7'][0] has no 'rle'"),
    ("no score", one_image([{"rle": RLE_4x5}]), "images['7'][0] has no 'score'"),
    ("rle not a mapping", one_image([{"rle": "d0", "score": 1.0}]), "[0] has an 'rle' that is not a mapping"),
    ("size of one", one_image([{"rle": {"size": [4], "counts": "x"}, "score": 1}]), "size is not [height, width]"),
    ("size floats", one_image([{"rle": {"size": [4.0, 5], "counts": "x"}, "score": 1}]), "size is not [height"),
    ("counts a list", one_image([{"rle": {"size": [4, 5], "counts": [20]}, "score": 1}]),
     "counts is not a string (COCO compressed RLE), found list"),
    ("score nan", b'{"source": "s", "params": {}, "images": {"7": [{"rle": {"size": [4, 5], "counts": "d0"}, '
                  b'"score": NaN}]}}', "has a score that is not a finite number: nan"),
    ("score text", one_image([{"rle": RLE_4x5, "score": "0.9"}]), "score that is not a finite number: '0.9'"),
]


@pytest.mark.parametrize("content, expected", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_refused_on_opening_in_one_line(tmp_path, content, expected):
    path = tmp_path / "p.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(DataError) as caught:
        props.ProposalFile(path)
    message = str(caught.value)
    assert expected in message and message.startswith(str(path)) and "\n" not in message


BAD_DECODES = [
    ("other size", {"size": [5, 4], "counts": props.encode_mask(np.ones((5, 4), bool))["counts"]},
     "has RLE size [5, 4] but the image is [4, 5] (height, width)"),
    ("garbage counts", {"size": [4, 5], "counts": "zzzz"}, "the RLE counts is not a COCO RLE string"),
    ("short counts", {"size": [4, 5], "counts": "5"}, "the RLE counts covers 5 pixels, expected 4 x 5 = 20"),
]


@pytest.mark.parametrize("rle, expected", [c[1:] for c in BAD_DECODES], ids=[c[0] for c in BAD_DECODES])
def test_bad_masks_are_refused_on_decoding_in_one_line(tmp_path, rle, expected):
    loaded = props.ProposalFile(write_json(tmp_path / "p.json", one_image([{"rle": RLE_4x5, "score": 1},
                                                                            {"rle": rle, "score": 0.5}])))
    with pytest.raises(DataError) as caught:
        loaded.masks("7", (4, 5))
    assert expected in str(caught.value) and "images['7'][1]" in str(caught.value) and "\n" not in str(caught.value)


def test_an_absent_image_is_refused_naming_it(tmp_path):
    loaded = props.ProposalFile(write_json(tmp_path / "p.json", one_image([])))
    with pytest.raises(DataError, match=r"no proposals for image 8; the file must cover every image of the split"):
        loaded.masks("8", (4, 5))
    with pytest.raises(DataError, match=r"no proposals for 2 of 3 images of refcoco_val \(first: 8, 9\)"):
        loaded.require(["7", "8", "9"], dataset="refcoco_val")
    loaded.require(["7"], dataset="refcoco_val")


def test_missing_file_and_writer_checks(tmp_path):
    with pytest.raises(DataError, match="proposal file not found"):
        props.ProposalFile(tmp_path / "absent.json")
    with pytest.raises(DataError, match="not a finite number"):
        props.write_proposals(tmp_path / "w.json", "s", {}, {"1": [{"rle": RLE_4x5, "score": float("inf")}]})
    with pytest.raises(DataError, match="would replace the format's own keys"):
        props.write_proposals(tmp_path / "w.json", "s", {}, {}, extra={"images": {}})
    assert not (tmp_path / "w.json").exists()


# ----------------------------------------------------------------------------- SAM
def test_sam_missing_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    with pytest.raises(ConfigError) as caught:
        props.require_sam()
    assert str(caught.value) == ("SAM mask proposals need the 'sam' extra: pip install 'ovseg-bench[sam]' "
                                 "(segment-anything, Meta's Segment Anything package)")
    with pytest.raises(ConfigError, match="the 'sam' extra"):  # before any data or weights are looked at
        precompute_proposals(ProposalsRequest("sam", "refcoco_val", tmp_path / "o.json",
                                              data_root=tmp_path / "nowhere"))


def test_published_architectures_and_urls():
    urls = {name: arch.url for name, arch in props.SAM_ARCHITECTURES.items()}
    assert urls == {"vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
                    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"}
    from segment_anything import sam_model_registry

    built = sam_model_registry["vit_b"]()  # SAM's own builder, random weights: names and shapes must agree
    ours = props.build_sam(props.SAM_ARCHITECTURES["vit_b"])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    with pytest.raises(ConfigError, match="unknown SAM model type 'vit_x'. Did you mean"):
        props.sam_architecture("vit_x")


def test_shipped_config_holds_sams_defaults():
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    config = props.load_sam_config()
    defaults = {name: p.default for name, p in inspect.signature(SamAutomaticMaskGenerator).parameters.items()
                if name in {f for f in props.SamSettings.__dataclass_fields__}}
    assert vars(config.generator) == defaults and len(defaults) == len(props.SamSettings.__dataclass_fields__)
    assert config.model_type == "vit_h"


class StubGenerator:
    """A mask generator answering fixed records, in an order that is not sorted by score."""

    def __init__(self, segmentations: list, ious: list[float]):
        self.records = [{"segmentation": s, "predicted_iou": v, "stability_score": 1.0}
                        for s, v in zip(segmentations, ious)]

    def generate(self, image: np.ndarray) -> list[dict]:
        return self.records


def test_sam_proposals_keep_the_generators_order():
    masks = [np.zeros((4, 5), bool), np.eye(4, 5, dtype=bool), np.ones((4, 5), bool)]
    ious = [0.2, 0.9, 0.5]
    image = np.zeros((4, 5, 3), np.uint8)
    binary = props.sam_proposals(StubGenerator(masks, ious), image)
    coco = props.sam_proposals(StubGenerator([props.encode_mask(m) for m in masks], ious), image)
    assert binary == coco == [{"rle": props.encode_mask(m), "score": v} for m, v in zip(masks, ious)]
    with pytest.raises(DataError, match=r"uint8 RGB image"):
        props.sam_proposals(StubGenerator([], []), np.zeros((4, 5), np.uint8))


def test_tiny_sam_loads_strictly_and_keeps_sams_order(checkpoint, refer_root):
    state = torch.load(checkpoint, weights_only=True)
    assert {"image_encoder.patch_embed.proj.weight", "image_encoder.blocks.1.attn.rel_pos_h",
            "image_encoder.neck.0.weight", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
            "mask_decoder.iou_prediction_head.layers.2.weight"} <= set(state)  # the published layout
    generator, weights = props.build_sam_generator(TINY, checkpoint, FAST, torch.device("cpu"))
    assert weights.url is None and weights.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    image = decoded_rgb(refer_root, IMAGES_REFCOCO[0].image_id)
    got = props.sam_proposals(generator, image)
    expected = sam_reference(image)
    assert len(expected) > 3 and [(p["rle"]["counts"], p["score"]) for p in got] == expected
    assert all(p["rle"]["size"] == list(image.shape[:2]) for p in got)


def test_a_checkpoint_of_another_shape_is_refused_listing_keys(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    del state["image_encoder.neck.0.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(1)
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(WeightsError) as caught:
        props.build_sam_generator(TINY, wrong, FAST, torch.device("cpu"))
    message = str(caught.value)
    assert "missing (1): image_encoder.neck.0.weight" in message and "unexpected (1): mask_decoder.extra.weight" \
        in message and message.startswith(str(wrong)) and "\n" not in message
    with pytest.raises(WeightsError, match="mis-shaped"):  # a tiny file for vit_b: every shape differs
        props.load_sam(props.SamWeights(props.SAM_ARCHITECTURES["vit_b"], checkpoint, "x", None),
                       torch.device("cpu"))


# ----------------------------------------------------------------------------- the command
def test_precompute_end_to_end_and_resume(tmp_path, refer_root, checkpoint, monkeypatch):
    full = request(tmp_path, refer_root, checkpoint)
    summary = precompute_proposals(full)
    assert (summary.images, summary.computed, summary.reused, summary.file_images) == (2, 2, 0, 2)
    done = props.ProposalFile(full.out)
    assert done.image_ids() == VAL_IMAGES and done.source == "sam"
    assert done.params["model_type"] == "tiny_test" and done.params["generator"]["points_per_side"] == 4
    assert done.params["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert "EXIF orientation ignored" in done.params["image_decoding"]
    assert [r["images_computed"] for r in done.extra["runs"]] == [2]
    for im in (IMAGES_REFCOCO[0], IMAGES_REFCOCO[2]):
        expected = sam_reference(decoded_rgb(refer_root, im.image_id))
        entries = done.entries(str(im.image_id))
        assert [(e["rle"]["counts"], e["score"]) for e in entries] == expected
        assert done.masks(str(im.image_id), (im.height, im.width)).shape == (len(expected), im.height, im.width)

    # An interrupted run: the first image is saved, the second not; a rerun computes only the second.
    calls = []

    def interrupted(generator, image):
        calls.append(image.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(generator, image)

    real = props.sam_proposals
    monkeypatch.setattr(props, "sam_proposals", interrupted)
    partial_out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        precompute_proposals(request(tmp_path, refer_root, checkpoint, out=partial_out, save_every=5))
    assert props.ProposalFile(partial_out).image_ids() == VAL_IMAGES[:1]
    monkeypatch.setattr(props, "sam_proposals", real)

    # A partial file written by hand, its first image changed: kept as it is, not recomputed.
    kept = [done.entries(VAL_IMAGES[0])[-1]]
    props.write_proposals(partial_out, "sam", done.params, {VAL_IMAGES[0]: kept}, extra=done.extra)
    resumed = precompute_proposals(request(tmp_path, refer_root, checkpoint, out=partial_out))
    assert (resumed.computed, resumed.reused, resumed.file_images) == (1, 1, 2)
    again = props.ProposalFile(partial_out)
    assert again.image_ids() == VAL_IMAGES and again.entries(VAL_IMAGES[0]) == kept
    assert again.entries(VAL_IMAGES[1]) == done.entries(VAL_IMAGES[1])
    assert [r["images_computed"] for r in again.extra["runs"]] == [2, 1]
    before = partial_out.read_bytes()
    assert precompute_proposals(request(tmp_path, refer_root, checkpoint, out=partial_out)).computed == 0
    assert partial_out.read_bytes() == before


def test_precompute_refuses_a_file_of_other_params_or_source(tmp_path, refer_root, checkpoint):
    first = request(tmp_path, refer_root, checkpoint)
    precompute_proposals(first)
    other = request(tmp_path, refer_root, checkpoint, config=fast_config(tmp_path / "two.yaml", points_per_side=2))
    with pytest.raises(DataError, match=r"made with other sam params \(generator.points_per_side \(file 4, now 2\)\)"):
        precompute_proposals(other)
    foreign = tmp_path / "freesolo.json"
    props.write_proposals(foreign, "freesolo", {}, {})
    with pytest.raises(DataError, match="holds 'freesolo' proposals, not 'sam'; pass another --out"):
        precompute_proposals(request(tmp_path, refer_root, checkpoint, out=foreign))
    with pytest.raises(ConfigError, match="--source 'freesolo' is not one of sam"):
        precompute_proposals(request(tmp_path, refer_root, checkpoint, source="freesolo"))


def test_precompute_on_a_semantic_card(tmp_path, checkpoint):
    from ovseg_bench.datasets.cards import load_card
    from ovseg_bench.datasets.listing import list_samples

    req = request(tmp_path, tmp_path / "unused", checkpoint, dataset="demo")
    summary = precompute_proposals(req)
    samples = list_samples(load_card("demo"), tmp_path / "unused")
    loaded = props.ProposalFile(req.out)
    assert loaded.image_ids() == [s.image_id for s in samples] and summary.computed == len(samples)
    assert "EXIF orientation applied" in loaded.params["image_decoding"]
    from PIL import Image

    width, height = Image.open(samples[0].image_path).size
    assert loaded.masks(samples[0].image_id, (height, width)).shape[1:] == (height, width)
