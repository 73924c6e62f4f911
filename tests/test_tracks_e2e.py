"""The referring and label-conditioned tracks end to end through the CLI (issue 11): data
prepare, `run --method predictions` against independent computations, resume and torchrun
equality, the ReferringMethod / CamMethod scorers with stand-in adapters, and the gate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.label_conditioned import list_label_conditioned
from ovseg_bench.datasets.refer import gt_mask, read_referring
from ovseg_bench.engine.distributed import merge_states
from tests.conftest import call_cli, result_jsons, run_argv
from tests.label_synthetic import write_clip_es_cams, write_voc_label_tree, write_weaktr_cams
from tests.referring_synthetic import write_refer_tree


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def only_result(folder: Path) -> dict:
    (path,) = result_jsons(folder)
    return load(path)


def predictions_run(dataset: str, out: Path, preds: Path, root: Path, *extra: object) -> tuple[int, str, str]:
    return call_cli(run_argv("predictions", dataset, out, "--predictions", preds, *extra, data_root=root, tiny=False))


# ----------------------------------------------------------------------------- referring

@pytest.fixture(scope="module")
def refer_root(tmp_path_factory) -> Path:
    root = write_refer_tree(tmp_path_factory.mktemp("refer"))
    code, _, err = call_cli(["data", "prepare", "referring", "--data-root", root])
    assert code == 2 and "refcoco+/refs(unc).p not found" in err  # the tree has no refcoco+: said, the rest done
    code, out, err = call_cli(["data", "prepare", "refcoco,refcocog", "--data-root", root])
    assert code == 0, err
    assert "kept" in out  # already converted by the first call: idempotent
    assert (root / "refcoco" / "refs(unc).json").is_file() and (root / "refcocog" / "refs(umd).json").is_file()
    return root


def write_referring_predictions(root: Path, dataset: str, folder: Path, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A random-ish binary mask per sample (half the GT kept, noise added); (pred, GT) per sample."""
    card = load_card(dataset)
    refs, index = read_referring(card, root)
    rng = np.random.default_rng(seed)
    pairs = []
    for ref in refs:
        info = index.image(ref.image_id)
        gt = gt_mask(index, ref.ann_id, info.height, info.width, card.gt_rule)
        pred = (gt & (rng.random(gt.shape) < 0.6)) | (rng.random(gt.shape) < 0.1)
        if ref.sent_id % 5 == 0:
            pred[:] = False  # an empty answer (U may be 0 when the GT is empty too)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred.astype(np.uint8) * 255).save(folder / f"{ref.sample_id}.png")
        pairs.append((pred, gt))
    return pairs


