"""Bootstrap statistics (ovseg_bench.stats), the ci95 block of result files and ``ovseg-bench compare``."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ovseg_bench.errors import DataError
from ovseg_bench.results import image_ids_digest, read_result, write_result
from ovseg_bench.stats import (bootstrap_ci, bootstrap_mious, ci_block, load_with_per_image, miou_from_totals,
                               paired_bootstrap, resample_indices)
from tests.conftest import call_cli, result_jsons, run_argv


def random_counts(seed: int, images: int = 12, classes: int = 7) -> np.ndarray:
    """Plausible int64 [images, 4, classes] counts: union = pred + label - intersect, some classes absent."""
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 400, size=(images, classes)) * (rng.random((images, classes)) < 0.6)
    label = rng.integers(0, 400, size=(images, classes)) * (rng.random((images, classes)) < 0.6)
    inter = (np.minimum(pred, label) * rng.random((images, classes))).astype(np.int64)
    return np.stack([inter, pred + label - inter, pred, label], axis=1).astype(np.int64)


def slow_miou(counts: np.ndarray, rows: np.ndarray) -> float:
    """The metric's rule written plainly: sum the drawn images, IoU per class with U > 0, mean."""
    inter = sum(counts[i, 0] for i in rows)
    union = sum(counts[i, 1] for i in rows)
    ious = [float(inter[c]) / float(union[c]) for c in range(counts.shape[2]) if union[c] > 0]
    return sum(ious) / len(ious) if ious else float("nan")


# ----------------------------------------------------------------------------- the arithmetic

def test_vectorised_bootstrap_equals_a_loop_over_resamples():
    counts = random_counts(1)
    indices = resample_indices(counts.shape[0], 200, seed=3)
    fast = bootstrap_mious(counts, indices)
    slow = np.array([slow_miou(counts, row) for row in indices])
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=0)


@pytest.mark.parametrize("block_elements", [9 * 7, 9 * 1000, 1 << 18])  # 7 resamples a block, all in one, default
def test_block_size_changes_neither_the_draws_nor_the_interval(monkeypatch, block_elements):
    counts = random_counts(2, images=9)
    indices = resample_indices(9, 50, seed=0)
    mious = bootstrap_mious(counts, indices)
    interval = bootstrap_ci(counts, resamples=50)
    monkeypatch.setattr("ovseg_bench.stats._BLOCK_ELEMENTS", block_elements)
    assert np.array_equal(resample_indices(9, 50, seed=0), indices)
    assert np.array_equal(bootstrap_mious(counts, indices), mious)
    assert bootstrap_ci(counts, resamples=50) == interval


def test_ci_is_the_percentile_interval_of_the_documented_resamples():
    counts = random_counts(3, images=25)
    mious = bootstrap_mious(counts, resample_indices(25, 1000, seed=0))
    low, high = np.percentile(mious * 100, [2.5, 97.5])
    interval = bootstrap_ci(counts)
    assert (interval.low, interval.high) == (round(low, 2), round(high, 2))


def test_indices_are_seeded_and_shaped():
    a, b = resample_indices(5, 1000, seed=0), resample_indices(5, 1000, seed=0)
    assert a.shape == (1000, 5) and a.dtype == np.int64 and a.min() >= 0 and a.max() <= 4
    assert np.array_equal(a, b)
    assert not np.array_equal(a, resample_indices(5, 1000, seed=1))


def test_ci_is_deterministic_and_contains_the_point_miou():
    counts = random_counts(4, images=40)
    first, again = bootstrap_ci(counts), bootstrap_ci(counts)
    assert first == again
    totals = counts.sum(0)
    point = 100 * float(miou_from_totals(totals[0], totals[1]))
    assert first.low <= point <= first.high
    assert first.half_width == round((first.high - first.low) / 2, 2) > 0
    assert bootstrap_ci(counts, seed=1) != first  # the seed matters (and is recorded)


def test_ci_block_layout_and_fewer_than_two_images():
    block = ci_block(random_counts(5))
    assert list(block) == ["mIoU", "half_width", "resamples", "seed", "method"]
    assert block["resamples"] == 1000 and block["seed"] == 0
    assert block["method"] == "percentile bootstrap over images"
    assert ci_block(random_counts(5, images=1)) is None


