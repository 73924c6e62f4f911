"""Bad input stops ``ovseg-bench run`` with one ``error:`` line naming the file, exit 2, no result file.

Each test builds its own small tree (the shared one is read only), breaks one thing and checks:
the exit code, that stderr names the file (or the name) at fault, that it says what is wrong,
that no traceback leaked, and that no result JSON or sidecar was written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.listing import list_samples
from ovseg_bench.imaging import NORMALISATIONS
from ovseg_bench.methods import clip_dense
from ovseg_bench.methods.base import DatasetInfo, Vocabulary, WindowMethod
from ovseg_bench.registry import METHODS, get_method, register_method
from tests.conftest import TINY_MODEL, call_cli, read_gt, result_jsons, run_argv
from tests.synthetic import write_dataset

NAN_METHOD, INF_METHOD, REFERRING_METHOD = "test-bad-input-nan", "test-bad-input-inf", "test-bad-input-referring"


# ----------------------------------------------------------------------------- test methods

class _ConstantScores(WindowMethod):
    """Scores 0 everywhere except one pixel per window set to ``fill``; no model."""

    fill = 0.0
    normalisation = NORMALISATIONS["clip"]

    def __init__(self, weights, device, config_path=None, inputs=None):
        self.device = device

    def encode_classes(self, classes: list[list[str]], info: DatasetInfo) -> Vocabulary:
        n = len(classes)
        return Vocabulary(torch.eye(n, device=self.device), torch.arange(n, device=self.device), n)

    def forward_windows(self, windows: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
        scores = windows.new_zeros((windows.shape[0], vocab.embeddings.shape[0], *windows.shape[-2:]))
        scores[:, :, 3, 5] = self.fill
        return scores

    def postprocess(self, scores, image, vocab, info) -> torch.Tensor:
        return scores.argmax(dim=0)


class _NanScores(_ConstantScores):
    name = NAN_METHOD
    fill = math.nan


class _InfScores(_ConstantScores):
    name = INF_METHOD
    fill = math.inf


class _ReferringOnly(_ConstantScores):
    name = REFERRING_METHOD
    tracks = ("referring",)

    def __init__(self, weights, device, config_path=None, inputs=None):  # pragma: no cover - must never be built
        raise AssertionError("a method that cannot serve the track must be refused before it is built")


def _register_once(name: str, cls: type) -> None:
    get_method("clip")  # load the built-in methods first, as the CLI does
    if name not in METHODS.module_dict:
        register_method(name)(cls)


for _name, _cls in ((NAN_METHOD, _NanScores), (INF_METHOD, _InfScores), (REFERRING_METHOD, _ReferringOnly)):
    _register_once(_name, _cls)


# ----------------------------------------------------------------------------- helpers

def expect_user_error(argv: list[str], out: Path, *fragments: str) -> str:
    """Run the CLI; assert exit 2, one ``error:`` line holding every fragment, no result written."""
    try:
        code, _, stderr = call_cli(argv)
    except Exception as exc:  # what a user would see as a traceback
        pytest.fail(f"uncaught {type(exc).__name__} instead of an 'error:' line and exit 2: {exc}"[:800])
    assert code == 2, f"exit {code}: {stderr}"
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in {stderr!r}"
    assert result_jsons(out) == []
    assert not (Path(out).is_dir() and list(Path(out).glob("*.npz")))
    return stderr


@pytest.fixture
def voc(tmp_path):
    """A private voc tree with three images: (data root, ids, samples, output folder)."""
    root = tmp_path / "data"
    ids = write_dataset("voc", root, num_images=3, seed=2)
    return root, ids, list_samples(load_card("voc"), root), tmp_path / "runs"


def maskclip(dataset: str, root: Path, out: Path, *extra: object) -> list[str]:
    return run_argv("maskclip", dataset, out, *extra, data_root=root)


def zero_predictions(root: Path, dataset: str, folder: Path) -> Path:
    """An all-zero prediction PNG of the GT's size for every image (model-free runs)."""
    for sample in list_samples(load_card(dataset), root):
        target = folder / f"{sample.image_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros(np.array(Image.open(sample.gt_path)).shape[:2], dtype=np.uint8)).save(target)
    return folder


# ----------------------------------------------------------------------------- layout

