"""Per-dataset fingerprints (result schema v2), v1 files read as v2, `--protocol native`, and
presets with a resize followed by a centre crop."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.listing import SampleRef
from ovseg_bench.datasets.loader import SplitDataset
from ovseg_bench.engine.protocol import ProtocolPreset, fingerprint, load_protocol
from ovseg_bench.imaging import center_crop_box, short_side_size
from ovseg_bench.results import SCHEMA, SCHEMA_V1, read_result
from tests.conftest import call_cli, result_jsons, run_argv

METRIC = "mmseg-iou/int64"


def fp(preset: ProtocolPreset, dataset: str) -> str:
    return fingerprint(preset.settings_for(dataset), metric=METRIC, precision="fp32", limit=None)


def test_an_override_for_one_dataset_leaves_the_others_fingerprints_alone():
    tcl = load_protocol("tcl")
    overridden = dataclasses.replace(tcl, datasets={**tcl.datasets, "voc": {"short_side": 512}})
    assert fp(overridden, "voc") != fp(tcl, "voc")
    for other in ("voc20", "context", "ade20k", "cityscapes"):
        assert fp(overridden, other) == fp(tcl, other)


def test_the_metric_and_the_precision_are_in_the_fingerprint():
    settings = load_protocol("tcl").settings_for("voc")
    base = fingerprint(settings, metric=METRIC, precision="fp32", limit=None)
    assert fingerprint(settings, metric="referring-iou", precision="fp32", limit=None) != base
    assert fingerprint(settings, metric=METRIC, precision="bf16", limit=None) != base


def test_fields_at_their_defaults_do_not_move_fingerprints():
    settings = load_protocol("tcl").settings_for("voc")
    assert "center_crop" not in settings.fingerprint_fields() and "resize" not in settings.fingerprint_fields()
    cropped = dataclasses.replace(settings, resize="short_side", center_crop=320)
    assert fingerprint(cropped, metric=METRIC, precision="fp32", limit=None) != \
        fingerprint(settings, metric=METRIC, precision="fp32", limit=None)


@pytest.fixture(scope="module")
def sclip_runs(synthetic_tree, tmp_path_factory):
    root, _ = synthetic_tree
    out = {}
    for protocol in ("sclip", "native"):
        folder = tmp_path_factory.mktemp(protocol)
        code, _, stderr = call_cli(run_argv("sclip", "voc", folder, "--protocol", protocol, data_root=root))
        assert code == 0, stderr
        (path,) = result_jsons(folder)
        out[protocol] = (path, json.loads(path.read_text()))
    return out


def test_native_resolves_to_the_methods_own_preset_and_compares_equal(sclip_runs):
    (plain_path, plain), (native_path, native) = sclip_runs["sclip"], sclip_runs["native"]
    assert native["schema"] == SCHEMA
    assert native["protocol"]["requested"] == "native" and native["protocol"]["preset"] == "sclip"
    assert plain["protocol"]["requested"] == "sclip"
    assert native["protocol"]["fingerprint"] == plain["protocol"]["fingerprint"]
    assert native_path.name == plain_path.name
    assert native["counts"] == plain["counts"]


def test_native_without_a_shipped_preset_is_refused(synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    code, _, stderr = call_cli(run_argv("clearclip", "voc", tmp_path, "--protocol", "native", data_root=root))
    assert code == 2 and "no native preset" in stderr and stderr.count("\n") == 1


def test_a_v1_file_reads_as_v2_with_its_fingerprint_recomputed(sclip_runs, tmp_path):
    path, result = sclip_runs["sclip"]
    v1 = json.loads(json.dumps(result))
    v1["schema"] = SCHEMA_V1
    v1["protocol"]["fingerprint"] = "0" * 64  # v1 hashed the whole preset: another value
    del v1["protocol"]["requested"]
    old = tmp_path / path.name
    old.write_text(json.dumps(v1))
    upgraded = read_result(old)
    assert upgraded["schema"] == SCHEMA
    assert upgraded["protocol"]["fingerprint"] == result["protocol"]["fingerprint"]
    assert upgraded["protocol"]["fingerprint_v1"] == "0" * 64 and upgraded["protocol"]["requested"] == "sclip"


# ----------------------------------------------------------------------------- centre crop

def test_short_side_resize_truncates_and_the_crop_rounds_half_to_even():
    assert short_side_size(532, 400, 320) == (425, 320)
    assert center_crop_box(320, 425, 320) == (0, 52)  # (425 - 320) / 2 = 52.5 -> 52
    assert center_crop_box(427, 320, 320) == (54, 0)  # 53.5 -> 54


def test_a_centre_crop_preset_gives_image_and_gt_the_same_geometry(tmp_path):
    card = load_card("voc")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(400, 532, 3), dtype=np.uint8)
    gt = rng.integers(0, 21, size=(400, 532), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(gt, mode="L").save(tmp_path / "a_gt.png")
    settings = dataclasses.replace(load_protocol("tcl").settings_for("voc"), short_side=320, resize="short_side",
                                   center_crop=320, mode="whole")
    sample = SplitDataset(card, [SampleRef("a", tmp_path / "a.png", tmp_path / "a_gt.png")], settings)[0]
    assert sample.error is None
    assert tuple(sample.image.shape) == (3, 320, 320) and tuple(sample.gt.shape) == (320, 320)
    # Independent: PIL nearest to 425x320, then columns 52..371.
    want = np.array(Image.fromarray(gt).resize((425, 320), Image.NEAREST))[:, 52:372]
    assert torch.equal(sample.gt, torch.from_numpy(want))
    import cv2

    bgr = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_COLOR)
    rgb = cv2.resize(bgr, (425, 320), interpolation=cv2.INTER_LINEAR)[:, 52:372, ::-1]
    assert torch.equal(sample.image, torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))


@pytest.mark.parametrize("dataset,resample", [("coco_stuff", Image.NEAREST), ("context", Image.BILINEAR)])
def test_recos_preset_resizes_with_pillow_then_crops(tmp_path, dataset, resample):
    """ReCo's evaluation input, computed independently: PIL RGB, Resize(320) with the dataset's
    filter (short side 320, long side truncated), centre crop 320 (NoelShin/reco@5c5e1bc)."""
    card = load_card(dataset)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(400, 533, 3), dtype=np.uint8)
    gt = rng.integers(0, 20, size=(400, 533), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(gt, mode="L").save(tmp_path / "a_gt.png")
    settings = load_protocol("reco").settings_for(dataset)
    sample = SplitDataset(card, [SampleRef("a", tmp_path / "a.png", tmp_path / "a_gt.png")], settings)[0]
    assert sample.error is None
    width = int(320 * 533 / 400)  # 426
    left = int(round((width - 320) / 2.0))  # 53
    rgb = np.array(Image.open(tmp_path / "a.png").convert("RGB").resize((width, 320), resample))[:, left:left + 320]
    assert torch.equal(sample.image, torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))
    assert tuple(sample.gt.shape) == (320, 320)


def test_reco_nocrf_native_is_recos_preset():
    from ovseg_bench.engine.protocol import resolve_protocol
    from ovseg_bench.registry import get_method

    assert resolve_protocol("native", get_method("reco_nocrf")) == "reco"
