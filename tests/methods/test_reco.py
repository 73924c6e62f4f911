"""``reco_nocrf``: ReCo's inference (NoelShin/reco@5c5e1bc networks/reco.py ReCo.__call__) on tiny
random networks in the published layouts, against an independent computation of each step."""
from __future__ import annotations

import pickle

import numpy as np
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovseg_bench.errors import ConfigError, DataError
from ovseg_bench.methods.base import DatasetInfo, MethodInputs, WeightsOptions
from ovseg_bench.methods.reco_backbones import deit_dense_features, denseclip_features
from ovseg_bench.registry import get_method
from tests.conftest import call_cli, result_jsons, run_argv

TINY_RN = str(Path(__file__).resolve().parents[1] / "assets" / "tiny_rn.json")
ADE = DatasetInfo("ade20k", ("wall", "floor", "sky"), False)


def write_tiny_deit(path: Path, seed: int = 0) -> Path:
    """A distilled DeiT (64-d, 2 blocks, 16 px patches, 4 x 4 native grid) in ReCo's layout."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(seed)
    model = VisionTransformerDistilled(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=1,
                                       mlp_ratio=2.0, qkv_bias=True)
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return path


def write_references(path: Path, names, dim: int = 64, seed: int = 1) -> Path:
    gen = torch.Generator().manual_seed(seed)
    refs = {name: F.normalize(torch.randn(dim, generator=gen), dim=0) for name in names}
    path.write_bytes(pickle.dumps(refs, protocol=4))  # ReCo writes them with pickle.dump
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reco")
    return {"deit": write_tiny_deit(root / "deit_s_sin_dist.pth"),
            "refs": write_references(root / "refs.pkl", ADE.class_names)}


def build(files, refs: Path | None = None):
    weights = WeightsOptions(model=TINY_RN, pretrained="none", checkpoint=files["deit"])
    return get_method("reco_nocrf")(weights, torch.device("cpu"), inputs=MethodInputs(references=refs or files["refs"]))


def test_scores_are_sigmoid_references_times_sigmoid_text(files):
    method = build(files)
    vocab = method.encode_classes([["wall"], ["floor"], ["sky"]], ADE)
    windows = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got = method.forward_windows(windows, vocab)
        deit = deit_dense_features(method.deit, windows)
        clip = denseclip_features(method.visual, windows)
    refs = pickle.loads(Path(files["refs"]).read_bytes())
    r = torch.stack([refs[n] for n in ("wall", "floor", "sky")])
    d = torch.sigmoid(torch.einsum("bchw,nc->bnhw", deit / deit.norm(dim=1, keepdim=True), r))
    d = F.interpolate(d, size=(96, 64), mode="bilinear", align_corners=False)
    text = vocab.embeddings
    lang = torch.sigmoid(10 * torch.einsum("bchw,nc->bnhw", clip / clip.norm(dim=1, keepdim=True), text))
    lang = F.interpolate(lang, size=(96, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, d * lang, rtol=0, atol=1e-6)
    assert got.shape == (2, 3, 96, 64) and deit.shape[-2:] == (6, 4) and clip.shape[-2:] == (3, 2)


def test_text_is_the_85_template_normalised_average(files):
    method = build(files)
    vocab = method.encode_classes([["wall"], ["floor"], ["sky"]], ADE)
    templates = [line for line in (Path(__file__).resolve().parents[2] / "configs" / "templates" /
                                   "maskclip85.txt").read_text().splitlines() if line]
    model, tok = method.text.model, method.text.tokenizer
    with torch.no_grad():
        feats = model.encode_text(tok([t.format("floor") for t in templates])).float()
    want = F.normalize(F.normalize(feats, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(vocab.embeddings[1], want, rtol=0, atol=1e-6)


def test_inputs_are_ImageNet_unit_normalised(files):
    x = torch.tensor([[[[0, 128, 255]]] * 3], dtype=torch.uint8).reshape(1, 3, 1, 3)
    got = build(files).normalisation.apply(x)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.equal(got, want)


def test_an_unmatched_class_names_the_file_and_its_names(files):
    with pytest.raises(DataError, match=r"no reference for class 'ceiling'.*\['floor', 'sky', 'wall'\]"):
        build(files).encode_classes([["wall"], ["ceiling"]], ADE)


def test_references_are_required_and_a_malicious_pickle_is_refused(files, tmp_path):
    with pytest.raises(ConfigError, match="--references"):
        get_method("reco_nocrf")(WeightsOptions(model=TINY_RN, pretrained="none", checkpoint=files["deit"]),
                                 torch.device("cpu"))

    class Evil:
        def __reduce__(self):
            return (eval, ("1",))

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"wall": Evil()}))
    from ovseg_bench.safe_pickle import UnsafePickleError

    with pytest.raises(UnsafePickleError, match="eval"):
        build(files, refs=bad)


def test_a_run_through_the_cli(files, synthetic_tree, tmp_path):
    from ovseg_bench.datasets.cards import load_card

    root, _ = synthetic_tree
    refs = write_references(tmp_path / "voc_refs.pkl", load_card("voc").class_names())
    argv = run_argv("reco_nocrf", "voc", tmp_path / "out", "--checkpoint", files["deit"], "--references", refs,
                    data_root=root, tiny=False) + ["--model", TINY_RN, "--pretrained", "none"]
    code, _, stderr = call_cli(argv)
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    import json

    result = json.loads(path.read_text())
    assert result["method"]["config"]["references"] == str(refs.resolve())
    assert result["method"]["weights"]["checkpoint"] == str(Path(files["deit"]).resolve())


# ----------------------------------------------------------------------------- reco (with the CRF)
def build_reco(files, refs: Path | None = None):
    weights = WeightsOptions(model=TINY_RN, pretrained="none", checkpoint=files["deit"])
    return get_method("reco")(weights, torch.device("cpu"), inputs=MethodInputs(references=refs or files["refs"]))


def test_reco_labels_are_the_argmax_of_the_crf_on_the_fused_scores(files):
    from ovseg_bench.methods.crf import dense_crf, unnormalised_bgr

    method = build_reco(files)
    vocab = method.encode_classes([["wall"], ["floor"], ["sky"]], ADE)
    pixels = torch.randint(0, 256, (1, 3, 48, 40), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    image = method.normalisation.apply(pixels)
    with torch.inference_mode():
        scores = method.forward_windows(image, vocab)[0]
        got = method.postprocess(scores, image[0], vocab, ADE)
    # Independently: ReCo feeds log_softmax(D * L) to the CRF, which takes its softmax as the unary.
    probs = torch.softmax(torch.log_softmax(scores, dim=0), dim=0).numpy()
    bgr = unnormalised_bgr(image[0], mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    want = dense_crf(probs.astype(np.float32), bgr).argmax(axis=0)
    assert np.array_equal(got.numpy(), want)
    assert not torch.equal(got, scores.argmax(0))  # the CRF changed labels on this case: it ran


def test_reco_without_the_crf_extra_fails_before_loading_weights(files, monkeypatch):
    import sys

    from ovseg_bench.methods import reco as reco_module

    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(reco_module, "load_networks", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(ConfigError, match=r"'crf' extra"):
        build_reco(files)


def test_coco_stuff27_predicts_171_classes_and_scores_27_after_the_argmax(files, tmp_path):
    """A native run on a held-out COCO-Stuff tree: the saved 320x320 labels equal ReCo's steps done
    independently (PIL NEAREST resize of the short side to 320, round() centre crop, D * L,
    argmax over the 171 fine classes, ReCo's 171 -> 27 table)."""
    import json

    from PIL import Image

    from ovseg_bench.datasets.cards import load_card
    from tests.synthetic import write_dataset

    root = tmp_path / "data"
    ids = write_dataset("coco_stuff", root, num_images=2, sizes=[(300, 420), (350, 330)], seed=3)
    curated = root / "coco_stuff164k" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse.txt"
    curated.parent.mkdir(parents=True)
    curated.write_text("".join(f"{i}\n" for i in ids))
    card = load_card("coco_stuff27")
    refs = write_references(tmp_path / "coco_refs.pkl", card.prediction_names())
    argv = run_argv("reco_nocrf", "coco_stuff27", tmp_path / "out", "--checkpoint", files["deit"], "--references",
                    refs, "--protocol", "native", "--save-predictions", data_root=root, tiny=False)
    code, _, stderr = call_cli(argv + ["--model", TINY_RN, "--pretrained", "none"])
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    result = json.loads(path.read_text())
    assert result["dataset"]["split_file"]["path"] == str(curated)
    assert len(result["dataset"]["predicted_classes"]) == 171 and result["dataset"]["num_classes"] == 27

    method = build(files, refs)
    vocab = method.encode_classes([[n] for n in card.prediction_names()],
                                  DatasetInfo("coco_stuff27", card.prediction_names(), False))
    table = np.array(card.prediction_map())
    for image_id in ids:
        pil = Image.open(root / "coco_stuff164k" / "images" / "val2017" / f"{image_id}.jpg").convert("RGB")
        w, h = pil.size
        size = (320, int(320 * h / w)) if w < h else (int(320 * w / h), 320)
        pil = pil.resize(size, Image.NEAREST)
        left, top = int(round((size[0] - 320) / 2.0)), int(round((size[1] - 320) / 2.0))
        x = torch.from_numpy(np.asarray(pil.crop((left, top, left + 320, top + 320))).copy()).permute(2, 0, 1)[None]
        with torch.inference_mode():
            fine = method.forward_windows(method.normalisation.apply(x), vocab)[0].argmax(0).numpy()
        saved = np.array(Image.open(tmp_path / "out" / "predictions" / "reco_nocrf" / "coco_stuff27" / f"{image_id}.png"))
        assert saved.shape == (320, 320) and np.array_equal(saved, table[fine])


def test_references_built_by_the_command_drive_a_run(files, synthetic_tree, tmp_path):
    import json

    from tests.methods.test_reco_references import TINY_VIT, write_archive

    root, _ = synthetic_tree
    write_archive(tmp_path / "archive", count=5)
    out = tmp_path / "voc_refs.pkl"
    code, _, stderr = call_cli(["reco", "build-references", "--archive", tmp_path / "archive", "--dataset", "voc",
                                "--out", out, "--checkpoint", files["deit"], "--model", TINY_RN, "--pretrained", "none",
                                "--retrieval-model", TINY_VIT, "--retrieval-pretrained", "none", "--k", "2",
                                "--device", "cpu", "--cache", tmp_path / "cache.pt", "--quiet"])
    assert code == 0, stderr
    argv = run_argv("reco_nocrf", "voc", tmp_path / "out", "--checkpoint", files["deit"], "--references", out,
                    data_root=root, tiny=False) + ["--model", TINY_RN, "--pretrained", "none"]
    code, _, stderr = call_cli(argv)
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    built = json.loads(path.read_text())["method"]["config"]["references_built"]
    assert built["settings"]["seed_slicing"] == "reco" and built["settings"]["k"] == 2
    assert built["archive"]["images"] == 5


def test_reco_runs_on_all_eight_benchmarks_under_the_tcl_preset(files, synthetic_tree, tmp_path):
    from ovseg_bench.datasets.cards import ALL_BENCHMARKS, load_card

    root, _ = synthetic_tree
    names = dict.fromkeys(n for d in ALL_BENCHMARKS for n in load_card(d).class_names())
    refs = write_references(tmp_path / "all.pkl", names)
    argv = run_argv("reco", "all", tmp_path / "out", "--checkpoint", files["deit"], "--references", refs,
                    "--protocol", "tcl", "--limit", "1", data_root=root, tiny=False) + ["--model", TINY_RN, "--pretrained", "none"]
    code, stdout, stderr = call_cli(argv)
    assert code == 0, stderr
    assert len(result_jsons(tmp_path / "out")) == len(ALL_BENCHMARKS) and "Avg" in stdout


def test_published_spellings_are_mapped_and_the_card_spelling_wins(files, tmp_path):
    info = DatasetInfo("coco_stuff", ("sky-other", "tree"), False)
    published = write_references(tmp_path / "published.pkl", ["sky other", "tree"])
    vocab = build(files, published).encode_classes([["sky-other"], ["tree"]], info)
    refs = pickle.loads(published.read_bytes())
    assert torch.equal(vocab.references[0], refs["sky other"])
    both = write_references(tmp_path / "both.pkl", ["sky other", "sky-other", "tree"], seed=4)
    vocab = build(files, both).encode_classes([["sky-other"], ["tree"]], info)
    assert torch.equal(vocab.references[0], pickle.loads(both.read_bytes())["sky-other"])


def test_a_published_pickle_of_cuda_tensors_loads_on_the_cpu(files, tmp_path):
    """ReCo's released pickles hold CUDA tensors, which plain pickle.load cannot read on a CPU
    machine; the allow-list unpickler maps them to the CPU."""
    from unittest import mock

    import torch.serialization

    names = {"wall": F.normalize(torch.randn(64), dim=0), "floor": F.normalize(torch.randn(64), dim=0),
             "sky": F.normalize(torch.randn(64), dim=0)}
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        blob = pickle.dumps(names)
    assert b"cuda:0" in blob
    (tmp_path / "cuda.pkl").write_bytes(blob)
    vocab = build(files, tmp_path / "cuda.pkl").encode_classes([["wall"], ["floor"], ["sky"]], ADE)
    assert torch.equal(vocab.references[2], names["sky"]) and vocab.references.device.type == "cpu"