def test_missing_data_root(tmp_path):
    gone, out = tmp_path / "nowhere", tmp_path / "runs"
    expect_user_error(maskclip("voc", gone, out), out, str(gone), "data root", "does not exist", "--data-root",
                      "$OVSEG_DATA", "./data")


def test_missing_split_file(voc):
    root, _, _, out = voc
    split = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.unlink()
    expect_user_error(maskclip("voc", root, out), out, str(split), "split file", "not found")


def test_missing_dataset_folder(voc):
    root, _, _, out = voc
    expect_user_error(maskclip("ade20k", root, out), out, f"ade20k (expected {root / 'ade' / 'ADEChallengeData2016'})",
                      "datasets not found", "data prepare ade20k")


def test_missing_folder_of_a_later_dataset_writes_no_result(voc):
    """README: bad input -> no result file. A missing layout is known before any evaluation, so a
    plan over several datasets must not write the first dataset's result and then stop."""
    root, _, _, out = voc
    expect_user_error(maskclip("voc,ade20k", root, out), out, "ade20k", str(root / "ade" / "ADEChallengeData2016"))


def test_empty_split_file_names_the_file(voc):
    root, _, _, out = voc
    split = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text("\n")
    expect_user_error(maskclip("voc", root, out), out, str(split))


# ----------------------------------------------------------------------------- images