def independent_referring(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    inter = np.array([np.logical_and(p, g).sum() for p, g in pairs], dtype=np.float64)
    union = np.array([np.logical_or(p, g).sum() for p, g in pairs], dtype=np.float64)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    out = {"oIoU": 100 * inter.sum() / union.sum(), "mIoU": 100 * iou.mean()}
    out.update({f"P@{t:g}": 100 * float((iou >= t).mean()) for t in (0.5, 0.6, 0.7, 0.8, 0.9)})
    return out


@pytest.mark.parametrize("dataset", ["refcoco_val", "refcoco_testA", "refcocog_val"])
def test_referring_predictions_equal_an_independent_computation(refer_root, tmp_path, dataset):
    pairs = write_referring_predictions(refer_root, dataset, tmp_path / "preds", seed=len(dataset))
    code, stdout, stderr = predictions_run(dataset, tmp_path / "out", tmp_path / "preds", refer_root)
    assert code == 0, stderr
    result = only_result(tmp_path / "out")
    assert result["dataset"]["track"] == "referring" and result["images"]["seen"] == len(pairs)
    want = independent_referring(pairs)
    for key, value in want.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert result["counts"]["intersect"] == [int(sum(np.logical_and(p, g).sum() for p, g in pairs))]
    with np.load(tmp_path / "out" / result["per_image"]["file"]) as npz:
        assert npz["counts"].shape == (len(pairs), 2)
    assert dataset in stdout  # the console table


def test_referring_mask_of_another_size_or_values_is_one_line(refer_root, tmp_path):
    write_referring_predictions(refer_root, "refcoco_val", tmp_path / "preds", seed=1)
    first = sorted((tmp_path / "preds").glob("*.png"))[0]
    Image.fromarray(np.full((5, 5), 7, np.uint8)).save(first)
    code, _, stderr = predictions_run("refcoco_val", tmp_path / "out", tmp_path / "preds", refer_root)
    assert code == 2 and stderr.count("\n") == 1 and str(first) in stderr
    assert not result_jsons(tmp_path / "out")


def test_a_refs_pickle_carrying_a_global_is_refused_by_prepare(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    folder = tmp_path / "refcoco"
    folder.mkdir()
    (folder / "refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    code, _, stderr = call_cli(["data", "prepare", "refcoco", "--data-root", tmp_path])
    assert code == 2 and "eval" in stderr and "refused" in stderr
    assert not (folder / "refs(unc).json").exists()


def test_referring_resume_and_shards_equal_one_run(refer_root, tmp_path, monkeypatch):
    """Blocks of 2 samples: a sharded run (two ranks, combined) equals the plain run."""
    write_referring_predictions(refer_root, "refcoco_val", tmp_path / "preds", seed=3)
    monkeypatch.setenv("OVSEG_SAVE_EVERY", "2")
    assert predictions_run("refcoco_val", tmp_path / "one", tmp_path / "preds", refer_root)[0] == 0
    single = only_result(tmp_path / "one")

    import ovseg_bench.plan as plan
    from ovseg_bench.engine.distributed import Ranks

    parts = []
    original = plan.distributed.shard
    for rank in (0, 1):
        monkeypatch.setattr(plan.distributed, "shard", lambda n, block, ranks, r=rank: original(n, block, Ranks(r, 2)))
        captured = {}
        monkeypatch.setattr(plan.distributed, "combine", lambda part, ranks, c=captured: c.setdefault("part", part))
        assert predictions_run("refcoco_val", tmp_path / f"rank{rank}", tmp_path / "preds", refer_root)[0] == 0
        parts.append(captured["part"])
    additive = parts[0].counts.additive() + parts[1].counts.additive()
    merged = merge_states([p.state_dict() for p in parts], additive)
    assert merged.image_ids == [i for i in single_ids(tmp_path / "one", single)]
    assert torch.equal(merged.counts.per_item, torch.from_numpy(sidecar_rows(tmp_path / "one", single)))


def single_ids(folder: Path, result: dict) -> list[str]:
    with np.load(folder / result["per_image"]["file"]) as npz:
        return [str(i) for i in npz["image_ids"]]


def sidecar_rows(folder: Path, result: dict) -> np.ndarray:
    with np.load(folder / result["per_image"]["file"]) as npz:
        return npz["counts"]


# ----------------------------------------------------------------------------- label-conditioned

@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc_lc")
    return root, write_voc_label_tree(root, num_train=4)


def independent_confusion(pairs: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """[4, n] intersect, union, pred, label with mmseg's rule (ignore 255 first, per-histogram drop)."""
    inter, pred_h, label_h = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for pred, gt in pairs:
        keep = gt != 255
        p, g = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
        inter += np.bincount(p[(p == g) & (p < n)], minlength=n)[:n]
        pred_h += np.bincount(p[p < n], minlength=n)[:n]
        label_h += np.bincount(g[g < n], minlength=n)[:n]
    return np.stack([inter, pred_h + label_h - inter, pred_h, label_h])


def miou_percent(counts: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):  # 0/0 = NaN: a class neither present nor predicted
        iou = counts[0].astype(np.float32) / counts[1].astype(np.float32)
        return float(np.round(np.float64(np.nanmean(iou)) * 100, 2))


def random_cams(root: Path, folder: Path, fmt: str, seed: int) -> list[tuple[np.ndarray, tuple[int, ...], np.ndarray]]:
    """CAMs of each image's GT classes in WeakTr's or CLIP-ES's format; (maps, labels, gt) per image."""
    card = load_card("voc_train")
    rng = np.random.default_rng(seed)
    out = []
    for ref in list_label_conditioned(card, root):
        gt = np.array(Image.open(ref.gt_path))
        labels = tuple(int(v) for v in np.unique(gt) if 0 < v < 255)
        maps = rng.random((len(labels), *gt.shape)).astype(np.float32)
        for k, c in enumerate(labels):
            maps[k][gt == c] = np.maximum(maps[k][gt == c], 0.7)
        if fmt == "weaktr":
            write_weaktr_cams(folder / f"{ref.image_id}.npy", {c - 1: m for c, m in zip(labels, maps)})
        else:
            write_clip_es_cams(folder / f"{ref.image_id}.npy", [c - 1 for c in labels], maps.astype(np.float16))
            maps = maps.astype(np.float16)
        out.append((maps, labels, gt))
    return out


def independent_pseudo(maps: np.ndarray, labels: tuple[int, ...], t: float, fmt: str) -> np.ndarray:
    """argmax over [t, CAMs]; WeakTr runs a float32 softmax first (hustvl/WeakTr@3457ad3 evaluation.py)."""
    stack = np.concatenate([np.full((1, *maps.shape[1:]), t, dtype=maps.dtype), maps])
    if fmt == "weaktr":
        stack = torch.softmax(torch.from_numpy(stack.astype(np.float32)), dim=0).numpy()
    keys = np.array((0, *labels))
    return keys[np.argmax(stack, axis=0)].astype(np.uint8)


@pytest.mark.parametrize("fmt", ["weaktr", "clip-es"])
def test_saved_cams_scan_the_threshold_curve_exactly(voc_tree, tmp_path, fmt):
    root, _ = voc_tree
    cams = random_cams(root, tmp_path / "cams", fmt, seed=7)
    code, _, stderr = predictions_run("voc_train", tmp_path / "out", tmp_path / "cams", root, "--bg-threshold", "0.4")
    assert code == 0, stderr
    result = only_result(tmp_path / "out")
    metrics = result["metrics"]
    assert result["dataset"]["track"] == "label-conditioned" and metrics["bg_threshold"] == "0.40"
    curve = {row["bg_threshold"]: row["mIoU"] for row in metrics["curve"]}
    assert len(curve) == 31
    for t in (0.3, 0.4, 0.47, 0.6):
        pairs = [(independent_pseudo(m, labels, t, fmt), gt) for m, labels, gt in cams]
        assert curve[f"{t:.2f}"] == miou_percent(independent_confusion(pairs, 21)), t
    fixed = independent_confusion([(independent_pseudo(m, l, 0.4, fmt), g) for m, l, g in cams], 21)
    assert result["counts"]["intersect"] == fixed[0].tolist() and metrics["mIoU"] == miou_percent(fixed)
    best = max(curve.values())
    assert metrics["best"]["mIoU"] == best and metrics["best"]["chosen_on_evaluated_split"] is True
    assert curve[metrics["best"]["bg_threshold"]] == best


def test_saved_pseudo_masks_are_scored_like_labels(voc_tree, tmp_path):
    root, _ = voc_tree
    card = load_card("voc_train")
    rng = np.random.default_rng(2)
    pairs = []
    for ref in list_label_conditioned(card, root):
        gt = np.array(Image.open(ref.gt_path))
        pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 0, gt), rng.integers(0, 21, gt.shape))
        pred = pred.astype(np.uint8)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(pred).save(tmp_path / "masks" / f"{ref.image_id}.png")
        pairs.append((pred, gt))
    code, _, stderr = predictions_run("voc_train", tmp_path / "out", tmp_path / "masks", root)
    assert code == 0, stderr
    result = only_result(tmp_path / "out")
    want = independent_confusion(pairs, 21)
    assert result["counts"]["union"] == want[1].tolist() and result["metrics"]["mIoU"] == miou_percent(want)
    assert "curve" not in result["metrics"] and result["metrics"]["labels_from"] == "gt"


def test_a_threshold_off_the_grid_and_inputs_of_other_methods_are_refused(voc_tree, tmp_path):
    root, _ = voc_tree
    random_cams(root, tmp_path / "cams", "weaktr", seed=1)
    code, _, stderr = predictions_run("voc_train", tmp_path / "out", tmp_path / "cams", root, "--bg-threshold", "0.333")
    assert code == 2 and "not on the grid" in stderr
    code, _, stderr = call_cli(run_argv("clip", "voc", tmp_path / "o2", "--bg-threshold", "0.4"))
    assert code == 2 and "--bg-threshold: not an input of method 'clip'" in stderr


def test_tracks_do_not_mix(voc_tree, tmp_path):
    root, _ = voc_tree
    code, _, stderr = call_cli(run_argv("clip", "voc_train", tmp_path / "out", data_root=root))
    assert code == 2 and "label-conditioned" in stderr


def test_compare_pairs_referring_results_on_their_samples(refer_root, tmp_path):
    write_referring_predictions(refer_root, "refcoco_val", tmp_path / "a", seed=11)
    write_referring_predictions(refer_root, "refcoco_val", tmp_path / "b", seed=12)
    for side in ("a", "b"):
        assert predictions_run("refcoco_val", tmp_path / f"out_{side}", tmp_path / side, refer_root)[0] == 0
    (a,), (b,) = result_jsons(tmp_path / "out_a"), result_jsons(tmp_path / "out_b")
    code, stdout, stderr = call_cli(["compare", a, b, "--resamples", "200"])
    assert code == 0, stderr
    from ovseg_bench.stats import load_with_per_image, paired_referring_bootstrap

    la, lb = load_with_per_image(a), load_with_per_image(b)
    diff = paired_referring_bootstrap(la.counts, lb.counts, resamples=200)
    assert diff.difference == round(load(b)["metrics"]["mIoU"] - load(a)["metrics"]["mIoU"], 2)
    assert "refcoco_val" in stdout and f"{diff.interval.low:+.2f}" in stdout


def test_labels_from_xml_is_an_option_recorded_and_fingerprinted(voc_tree, tmp_path):
    root, tree = voc_tree
    random_cams(root, tmp_path / "cams", "weaktr", seed=5)
    assert predictions_run("voc_train", tmp_path / "gt", tmp_path / "cams", root)[0] == 0
    code, _, stderr = predictions_run("voc_train", tmp_path / "xml", tmp_path / "cams", root, "--labels-from", "xml")
    assert code == 0, stderr
    by_gt, by_xml = only_result(tmp_path / "gt"), only_result(tmp_path / "xml")
    assert by_gt["metrics"]["labels_from"] == "gt" and by_xml["metrics"]["labels_from"] == "xml"
    assert by_xml["protocol"]["settings"]["labels_from"] == "xml"
    assert by_gt["protocol"]["fingerprint"] != by_xml["protocol"]["fingerprint"]


def test_leaderboard_gives_each_track_its_own_table_and_the_curve_its_chart(voc_tree, refer_root, tmp_path):
    root, _ = voc_tree
    random_cams(root, tmp_path / "cams", "weaktr", seed=3)
    write_referring_predictions(refer_root, "refcoco_val", tmp_path / "masks", seed=4)
    assert predictions_run("voc_train", tmp_path / "runs" / "lc", tmp_path / "cams", root)[0] == 0
    assert predictions_run("refcoco_val", tmp_path / "runs" / "ref", tmp_path / "masks", refer_root)[0] == 0
    code, _, stderr = call_cli(["leaderboard", "--results", tmp_path / "runs", "--out", tmp_path / "board" / "README.md"])
    assert code == 0, stderr
    board = (tmp_path / "board" / "README.md").read_text()
    assert "## label-conditioned · protocol `tcl`" in board and "## referring · protocol `tcl`" in board
    pages = {p.name: p.read_text() for p in (tmp_path / "board" / "details").glob("*.md")}
    lc_page = next(text for name, text in pages.items() if name.startswith("predictions__voc_train"))
    ref_page = next(text for name, text in pages.items() if name.startswith("predictions__refcoco_val"))
    assert "best threshold" in lc_page and "(chosen on the evaluated split)" in lc_page and "threshold curve" in lc_page
    assert "oIoU" in ref_page and "P@0.5" in ref_page
    charts = sorted(p.name for p in (tmp_path / "board" / "details").glob("*.png"))
    assert len(charts) == 1 and charts[0].startswith("predictions__voc_train")  # referring has no per-class chart


def interrupted_then_resumed(argv: list, out: Path, monkeypatch) -> dict:
    """Stop the run right after its first saved state (as a kill would), resume it; the result."""
    import ovseg_bench.plan as plan

    real = plan.save_partial

    def save_then_stop(path, state, identity):
        real(path, state, identity)
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "save_partial", save_then_stop)
    code, _, _ = call_cli(argv)
    assert code == 130 and not result_jsons(out) and list(out.glob("*.partial.pt"))
    monkeypatch.setattr(plan, "save_partial", real)
    code, _, stderr = call_cli([*argv, "--resume"])
    assert code == 0, stderr
    assert not list(out.glob("*.partial.pt"))
    return only_result(out)


@pytest.mark.parametrize("track", ["referring", "label-conditioned"])
def test_a_resumed_run_equals_an_uninterrupted_one(track, voc_tree, refer_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OVSEG_SAVE_EVERY", "1")
    if track == "referring":
        write_referring_predictions(refer_root, "refcoco_val", tmp_path / "p", seed=8)
        dataset, root = "refcoco_val", refer_root
    else:
        random_cams(voc_tree[0], tmp_path / "p", "clip-es", seed=8)
        dataset, root = "voc_train", voc_tree[0]
    argv = lambda out: run_argv("predictions", dataset, out, "--predictions", tmp_path / "p", data_root=root, tiny=False)
    assert call_cli(argv(tmp_path / "plain"))[0] == 0
    plain = only_result(tmp_path / "plain")
    resumed = interrupted_then_resumed(argv(tmp_path / "resumed"), tmp_path / "resumed", monkeypatch)
    assert resumed["counts"] == plain["counts"] and resumed["metrics"] == plain["metrics"]
    assert resumed["images"] == plain["images"]
    assert sidecar_rows(tmp_path / "resumed", resumed).tolist() == sidecar_rows(tmp_path / "plain", plain).tolist()


def test_data_check_serves_every_track(refer_root, voc_tree):
    code, stdout, _ = call_cli(["data", "check", "refcoco_val,voc_train", "--data-root", refer_root])
    assert code == 1  # synthetic counts differ from the published ones, and voc_train is not there
    rows = {line.split()[0]: line for line in stdout.splitlines()[2:]}
    assert "3 / 10834" in rows["refcoco_val"] and "count mismatch" in rows["refcoco_val"]
    assert "dataset folder missing" in rows["voc_train"]


def test_pictures_are_refused_off_the_semantic_track(refer_root, tmp_path):
    write_referring_predictions(refer_root, "refcoco_val", tmp_path / "p", seed=1)
    code, _, stderr = predictions_run("refcoco_val", tmp_path / "out", tmp_path / "p", refer_root, "--visualize", "2")
    assert code == 2 and "not on the semantic track" in stderr and stderr.count("\n") == 1