def test_classes_with_empty_union_are_left_out():
    inter, union = np.array([[1, 0, 0]]), np.array([[2, 0, 4]])
    assert miou_from_totals(inter, union)[0] == pytest.approx(0.25)  # (0.5 + 0) / 2, the U=0 class excluded
    assert np.isnan(miou_from_totals(np.zeros((1, 3)), np.zeros((1, 3)))[0])


def test_paired_bootstrap_of_a_result_with_itself_is_exactly_zero():
    counts = random_counts(6)
    diff = paired_bootstrap(counts, counts.copy())
    assert diff.difference == 0 and diff.interval.low == 0 and diff.interval.high == 0
    assert not diff.significant


def test_paired_bootstrap_finds_a_real_improvement_and_uses_the_same_images():
    a = random_counts(7, images=30)
    b = a.copy()
    b[:, 0] = np.minimum(b[:, 2], b[:, 3])  # B gets every overlapping pixel right
    b[:, 1] = b[:, 2] + b[:, 3] - b[:, 0]
    diff = paired_bootstrap(a, b, resamples=500, seed=2)
    assert diff.significant and diff.interval.low > 0
    indices = resample_indices(30, 500, seed=2)
    expected = bootstrap_mious(b, indices) - bootstrap_mious(a, indices)
    low, high = np.percentile(expected * 100, [2.5, 97.5])
    assert (diff.interval.low, diff.interval.high) == (round(low, 2), round(high, 2))
    assert paired_bootstrap(b, a, resamples=500, seed=2).interval.high < 0


def test_paired_bootstrap_refuses_mismatched_counts():
    with pytest.raises(DataError, match="same shape"):
        paired_bootstrap(random_counts(1, images=5), random_counts(1, images=6))
    with pytest.raises(DataError, match="at least 2 images"):
        paired_bootstrap(random_counts(1, images=1), random_counts(1, images=1))


# ----------------------------------------------------------------------------- real result files

@pytest.fixture(scope="module")
def two_methods(synthetic_tree, tmp_path_factory):
    """maskclip and clip on the same three voc images, plus maskclip with --limit 2 (another fingerprint)."""
    root, _ = synthetic_tree
    runs = {}
    for name, method, extra in (("a", "maskclip", ()), ("b", "clip", ()), ("limit", "maskclip", ("--limit", "2"))):
        out = tmp_path_factory.mktemp(f"stats_{name}")
        code, _, err = call_cli(run_argv(method, "voc", out, *extra, data_root=root))
        assert code == 0, err
        runs[name] = result_jsons(out)[0]
    return runs


def test_result_files_carry_ci95(two_methods):
    result = read_result(two_methods["a"])
    ci = result["metrics"]["ci95"]
    assert ci["resamples"] == 1000 and ci["seed"] == 0
    low, high = ci["mIoU"]
    assert low <= result["metrics"]["mIoU"] <= high
    loaded = load_with_per_image(two_methods["a"])
    assert ci == ci_block(loaded.counts)  # recomputable from the sidecar


def test_compare_prints_difference_interval_and_verdict(two_methods):
    code, out, err = call_cli(["compare", two_methods["a"], two_methods["b"]])
    assert code == 0, err
    a, b = read_result(two_methods["a"]), read_result(two_methods["b"])
    assert f"{b['metrics']['mIoU'] - a['metrics']['mIoU']:+.2f}" in out
    assert "95% CI of B-A" in out and "significant" in out
    row = next(line for line in out.splitlines() if line.startswith("voc"))
    assert row.split()[-1] in ("no", "better", "worse")


def test_compare_with_itself_and_on_folders(two_methods):
    code, out, _ = call_cli(["compare", two_methods["a"], two_methods["a"]])
    assert code == 0
    assert "[+0.00, +0.00]" in out and out.splitlines()[-1].split()[-1] == "no"
    code, out, err = call_cli(["compare", two_methods["a"].parent, two_methods["b"].parent])
    assert code == 0, err
    assert sum(line.startswith("voc ") for line in out.splitlines()) == 1