CORRUPTIONS = {
    "garbage": lambda data: b"this is not a JPEG" * 4,
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_image(voc, kind):
    root, _, samples, out = voc
    bad = samples[1].image_path
    bad.write_bytes(CORRUPTIONS[kind](bad.read_bytes()))
    expect_user_error(maskclip("voc", root, out), out, str(bad), "not a decodable image", "--on-error skip")


def test_missing_image(voc):
    root, _, samples, out = voc
    gone = samples[2].image_path
    gone.unlink()
    expect_user_error(maskclip("voc", root, out), out, str(gone), "image is missing")


# ----------------------------------------------------------------------------- ground truth

def test_missing_gt(voc):
    root, _, samples, out = voc
    gone = samples[0].gt_path
    gone.unlink()
    expect_user_error(maskclip("voc", root, out), out, str(gone), "ground truth missing")


def test_gt_size_differs_from_image(voc):
    root, _, samples, out = voc
    bad = samples[1].gt_path
    gt = np.array(Image.open(bad))
    h, w = gt.shape
    Image.fromarray(np.zeros((h, w + 3), dtype=np.uint8)).save(bad)
    expect_user_error(maskclip("voc", root, out), out, str(bad), f"{w + 3}x{h}", f"{w}x{h}", "ground truth is")


def test_unreadable_gt(voc):
    root, _, samples, out = voc
    bad = samples[0].gt_path
    bad.write_bytes(b"not a png at all")
    expect_user_error(maskclip("voc", root, out), out, str(bad), "not a readable PNG")


def test_rgb_gt(voc):
    root, _, samples, out = voc
    bad = samples[0].gt_path
    gt = np.array(Image.open(bad))
    Image.fromarray(np.stack([gt] * 3, axis=-1)).save(bad)
    expect_user_error(maskclip("voc", root, out), out, str(bad), "single-channel")


# dataset -> a raw value beyond its range (255 is the ignore value and allowed everywhere)
OUT_OF_RANGE = {"voc": (30, "0..20"), "ade20k": (151, "0..150"), "cityscapes": (19, "0..18"),
                "coco_object": (81, "0..80")}


@pytest.mark.parametrize("dataset", sorted(OUT_OF_RANGE))
def test_gt_label_values_outside_the_class_range(tmp_path, dataset):
    root, out = tmp_path / "data", tmp_path / "runs"
    write_dataset(dataset, root, num_images=2, seed=4)
    preds = zero_predictions(root, dataset, tmp_path / "preds")
    bad = list_samples(load_card(dataset), root)[-1].gt_path
    gt = np.array(Image.open(bad))
    value, span = OUT_OF_RANGE[dataset]
    gt[:2, :2] = value
    Image.fromarray(gt).save(bad)  # L mode: the palette of VOC does not matter to the loader
    expect_user_error(run_argv("predictions", dataset, out, "--predictions", preds, data_root=root, tiny=False),
                      out, str(bad), f"[{value}]", span, dataset)


def test_gt_value_255_is_not_out_of_range(tmp_path):
    """255 is the ignore value: allowed even where the card says the GT has no ignore pixels."""
    root, out, preds = tmp_path / "data", tmp_path / "runs", tmp_path / "preds"
    write_dataset("ade20k", root, num_images=2, seed=4)
    samples = list_samples(load_card("ade20k"), root)
    gt = np.array(Image.open(samples[0].gt_path))
    gt[:3, :3] = 255
    Image.fromarray(gt).save(samples[0].gt_path)
    zero_predictions(root, "ade20k", preds)
    code, _, stderr = call_cli(run_argv("predictions", "ade20k", out, "--predictions", preds, data_root=root, tiny=False))
    assert code == 0, stderr
    result = json.loads(result_jsons(out)[0].read_text())
    valid = sum(int((read_gt(s.gt_path, True) != 255).sum()) for s in samples)
    assert sum(result["counts"]["label"]) == valid


# ----------------------------------------------------------------------------- names and options

@pytest.mark.parametrize("flag,wrong,suggested,kind", [
    ("--method", "maskclp", "maskclip", "method"),
    ("--dataset", "vco", "voc", "dataset"),
    ("--dataset", "ade20", "ade20k", "dataset"),
    ("--protocol", "sclp", "sclip", "protocol"),
])
def test_unknown_names_suggest_close_ones(voc, flag, wrong, suggested, kind):
    root, _, _, out = voc
    argv = maskclip("voc", root, out)
    at = argv.index(flag) if flag in argv else None
    if at is None:
        argv += [flag, wrong]
    else:
        argv[at + 1] = wrong
    stderr = expect_user_error(argv, out, f"unknown {kind} '{wrong}'", "Did you mean", suggested)
    assert stderr.index("Did you mean") < stderr.index(suggested)


def test_unknown_dataset_fails_before_any_work(voc):
    """The card names are checked before the first dataset is evaluated."""
    root, _, _, out = voc
    expect_user_error(maskclip("voc,cocostuff", root, out), out, "unknown dataset 'cocostuff'", "coco_stuff")


def test_unknown_open_clip_model_name(voc):
    root, _, _, out = voc
    argv = run_argv("maskclip", "voc", out, "--model", "ViT-B-61", "--pretrained", "none", data_root=root, tiny=False)
    expect_user_error(argv, out, "unknown open_clip model 'ViT-B-61'", "ViT-B-16")


def test_missing_model_config_file(voc, tmp_path):
    root, _, _, out = voc
    gone = tmp_path / "no_model.json"
    argv = run_argv("maskclip", "voc", out, "--model", gone, "--pretrained", "none", data_root=root, tiny=False)
    expect_user_error(argv, out, str(gone), "not found")


def test_missing_method_config_file(voc, tmp_path):
    root, _, _, out = voc
    gone = tmp_path / "no_config.yaml"
    expect_user_error(maskclip("voc", root, out, "--config", gone), out, str(gone), "not found")


def test_track_mismatch(voc):
    root, _, _, out = voc
    argv = run_argv(REFERRING_METHOD, "voc", out, data_root=root, tiny=False)
    expect_user_error(argv, out, REFERRING_METHOD, "referring", "'voc'", "semantic")


def test_fp16_on_cpu_is_refused(voc):
    root, _, _, out = voc
    expect_user_error(maskclip("voc", root, out, "--precision", "fp16"), out, "fp16", "CUDA", "fp32")


def test_unknown_precision(voc):
    root, _, _, out = voc
    expect_user_error(maskclip("voc", root, out, "--precision", "fp8"), out, "--precision 'fp8'", "fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device(voc):
    root, _, _, out = voc
    argv = [a if a != "cpu" else "cuda" for a in maskclip("voc", root, out)]
    expect_user_error(argv, out, "--device cuda", "no CUDA device")


@pytest.mark.parametrize("option,value", [("--limit", "0"), ("--batch-size", "0"), ("--workers", "-1")])
def test_out_of_range_numbers(voc, option, value):
    root, _, _, out = voc
    argv = maskclip("voc", root, out)
    if option in argv:
        at = argv.index(option)
        del argv[at:at + 2]
    expect_user_error(argv + [option, value], out, option)


def test_output_path_that_is_a_file(voc, tmp_path):
    root, _, _, out = voc
    taken = tmp_path / "results.txt"
    taken.write_text("not a folder")
    expect_user_error(maskclip("voc", root, taken), out, str(taken))
    assert taken.read_text() == "not a folder"


def test_pretrained_tag_that_does_not_exist(voc):
    root, _, _, out = voc
    argv = run_argv("maskclip", "voc", out, "--model", TINY_MODEL, "--pretrained", "no_such_tag",
                    data_root=root, tiny=False)
    expect_user_error(argv, out, "'no_such_tag'", "neither a file nor an open_clip pretrained tag", "--pretrained none")


def test_pretrained_tag_of_a_known_model_lists_its_tags(voc):
    root, _, _, out = voc
    argv = run_argv("maskclip", "voc", out, "--model", "ViT-B-16", "--pretrained", "opnai", data_root=root, tiny=False)
    expect_user_error(argv, out, "'opnai'", "openai")


@pytest.mark.parametrize("suffix,content", [(".bin", b"definitely not a checkpoint" * 8), (".bin", b""),
                                            (".safetensors", b"definitely not a checkpoint" * 8)],
                         ids=["garbage-bin", "empty-bin", "garbage-safetensors"])
def test_corrupt_weights_file(voc, tmp_path, suffix, content):
    """A damaged weights file is bad input like any other: an error line naming it, not a traceback."""
    root, _, _, out = voc
    weights = tmp_path / f"open_clip_model{suffix}"
    weights.write_bytes(content)
    argv = run_argv("maskclip", "voc", out, "--model", TINY_MODEL, "--pretrained", weights, data_root=root, tiny=False)
    expect_user_error(argv, out, str(weights))


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("method", [NAN_METHOD, INF_METHOD])
def test_non_finite_scores(voc, method):
    root, ids, _, out = voc
    argv = run_argv(method, "voc", out, "--batch-size", "1", data_root=root, tiny=False)
    stderr = expect_user_error(argv, out, method, "NaN/inf", ids[0])
    assert ids[1] not in stderr  # batch size 1: only the first image's window was run


def test_nan_from_a_clip_family_model(voc, monkeypatch):
    root, ids, _, out = voc
    real = clip_dense.mmseg_vit_features  # maskclip's backbone path

    def poisoned(*args, **kwargs):
        feats, grid = real(*args, **kwargs)
        return torch.full_like(feats, math.nan), grid

    monkeypatch.setattr(clip_dense, "mmseg_vit_features", poisoned)
    expect_user_error(maskclip("voc", root, out), out, "maskclip", "NaN", ids[0])


# ----------------------------------------------------------------------------- --on-error skip

@pytest.mark.parametrize("problem", ["corrupt", "missing"])
def test_on_error_skip_lists_the_skipped_image(voc, problem):
    root, ids, samples, out = voc
    bad = samples[1]
    if problem == "corrupt":
        bad.image_path.write_bytes(b"\x00" * 64)
    else:
        bad.image_path.unlink()
    code, stdout, stderr = call_cli(maskclip("voc", root, out, "--on-error", "skip"))
    assert code == 0, stderr
    files = result_jsons(out)
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    images = result["images"]
    assert images["seen"] == images["listed"] - 1 == 2
    assert [s["image_id"] for s in images["skipped"]] == [bad.image_id]
    assert str(bad.image_path) in images["skipped"][0]["reason"]
    with np.load(out / result["per_image"]["file"]) as npz:
        assert [str(i) for i in npz["image_ids"]] == [ids[0], ids[2]]
        assert npz["counts"].shape[0] == 2
    valid = sum(int((read_gt(s.gt_path, False) != 255).sum()) for s in (samples[0], samples[2]))
    assert sum(result["counts"]["label"]) == valid
    assert "2/1449" in stdout


def test_on_error_skip_does_not_hide_gt_problems(voc):
    root, _, samples, out = voc
    samples[0].gt_path.unlink()
    expect_user_error(maskclip("voc", root, out, "--on-error", "skip"), out, str(samples[0].gt_path))


def test_on_error_skip_with_every_image_unreadable(tmp_path):
    root, out = tmp_path / "data", tmp_path / "runs"
    write_dataset("voc", root, num_images=1, seed=2)
    bad = list_samples(load_card("voc"), root)[0].image_path
    bad.write_bytes(b"")
    # says why nothing could be scored: the image was skipped, and which one
    expect_user_error(maskclip("voc", root, out, "--on-error", "skip"), out, "skipped", str(bad))
