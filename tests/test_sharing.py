"""Sharing work (issue 15): paired datasets read one stream of images, methods with a common
trunk compute it once per window, and every result equals the run of its dataset and method
alone, count for count and image for image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_bench.engine.sharing import SharedEmbedder
from ovseg_bench.methods.base import WeightsOptions
from ovseg_bench.methods.prompts import ENCODED
from ovseg_bench.registry import get_method
from tests.conftest import TINY_MODEL, call_cli, result_jsons, run_argv
from tests.methods.test_reco import TINY_RN, write_references, write_tiny_deit
from tests.methods.test_tcl import random_state

PAIRED = "voc,voc20,context,context59,coco_stuff,coco_object"
CLIP_FAMILY = ("clip", "maskclip", "sclip", "clearclip", "naclip")
ONE_LINE_ERROR = 2


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Files the opting-in methods other than the CLIP family need: TCL's checkpoint, ReCo's DeiT
    and references for every class of the six paired datasets."""
    from ovseg_bench.datasets.cards import load_card

    root = tmp_path_factory.mktemp("sharing")
    tcl = root / "tcl_tiny.pth"
    torch.save({"model": random_state()}, tcl)
    names = {n for d in PAIRED.split(",") for synonyms in load_card(d).prediction_synonyms("mmseg") for n in synonyms}
    return {"tcl": ["--checkpoint", tcl],
            "reco_nocrf": ["--checkpoint", write_tiny_deit(root / "deit.pth"), "--references",
                           write_references(root / "refs.pkl", sorted(names)), "--model", TINY_RN, "--pretrained", "none"]}


def _argv(method: str, datasets: str, out: Path, root: Path, extra: list) -> list[str]:
    tiny = not any(str(e) == "--model" for e in extra)
    return run_argv(method, datasets, out, *extra, data_root=root, tiny=tiny)


def _run(method: str, datasets: str, out: Path, root: Path, extra: list | None = None) -> str:
    code, _, stderr = call_cli(_argv(method, datasets, out, root, extra or []))
    assert code == 0, stderr
    return stderr


def _by_name(folder: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in result_jsons(folder)}


def assert_same_results(shared: Path, alone: Path) -> dict[str, dict]:
    """Every result of ``alone`` has a twin of the same name in ``shared`` with the same counts,
    metrics, image ids and per-image counts."""
    a, b = _by_name(shared), _by_name(alone)
    assert sorted(a) == sorted(b) and a
    for name, result in b.items():
        twin = a[name]
        assert twin["counts"] == result["counts"], name
        assert twin["metrics"] == result["metrics"], name
        assert twin["images"]["ids_sha256"] == result["images"]["ids_sha256"], name
        rows = [np.load(folder / r["per_image"]["file"]) for folder, r in ((shared, twin), (alone, result))]
        assert np.array_equal(*rows), name
    return a