def test_compare_refuses_different_fingerprints(two_methods):
    code, _, err = call_cli(["compare", two_methods["a"], two_methods["limit"]])
    assert code == 2
    assert "different protocol fingerprints" in err
    assert str(two_methods["a"]) in err and str(two_methods["limit"]) in err


def test_compare_refuses_different_image_sets(two_methods, tmp_path):
    """A valid result (sidecar consistent) on other image ids, same fingerprint."""
    loaded = load_with_per_image(two_methods["b"])
    result = json.loads(two_methods["b"].read_text())
    ids = [f"other_{i}" for i in range(len(loaded.image_ids))]
    result["images"]["ids_sha256"] = image_ids_digest(ids)
    path = write_result(result, tmp_path, loaded.counts, ids)
    code, _, err = call_cli(["compare", two_methods["a"], path])
    assert code == 2
    assert "different image sets" in err


def test_compare_refuses_a_tampered_sidecar(two_methods, tmp_path):
    for file in two_methods["b"].parent.iterdir():
        shutil.copy(file, tmp_path / file.name)
    copy = tmp_path / two_methods["b"].name
    sidecar = tmp_path / read_result(copy)["per_image"]["file"]
    sidecar.write_bytes(sidecar.read_bytes() + b"\0")
    code, _, err = call_cli(["compare", two_methods["a"], copy])
    assert code == 2 and "sha256" in err and str(sidecar) in err


def test_a_one_image_run_has_no_ci(synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    code, _, err = call_cli(run_argv("clip", "voc", tmp_path, "--limit", "1", data_root=root))
    assert code == 0, err
    assert "ci95" not in read_result(result_jsons(tmp_path)[0])["metrics"]


def test_compare_rejects_a_bad_resample_count(two_methods):
    code, _, err = call_cli(["compare", two_methods["a"], two_methods["a"], "--resamples", "0"])
    assert code == 2 and "--resamples" in err


def folder_of_datasets(source, folder, *, variant=None):
    """Copies of one voc result (same sidecar) posing as other datasets; files named to sort alphabetically first."""
    folder.mkdir()
    for file in source.parent.iterdir():
        shutil.copy(file, folder / file.name)
    result = json.loads(source.read_text())
    result["method"]["variant"] = variant
    (folder / source.name).write_text(json.dumps(result))
    for name, dataset in (("a_demo.json", "demo"), ("b_ade20k.json", "ade20k"), ("c_context.json", "context")):
        result["dataset"]["name"] = dataset
        (folder / name).write_text(json.dumps(result))
    (folder / "notes.json").write_text('{"title": "not a result"}')
    return folder


def test_compare_folders_in_benchmark_order_and_names_variants(two_methods, tmp_path):
    a = folder_of_datasets(two_methods["a"], tmp_path / "a")
    b = folder_of_datasets(two_methods["b"], tmp_path / "b", variant="my_thresh")
    code, out, err = call_cli(["compare", a, b, "--resamples", "50"])
    assert code == 0, err
    datasets = [line.split()[0] for line in out.splitlines()
                if line.split() and line.split()[0] in ("voc", "context", "ade20k", "demo")]
    assert datasets == ["voc", "context", "ade20k", "demo"]  # ALL_BENCHMARKS order, others after
    assert "B: clip@my_thresh RANDOM WEIGHTS" in out and "A: maskclip RANDOM WEIGHTS" in out
    assert f"note: skipped 1 JSON file(s) that are not result files under {a}: notes.json" in err


def test_compare_refuses_two_runs_of_one_dataset_in_a_folder(two_methods, tmp_path):
    a = folder_of_datasets(two_methods["a"], tmp_path / "a")
    twin = json.loads(two_methods["a"].read_text())
    twin["method"]["variant"] = "my_thresh"
    (a / "z_twin.json").write_text(json.dumps(twin))
    code, _, err = call_cli(["compare", a, two_methods["b"].parent])
    assert code == 2 and "two results for dataset 'voc'" in err and "maskclip@my_thresh" in err
