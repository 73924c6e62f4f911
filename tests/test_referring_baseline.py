"""The CLIP family on the referring track: this harness's dense baseline (tracks/referring.py
``DenseReferringScorer``), checked against the semantic path run independently per expression."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.refer import convert_refs, gt_mask, read_referring
from ovseg_bench.methods.base import WeightsOptions
from ovseg_bench.registry import get_method
from tests.conftest import TINY_MODEL, call_cli, result_jsons, run_argv
from tests.referring_synthetic import write_refer_tree

METHODS = ("clip", "maskclip", "sclip", "clearclip", "naclip")


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_refer_tree(root)
    convert_refs(root, "refcoco", "unc")
    return root


def independent_iou_rows(method_name: str, root: Path) -> list[tuple[int, int]]:
    """Per sample (I, U): the semantic path (``segment_image``: forward_windows, stitch, the
    method's background rule) on the 2-class vocabulary [SCLIP's background words, expression]."""
    from PIL import Image

    from ovseg_bench.engine.protocol import load_protocol
    from ovseg_bench.tracks.semantic import segment_image

    card = load_card("refcoco_val")
    method = get_method(method_name)(WeightsOptions(model=TINY_MODEL, pretrained="none"), torch.device("cpu"))
    settings = load_protocol("tcl").settings_for(card.name)
    background = load_card("voc").class_synonyms("sclip")[0]
    refs, index = read_referring(card, root)
    rows = []
    for ref in refs:
        info = index.image(ref.image_id)
        rgb = np.array(Image.open(card.images_in(root) / info.file_name).convert("RGB"))
        labels = segment_image(method, np.ascontiguousarray(rgb[..., ::-1]), [background, [ref.text]], settings,
                               torch.device("cpu"), background_class=True).numpy()
        gt = gt_mask(index, ref.ann_id, info.height, info.width, card.gt_rule)
        pred = labels == 1
        rows.append((int((pred & gt).sum()), int((pred | gt).sum())))
    return rows


@pytest.mark.parametrize("method", METHODS)
def test_every_clip_family_method_runs_and_matches_the_semantic_path(method, refer_root, tmp_path):
    code, stdout, stderr = call_cli(run_argv(method, "refcoco_val", tmp_path / "out", data_root=refer_root))
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    result = json.loads(path.read_text())
    rows = independent_iou_rows(method, refer_root)
    inter, union = np.array(rows).sum(0)
    assert result["counts"]["intersect"] == [int(inter)] and result["counts"]["union"] == [int(union)]
    ious = [i / u if u else 0.0 for i, u in rows]
    assert result["metrics"]["mIoU"] == pytest.approx(100 * np.mean(ious), abs=1e-9)
    assert "not a published protocol" in load_card("refcoco_val").notes


def test_saved_referring_masks_score_the_same_through_predictions(refer_root, tmp_path):
    code, _, stderr = call_cli(run_argv("sclip", "refcoco_val", tmp_path / "out", "--save-predictions",
                                        data_root=refer_root))
    assert code == 0, stderr
    folder = tmp_path / "out" / "predictions" / "sclip" / "refcoco_val"
    saved = sorted(p.name for p in folder.glob("*.png"))
    refs, _ = read_referring(load_card("refcoco_val"), refer_root)
    assert saved == sorted(f"{r.sample_id}.png" for r in refs)
    from PIL import Image

    assert set(np.unique(np.array(Image.open(folder / saved[0]))).tolist()) <= {0, 255}
    code, _, stderr = call_cli(["run", "--method", "predictions", "--dataset", "refcoco_val", "--predictions", folder,
                                "--data-root", refer_root, "--output", tmp_path / "again", "--workers", "0", "--quiet",
                                "--device", "cpu"])
    assert code == 0, stderr
    (a,), (b,) = result_jsons(tmp_path / "out"), result_jsons(tmp_path / "again")
    assert json.loads(a.read_text())["counts"] == json.loads(b.read_text())["counts"]


def test_visualize_stays_on_the_semantic_track(refer_root, tmp_path):
    code, _, stderr = call_cli(run_argv("clip", "refcoco_val", tmp_path / "out", "--visualize", "2",
                                        data_root=refer_root))
    assert code == 2 and "--visualize" in stderr and len(stderr.strip().splitlines()) == 1


def test_windows_are_counted_once_per_image_not_per_expression(refer_root, tmp_path):
    code, _, stderr = call_cli(run_argv("clip", "refcoco_val", tmp_path / "out", data_root=refer_root))
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    result = json.loads(path.read_text())
    refs, _ = read_referring(load_card("refcoco_val"), refer_root)
    images = len({r.image_id for r in refs})
    assert images < len(refs)  # some image has several expressions, so the two counts differ
    from ovseg_bench.engine.protocol import load_protocol
    from ovseg_bench.engine.sliding import image_windows
    from ovseg_bench.imaging import model_input, decode_image

    s = load_protocol("tcl").settings_for("refcoco_val")
    expected = 0
    for image_id in dict.fromkeys(r.image_id for r in refs):
        path = next(r.image_path for r in refs if r.image_id == image_id)
        h, w = model_input(decode_image(path), s.short_side, s.long_side, rule=s.resize).shape[-2:]
        expected += len(image_windows(h, w, s.mode, s.crop, s.stride))
    assert result["images"]["windows"] == expected
