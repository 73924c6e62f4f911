"""``reco build-references``: each step of ReCo's reference building (NoelShin/reco@5c5e1bc
networks/reco.py) against an independent NumPy computation, and the command end to end on tiny
random networks in the published layouts."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_bench.errors import DataError
from ovseg_bench.methods import reco_references as refs
from tests.conftest import call_cli
from tests.methods.test_reco import TINY_RN, write_tiny_deit

TINY_VIT = str(Path(__file__).resolve().parents[1] / "assets" / "tiny_vit.json")


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def unit(x, axis):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


# ----------------------------------------------------------------------------- independent steps
def numpy_seeds(features: np.ndarray, weights: np.ndarray, quirk: bool) -> list[int]:
    """Seed selection written from the paper's description, patch by patch in float64; with
    ``quirk`` image n's block is ReCo's [n*hw, (2n+1)*hw) instead of [n*hw, (n+1)*hw)."""
    n, c, h, w = features.shape
    hw = h * w
    patches = unit(features.transpose(0, 2, 3, 1).reshape(n * hw, c), axis=1)
    flat_weights = weights.reshape(n * hw)
    seeds = []
    scores = np.zeros(n * hw)
    for i in range(n * hw):
        per_image = []
        for image in range(n):
            stop = min((2 * image + 1) * hw if quirk else (image + 1) * hw, n * hw)
            columns = range(image * hw, stop)
            per_image.append(max(float(patches[i] @ patches[j]) * flat_weights[j] for j in columns))
        scores[i] = np.mean(per_image)
    for image in range(n):
        seeds.append(int(np.argmax(scores[image * hw:(image + 1) * hw])))
    return seeds


def test_seeds_match_a_patch_by_patch_computation_with_and_without_the_quirk():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(5, 8, 3, 4, generator=gen)
    weights = torch.rand(5, 3, 4, generator=gen)
    quirk = refs.seed_indices(features, weights, "reco")
    fixed = refs.seed_indices(features, weights, "fixed")
    assert quirk == numpy_seeds(features.double().numpy(), weights.double().numpy(), quirk=True)
    assert fixed == numpy_seeds(features.double().numpy(), weights.double().numpy(), quirk=False)
    assert quirk != fixed  # the quirk moves seeds on this case, so the switch is tested


def test_the_quirk_on_a_hand_made_case():
    # Three images of two patches (hw = 2). Image 0 = (a, b), image 1 = (b, b), image 2 = (a, d)
    # with cos(b, d) = 0.5 and cos(a, d) = 0. Per-image maxima of image 0's patches:
    #   a: image 0 -> 1, image 1 -> 0, image 2 -> 1;   b: 1, 1, 0.5.
    # Fixed: a scores 2/3 and b 2.5/3, so the seed is b. With the quirk image 1's block is columns
    # [2, 6), images 1 and 2, so a's maximum there is 1: a scores 1 and b still 2.5/3; the seed is a.
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    d = torch.tensor([0.0, 0.5, 0.75 ** 0.5])
    maps = torch.stack([torch.stack([a, b], 1), torch.stack([b, b], 1), torch.stack([a, d], 1)])[:, :, None, :]
    ones = torch.ones(3, 1, 2)
    assert refs.seed_indices(maps, ones, "fixed")[0] == 1
    assert refs.seed_indices(maps, ones, "reco")[0] == 0


def test_weights_multiply_columns_not_rows():
    # Image 1 has two copies of the same feature; zero weight on one moves image 0's score only
    # if weights sit on the columns.
    maps = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 1.0]], [[0.0, 0.0]]]])  # [2, 2, 1, 2]
    weights = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])
    seeds = refs.seed_indices(maps, weights, "fixed")
    assert seeds == numpy_seeds(maps.double().numpy(), weights.double().numpy(), quirk=False)


def test_language_and_context_weights_match_numpy():
    gen = torch.Generator().manual_seed(1)
    clip_map = torch.randn(3, 6, 2, 2, generator=gen)
    text = F.normalize(torch.randn(6, generator=gen), dim=0)
    got = refs.language_weights(clip_map, text, (4, 4), 10.0)
    cos = np.einsum("bchw,c->bhw", unit(clip_map.double().numpy(), 1), text.double().numpy())
    small = torch.from_numpy(sigmoid(10 * cos)).float()
    want = F.interpolate(small[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    features = torch.randn(3, 5, 4, 4, generator=gen)
    contexts = torch.randn(2, 5, generator=gen) * 3  # not normalised: both sides are normalised
    weights = refs.patch_weights(features, got, contexts)
    sim = sigmoid(np.einsum("bchw,nc->bnhw", unit(features.double().numpy(), 1), unit(contexts.double().numpy(), 1)))
    expected = got.double().numpy() * (1 - sim[:, 0]) * (1 - sim[:, 1])
    np.testing.assert_allclose(weights.double().numpy(), expected, rtol=0, atol=1e-6)


def test_reference_is_the_normalised_mean_of_raw_seed_features():
    features = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    got = refs.reference_from_seeds(features, [3, 1])
    raw = np.stack([features[0, :, 1, 1].numpy(), features[1, :, 0, 1].numpy()])
    torch.testing.assert_close(got, torch.from_numpy(unit(raw.mean(0), 0)).float())


def test_ranking_keeps_the_top_k_with_ties_in_archive_order():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    assert refs.rank_archive(torch.tensor([1.0, 0.0]), embeddings, 3) == [0, 2, 3]


class Recorder:
    """A co-segmenter that records which contexts each reference saw."""

    settings = refs.ReferenceSettings()

    def __init__(self):
        self.calls = []

    def reference(self, images, text, contexts):
        self.calls.append((images, sorted(contexts)))
        return torch.full((4,), float(len(self.calls)))


def test_contexts_are_built_first_in_order_each_eliminated_by_those_before():
    coseg = Recorder()
    out = refs.build_references(["cat", "sky", "vegetation"], retrieve=lambda name: name, text=lambda name: None,
                                coseg=coseg)
    assert [c[0] for c in coseg.calls] == ["tree", "sky", "building", "road", "person", "cat"]
    assert [c[1] for c in coseg.calls] == [[], ["tree"], ["sky", "tree"], ["building", "sky", "tree"],
                                           ["building", "road", "sky", "tree"],
                                           ["building", "person", "road", "sky", "tree"]]
    assert out["sky"][0] == 2 and out["vegetation"][0] == 1 and out["cat"][0] == 6


# ----------------------------------------------------------------------------- the whole build
def independent_reference(deit, clip, images, text, contexts, quirk=True):
    """ReCo's _cosegment for one class written out in NumPy (float64) on the networks' maps."""
    feats = deit(images).double().numpy()
    n, c, h, w = feats.shape
    cmap = unit(clip(images).double().numpy(), 1)
    att = sigmoid(10 * np.einsum("bchw,c->bhw", cmap, text.double().numpy()))
    att = F.interpolate(torch.from_numpy(att)[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
    weights = att
    for r in contexts:
        weights = weights * (1 - sigmoid(np.einsum("bchw,c->bhw", unit(feats, 1), unit(r.double().numpy(), 0))))
    seeds = numpy_seeds(feats, weights, quirk)
    chosen = np.stack([feats[i, :, s // w, s % w] for i, s in enumerate(seeds)])
    return unit(chosen.mean(0), 0)


def test_a_cosegmented_reference_matches_the_independent_computation(tmp_path):
    from ovseg_bench.methods.reco_backbones import build_deit_for, deit_dense_features, denseclip_features, \
        prepare_denseclip
    from ovseg_bench.methods.clip_model import load_clip

    deit = build_deit_for(write_tiny_deit(tmp_path / "deit.pth"))
    visual = prepare_denseclip(load_clip(TINY_RN, "none").model.visual)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    text = F.normalize(torch.randn(visual.attnpool.c_proj.out_features), dim=0)
    contexts = {"tree": F.normalize(torch.randn(64), dim=0), "sky": F.normalize(torch.randn(64), dim=0)}
    for slicing in ("reco", "fixed"):
        coseg = refs.Cosegmenter(lambda x: deit_dense_features(deit, x), lambda x: denseclip_features(visual, x),
                                 refs.ReferenceSettings(seed_slicing=slicing))
        with torch.no_grad():
            got = coseg.reference(images, text, contexts)
            want = independent_reference(lambda x: deit_dense_features(deit, x), lambda x: denseclip_features(visual, x),
                                         images, text, list(contexts.values()), quirk=slicing == "reco")
        np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-5)


def test_archive_crops_are_bilinear_short_side_then_centre_crop_with_imagenet_statistics(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    got = refs.archive_crops([tmp_path / "a.png"], 20)[0]
    resized = np.asarray(Image.fromarray(rgb).resize((33, 20), Image.BILINEAR))  # int(20 * 50 / 30) = 33
    left = int(round((33 - 20) / 2.0))
    crop = resized[:, left:left + 20].astype(np.float32) / 255
    want = (crop - np.array(refs.IMAGENET_MEAN, np.float32)) / np.array(refs.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the command
def write_archive(root: Path, count: int = 7) -> Path:
    from PIL import Image

    rng = np.random.default_rng(5)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(40, 90, size=2))
        folder = root / f"n0{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"n0{i % 3}_{i}.png")
    return root


def build_argv(tmp_path, out, *extra):
    return ["reco", "build-references", "--archive", str(tmp_path / "archive"), "--out", str(out),
            "--checkpoint", str(tmp_path / "deit.pth"), "--model", TINY_RN, "--pretrained", "none",
            "--retrieval-model", TINY_VIT, "--retrieval-pretrained", "none", "--k", "3", "--device", "cpu",
            "--cache", str(tmp_path / "cache.pt"), "--quiet", *extra]


@pytest.fixture()
def archive(tmp_path):
    write_archive(tmp_path / "archive")
    write_tiny_deit(tmp_path / "deit.pth")
    (tmp_path / "classes.txt").write_text("cat\nsky\nvegetation\n")
    return tmp_path


def test_build_references_end_to_end_then_a_run_uses_them(archive, synthetic_tree):
    tmp_path = archive
    out = tmp_path / "refs.pkl"
    code, _, stderr = call_cli(build_argv(tmp_path, out, "--classes", str(tmp_path / "classes.txt")))
    assert code == 0, stderr
    with open(out, "rb") as stream:  # ReCo's own reader is pickle.load
        built = pickle.load(stream)
    assert list(built) == ["cat", "sky", "vegetation"]
    assert all(v.shape == (64,) and abs(float(v.norm()) - 1) < 1e-5 for v in built.values())
    record = json.loads(refs.record_path(out).read_text())
    assert record["settings"]["k"] == 3 and record["settings"]["seed_slicing"] == "reco"
    assert record["archive"]["images"] == 7 and len(record["archive"]["digest"]) == 64
    assert list(record["retrieved"]) == ["tree", "sky", "building", "road", "person", "cat"]
    assert all(len(v) == 3 for v in record["retrieved"].values())
    # Resuming: the cache holds every image; a second build reads it and gives the same file content.
    cache = torch.load(tmp_path / "cache.pt", weights_only=True)
    assert len(cache["names"]) == 7
    code, _, stderr = call_cli(build_argv(tmp_path, tmp_path / "again.pkl", "--classes", str(tmp_path / "classes.txt")))
    assert code == 0, stderr
    again = pickle.loads((tmp_path / "again.pkl").read_bytes())
    assert all(torch.equal(again[k], built[k]) for k in built)


def test_fixed_seed_slicing_is_a_config_switch_recorded_in_the_file(archive):
    tmp_path = archive
    config = tmp_path / "reco_fixed.yaml"
    text = (Path(__file__).resolve().parents[2] / "configs" / "methods" / "reco.yaml").read_text()
    config.write_text(text.replace("name: reco\n", "name: reco_fixed\nvariant_of: reco\n")
                      .replace("seed_slicing: reco", "seed_slicing: fixed"))
    out = tmp_path / "fixed.pkl"
    code, _, stderr = call_cli(build_argv(tmp_path, out, "--classes", str(tmp_path / "classes.txt"),
                                          "--config", str(config)))
    assert code == 0, stderr
    assert json.loads(refs.record_path(out).read_text())["settings"]["seed_slicing"] == "fixed"


def test_embedding_cache_resumes_where_it_stopped(tmp_path):
    from ovseg_bench.methods.clip_model import load_clip

    files = refs.scan_archive(write_archive(tmp_path / "archive"))
    model = load_clip(TINY_VIT, "none").model
    partial = dict(list(files.items())[:3])
    cache = refs.EmbeddingCache(tmp_path / "c.pt", {"id": 1})
    refs.embed_archive(model, partial, cache, size=224, device=torch.device("cpu"), batch_size=2, quiet=True)
    resumed = refs.EmbeddingCache(tmp_path / "c.pt", {"id": 1})
    assert resumed.done() == set(partial)
    names, got = refs.embed_archive(model, files, resumed, size=224, device=torch.device("cpu"), batch_size=2, quiet=True)
    fresh = refs.EmbeddingCache(tmp_path / "fresh.pt", {"id": 1})
    _, want = refs.embed_archive(model, files, fresh, size=224, device=torch.device("cpu"), batch_size=4, quiet=True)
    assert names == list(files)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(DataError, match="computed for"):
        refs.EmbeddingCache(tmp_path / "c.pt", {"id": 2})


def test_published_archive_embeddings_are_accepted_and_malicious_ones_refused(archive):
    tmp_path = archive
    files = refs.scan_archive(tmp_path / "archive")
    gen = torch.Generator().manual_seed(0)
    published = {name: F.normalize(torch.randn(32, generator=gen), dim=0) for name in files}
    (tmp_path / "emb.pkl").write_bytes(pickle.dumps(published))
    out = tmp_path / "refs.pkl"
    code, _, stderr = call_cli(build_argv(tmp_path, out, "--classes", str(tmp_path / "classes.txt"),
                                          "--archive-embeddings", str(tmp_path / "emb.pkl")))
    assert code == 0, stderr
    record = json.loads(refs.record_path(out).read_text())
    assert record["archive"]["embeddings"]["file"] == str((tmp_path / "emb.pkl").resolve())

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"n00_0.png": Evil()}))
    code, _, stderr = call_cli(build_argv(tmp_path, tmp_path / "x.pkl", "--classes", str(tmp_path / "classes.txt"),
                                          "--archive-embeddings", str(tmp_path / "evil.pkl")))
    assert code != 0 and "print" in stderr and not (tmp_path / "x.pkl").exists()


def test_bad_inputs_give_one_line_and_no_file(archive, tmp_path_factory):
    tmp_path = archive
    code, _, stderr = call_cli(build_argv(tmp_path, tmp_path / "o.pkl", "--classes", str(tmp_path / "nope.txt")))
    assert code == 2 and "nope.txt" in stderr and len(stderr.strip().splitlines()) == 1
    empty = tmp_path_factory.mktemp("empty")
    argv = build_argv(tmp_path, tmp_path / "o.pkl", "--classes", str(tmp_path / "classes.txt"))
    argv[argv.index("--archive") + 1] = str(empty)
    code, _, stderr = call_cli(argv)
    assert code != 0 and "no image" in stderr and not (tmp_path / "o.pkl").exists()


def test_a_stale_record_is_refused(tmp_path):
    out = tmp_path / "r.pkl"
    refs.write_references(out, {"cat": torch.ones(3)}, {"format": refs.RECORD_FORMAT})
    assert refs.read_record(out)["format"] == refs.RECORD_FORMAT
    out.write_bytes(pickle.dumps({"cat": torch.zeros(3)}))
    with pytest.raises(DataError, match="sha256 differs"):
        refs.read_record(out)


def test_retrieval_text_runs_in_fp16_as_reco():
    from ovseg_bench.methods.clip_model import load_clip

    model = load_clip(TINY_VIT, "none").model
    half = refs.fp16_text_copy(model)
    assert half.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float16
    assert model.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float32
    assert not list(half.visual.parameters()) and model.visual.conv1.weight.dtype == torch.float32
    tokens = torch.randint(1, 100, (2, 77))
    with torch.no_grad():
        a, b = model.encode_text(tokens), half.encode_text(tokens)
    assert b.dtype == torch.float16 and not torch.equal(a, b.float())
    assert F.cosine_similarity(a, b.float()).min() > 0.99


def test_an_interrupted_embedding_keeps_what_it_computed(tmp_path):
    from ovseg_bench.methods.clip_model import load_clip

    files = refs.scan_archive(write_archive(tmp_path / "archive"))
    model = load_clip(TINY_VIT, "none").model
    calls = {"n": 0}
    encode = model.encode_image

    def flaky(images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return encode(images)

    model.encode_image = flaky
    cache = refs.EmbeddingCache(tmp_path / "c.pt", {"id": 1})
    with pytest.raises(KeyboardInterrupt):
        refs.embed_archive(model, files, cache, size=224, device=torch.device("cpu"), batch_size=2, quiet=True)
    resumed = refs.EmbeddingCache(tmp_path / "c.pt", {"id": 1})
    assert resumed.done() == set(list(files)[:4])  # two batches of two, saved on the way out