@pytest.mark.parametrize("method", [*CLIP_FAMILY, "tcl", "reco_nocrf"])
def test_paired_datasets_share_one_pass_and_count_as_alone(method, weights, synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    extra = weights.get(method, [])
    stderr = _run(method, PAIRED, tmp_path / "shared", root, extra)
    for pair in ("voc and voc20", "context and context59", "coco_stuff and coco_object"):
        assert f"shared stream: {pair}: each image decoded, resized and cut into windows once" in stderr, stderr
    for dataset in PAIRED.split(","):
        _run(method, dataset, tmp_path / "alone", root, extra)
    results = assert_same_results(tmp_path / "shared", tmp_path / "alone")
    voc = next(r for r in results.values() if r["dataset"]["name"] == "voc")
    shared = voc["timing"]["shared"]
    assert shared["stream"] == [f"{method}/voc", f"{method}/voc20"]
    # One embedding per window for the two datasets (6 windows of 3 images), where alone makes two.
    assert shared["trunk_windows"] == 6 and shared["separate_windows"] == 12


def test_clip_family_on_all_datasets_shares_trunks_and_counts_as_separate_runs(synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    stderr = _run("clip-family", "all", tmp_path / "shared", root)
    assert "clip, sclip, clearclip, naclip: one pass through CLIP blocks 0-1 per window" in stderr, stderr
    assert "maskclip: no trunk to share" in stderr  # its mmseg ViT arithmetic changes every block
    for method in CLIP_FAMILY:
        for dataset in ("voc", "voc20", "context", "context59", "coco_stuff", "coco_object", "cityscapes", "ade20k"):
            _run(method, dataset, tmp_path / "alone", root)
    results = assert_same_results(tmp_path / "shared", tmp_path / "alone")
    assert len(results) == 40
    streams = {tuple(r["timing"]["shared"]["stream"]): r["timing"]["shared"] for r in results.values()}
    assert len(streams) == 5  # voc+voc20, context+context59, coco_stuff+coco_object, cityscapes, ade20k
    trunk = sum(s["trunk_windows"] for s in streams.values())
    separate = sum(s["separate_windows"] for s in streams.values())
    windows = 6 * 5  # 6 windows a dataset, 5 image sets
    assert trunk == 2 * windows  # one trunk for the four CLIP-arithmetic variants, one for maskclip
    assert separate == 5 * 8 * 6 and trunk < separate


def test_tcl_variants_share_the_trunk_and_reco_variants_the_whole_image_side(weights, synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    stderr = _run("tcl,tcl_nopamr", "voc", tmp_path / "tcl", root, weights["tcl"])
    assert "tcl, tcl_nopamr: one pass through CLIP blocks 0-1 (TCL position rule) per window" in stderr, stderr
    for method in ("tcl", "tcl_nopamr"):
        _run(method, "voc", tmp_path / "tcl_alone", root, weights["tcl"])
    assert_same_results(tmp_path / "tcl", tmp_path / "tcl_alone")


def test_methods_that_cannot_share_say_so_and_still_run(weights, synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    stderr = _run("tcl,sclip", "voc", tmp_path / "mixed", root, weights["tcl"])
    assert "tcl: no other method of this run has its trunk" in stderr, stderr
    assert "sclip: no other method of this run has its trunk" in stderr
    assert len(result_jsons(tmp_path / "mixed")) == 2


def test_the_embedder_computes_a_shared_trunk_once_with_the_methods_own_features(monkeypatch):
    device = torch.device("cpu")
    methods = [get_method(name)(WeightsOptions(TINY_MODEL, "none"), device) for name in ("clip", "sclip", "clearclip")]
    from ovseg_bench.methods.clip_family import ClipFamily

    calls = []
    original = ClipFamily._penultimate

    def counting(self, windows):
        calls.append(self.name)
        return original(self, windows)

    monkeypatch.setattr(ClipFamily, "_penultimate", counting)
    # 40 x 56: not a multiple of the 16-px patch, so ClearCLIP's centred padding differs from the others' input.
    for size in ((32, 48), (40, 56)):
        windows = torch.randn(2, 3, *size)
        calls.clear()
        features = SharedEmbedder(methods).embed([windows] * 3)
        assert len(calls) == (1 if size == (32, 48) else 2), calls
        for method, shared in zip(methods, features):
            calls.clear()
            alone = method.embed_windows(windows)
            assert torch.equal(shared.maps, alone.maps) and shared.padded == alone.padded
            assert shared.offset == alone.offset


def test_each_name_is_text_encoded_once_for_methods_with_the_same_templates(monkeypatch):
    from ovseg_bench.methods import prompts

    monkeypatch.setenv("OVSEG_TEXT_CACHE", "off")
    ENCODED.clear()
    encoded: list[str] = []
    original = prompts.encode_names

    def counting(model, tokenizer, names, *args):
        encoded.extend(names)
        return original(model, tokenizer, names, *args)

    monkeypatch.setattr(prompts, "encode_names", counting)
    device = torch.device("cpu")
    clip, sclip = (get_method(n)(WeightsOptions(TINY_MODEL, "none"), device) for n in ("clip", "sclip"))
    first = clip.text.encode(["cat", "dog"])
    second = sclip.text.encode(["dog", "cat", "bird"])
    assert encoded == ["cat", "dog", "bird"]
    assert torch.equal(second[:2], first.flip(0))
    alone = original(clip.model, clip.tokenizer, ["bird"], clip.text.templates, clip.text.average, device)
    assert torch.equal(second[2:], alone)


@pytest.mark.parametrize("argv, expected", [
    (["--method", "clip,nosuchmethod"], "nosuchmethod"),
    (["--method", " , "], "--method names no method"),
    (["--method", "clip,sclip", "--config", "configs/methods/clip.yaml"], "--config replaces the config of one method"),
    (["--method", "clip-family", "--references", "refs.pkl"], "not an input of any of the methods"),
])
def test_bad_method_lists_fail_with_one_line_and_no_result(argv, expected, synthetic_tree, tmp_path):
    out = tmp_path / "out"
    base = ["run", "--dataset", "voc", "--data-root", str(synthetic_tree[0]), "--output", str(out),
            "--model", TINY_MODEL, "--pretrained", "none", "--quiet"]
    code, _, stderr = call_cli(base + argv)
    assert code == ONE_LINE_ERROR and len(stderr.strip().splitlines()) == 1 and expected in stderr, stderr
    assert result_jsons(out) == []


def test_under_resume_a_dataset_with_a_finished_result_is_taken_and_the_rest_shares(synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    out = tmp_path / "out"
    _run("clip", "voc", out, root)
    stderr = _run("clip,sclip", "voc,voc20", out, root, ["--resume"])
    assert "clip/voc: runs its own passes, it has a finished result" in stderr, stderr
    assert "shared stream: voc20 and voc:" in stderr  # clip/voc20 and sclip on both still share
    for method in ("clip", "sclip"):
        for dataset in ("voc", "voc20"):
            _run(method, dataset, tmp_path / "alone", root)
    assert_same_results(out, tmp_path / "alone")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_cuda_a_shared_run_counts_as_separate_runs(precision, synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    cuda = ["--device", "cuda", "--precision", precision]
    code, _, stderr = call_cli(run_argv("clip,sclip", "voc,voc20", tmp_path / "shared", data_root=root, fast=False)
                               + ["--quiet", *cuda])
    assert code == 0, stderr
    for method in ("clip", "sclip"):
        for dataset in ("voc", "voc20"):
            code, _, stderr = call_cli(run_argv(method, dataset, tmp_path / "alone", data_root=root, fast=False)
                                       + ["--quiet", *cuda])
            assert code == 0, stderr
    assert_same_results(tmp_path / "shared", tmp_path / "alone")


def test_the_clip_family_holds_one_model_per_weights():
    device = torch.device("cpu")
    clip, sclip = (get_method(n)(WeightsOptions(TINY_MODEL, "none"), device) for n in ("clip", "sclip"))
    assert clip.model is sclip.model
    other = get_method("clip")(WeightsOptions("tests/assets/tiny_vit_b32.json", "none"), device)
    assert other.model is not clip.model
