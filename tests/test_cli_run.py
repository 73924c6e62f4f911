"""End-to-end ``ovseg-bench run`` / ``list`` / ``data check`` on the synthetic tree and the tiny model."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ovseg_bench.datasets.cards import ALL_BENCHMARKS, load_card
from ovseg_bench.datasets.listing import list_samples
from ovseg_bench.identity import config_digest
from ovseg_bench.results import run_digest
from tests.conftest import call_cli, read_gt, result_jsons, run_argv

NUM_CLASSES = {"voc": 21, "voc20": 20, "context": 60, "context59": 59, "coco_stuff": 171,
               "coco_object": 81, "cityscapes": 19, "ade20k": 150}
COUNT_KEYS = ("intersect", "union", "pred", "label")
PROTOCOLS = {"tcl": {"short": 448, "long": 2048, "crop": 448, "stride": 224, "names": "mmseg"},
             "sclip": {"short": 336, "long": 2048, "crop": 224, "stride": 112, "names": "sclip"}}
SCLIP_SHORT = {"coco_stuff": 448, "cityscapes": 560}


# ----------------------------------------------------------------------------- helpers

def load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def only_result(folder: Path) -> dict:
    files = result_jsons(folder)
    assert len(files) == 1, files
    return load(files[0])


def gt_histogram(data_root: Path, dataset: str) -> tuple[np.ndarray, int]:
    """Per-class GT pixel counts and the number of non-ignored pixels, from the files themselves."""
    card = load_card(dataset)
    hist = np.zeros(card.num_classes, dtype=np.int64)
    valid = 0
    for sample in list_samples(card, data_root):
        gt = read_gt(sample.gt_path, card.reduce_zero_label)
        keep = gt != 255
        valid += int(keep.sum())
        hist += np.bincount(gt[keep].astype(np.int64), minlength=card.num_classes)[: card.num_classes]
    return hist, valid


def expected_windows(data_root: Path, dataset: str, protocol: str) -> int:
    """Slide windows over the split, with the resize and grid spelled out here independently."""
    p = PROTOCOLS[protocol]
    short = SCLIP_SHORT.get(dataset, p["short"]) if protocol == "sclip" else p["short"]
    total = 0
    for sample in list_samples(load_card(dataset), data_root):
        from PIL import Image

        with Image.open(sample.image_path) as img:
            width, height = img.size
        factor = min(max(p["long"], short) / max(width, height), min(p["long"], short) / min(width, height))
        new_w, new_h = int(width * factor + 0.5), int(height * factor + 0.5)
        rows = -(-max(new_h - p["crop"], 0) // p["stride"]) + 1
        cols = -(-max(new_w - p["crop"], 0) // p["stride"]) + 1
        total += rows * cols
    return total


def check_counts(result: dict, num_classes: int) -> dict[str, np.ndarray]:
    counts = {k: np.asarray(result["counts"][k], dtype=np.int64) for k in COUNT_KEYS}
    for key, values in counts.items():
        assert values.shape == (num_classes,), key
        assert (values >= 0).all(), key
    assert np.array_equal(counts["union"], counts["pred"] + counts["label"] - counts["intersect"])
    assert (counts["intersect"] <= np.minimum(counts["pred"], counts["label"])).all()
    return counts


def per_image(folder: Path, result: dict) -> tuple[np.ndarray, list[str]]:
    sidecar = Path(folder) / result["per_image"]["file"]
    assert sidecar.is_file()
    assert hashlib.sha256(sidecar.read_bytes()).hexdigest() == result["per_image"]["sha256"]
    with np.load(sidecar) as npz:
        return npz["counts"], [str(i) for i in npz["image_ids"]]


# ------------------------------------------------------------ --method maskclip --dataset all

@pytest.fixture(scope="module")
def maskclip_all(synthetic_tree, tmp_path_factory):
    """One ``run --method maskclip --dataset all`` shared by the checks below."""
    root, ids = synthetic_tree
    out = tmp_path_factory.mktemp("maskclip_all")
    code, stdout, stderr = call_cli(run_argv("maskclip", "all", out, data_root=root))
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "root": root, "ids": ids,
            "results": {load(p)["dataset"]["name"]: (p, load(p)) for p in result_jsons(out)}}


def test_maskclip_all_writes_eight_results(maskclip_all):
    assert maskclip_all["code"] == 0, maskclip_all["stderr"]
    assert sorted(maskclip_all["results"]) == sorted(ALL_BENCHMARKS)
    assert len(result_jsons(maskclip_all["out"])) == 8
    assert len(list(maskclip_all["out"].glob("*.per_image.npz"))) == 8
    assert not [p for p in maskclip_all["out"].iterdir() if p.name.startswith(".")]  # no temp files left
    fingerprints = {r["protocol"]["fingerprint"] for _, r in maskclip_all["results"].values()}
    assert len(fingerprints) == 1  # one preset, one precision: one fingerprint for every dataset


@pytest.mark.parametrize("dataset", ALL_BENCHMARKS)
def test_maskclip_all_result_file(maskclip_all, dataset):
    assert maskclip_all["code"] == 0, maskclip_all["stderr"]
    path, result = maskclip_all["results"][dataset]
    root, ids = maskclip_all["root"], maskclip_all["ids"][dataset]
    card = load_card(dataset)
    n = NUM_CLASSES[dataset]

    assert result["schema"] == "ovseg-bench/result/v2"
    assert list(result)[:4] == ["schema", "method", "dataset", "protocol"]
    run = run_digest(result["method"]["weights"], result["method"]["config"])
    assert path.name == f"maskclip__{dataset}__tcl__{result['protocol']['fingerprint'][:8]}__{run[:8]}.json"
    assert result["method"]["variant"] is None
    assert result["method"]["config_sha256"] == config_digest(result["method"]["config"])
    assert result["method"]["name"] == "maskclip"
    assert result["method"]["weights"]["random"] is True
    assert result["method"]["weights"]["pretrained"] == "none"
    assert result["dataset"]["name"] == dataset
    assert result["dataset"]["num_classes"] == n == card.num_classes
    assert len(result["dataset"]["classes"]) == n
    assert result["dataset"]["data_root"] == str(root.resolve())
    assert result["protocol"]["preset"] == "tcl" and result["protocol"]["precision"] == "fp32"
    assert result["protocol"]["settings"]["classnames"] == "mmseg"

    images = result["images"]
    assert images["seen"] == images["listed"] == len(ids) == 3
    assert images["expected"] == card.num_images
    assert images["skipped"] == []
    assert images["windows"] == expected_windows(root, dataset, "tcl")
    assert images["ids_sha256"] == hashlib.sha256("\n".join(ids).encode()).hexdigest()

    counts = check_counts(result, n)
    hist, valid = gt_histogram(root, dataset)
    assert np.array_equal(counts["label"], hist)  # label counts are the GT histogram after reduce_zero_label
    assert counts["label"].sum() == valid
    assert counts["pred"].sum() == valid  # every non-ignored pixel gets exactly one in-range prediction

    metrics = result["metrics"]
    assert set(metrics["per_class"]) == set(card.class_names())
    assert 0.0 <= metrics["mIoU"] <= 100.0 and 0.0 <= metrics["aAcc"] <= 100.0
    assert metrics["aAcc"] == pytest.approx(100 * counts["intersect"].sum() / valid, abs=0.006)

    rows, sidecar_ids = per_image(maskclip_all["out"], result)
    assert rows.shape == (3, 4, n) and rows.dtype == np.int64
    assert sidecar_ids == ids
    totals = np.stack([counts[k] for k in COUNT_KEYS])
    assert np.array_equal(rows.sum(0), totals)


def test_maskclip_all_summary_table(maskclip_all):
    assert maskclip_all["code"] == 0, maskclip_all["stderr"]
    stdout = maskclip_all["stdout"]
    assert "RANDOM WEIGHTS" in stdout
    lines = stdout.rstrip("\n").splitlines()
    names = [line.split()[0] for line in lines[-9:]]  # the table ends with the 8 datasets and Avg
    assert names == [*ALL_BENCHMARKS, "Avg"], stdout
    assert lines[-11].split() == ["dataset", "mIoU", "aAcc", "mAcc", "fingerprint", "items"]
    mious = [r["metrics"]["mIoU"] for _, r in maskclip_all["results"].values()]
    avg = float(lines[-1].split()[1])
    assert avg == pytest.approx(sum(mious) / len(mious), abs=0.006)
    for dataset in ALL_BENCHMARKS:
        row = next(line for line in lines if line.split()[0] == dataset)
        assert f"3/{load_card(dataset).num_images}" in row


# ------------------------------------------------------------ each method under both protocols

FAMILY_DATASET = {"clip": "cityscapes", "maskclip": "voc20", "sclip": "voc", "clearclip": "voc", "naclip": "context59"}


@pytest.mark.parametrize("protocol", ["tcl", "sclip"])
@pytest.mark.parametrize("method", sorted(FAMILY_DATASET))
def test_family_method_under_both_protocols(synthetic_tree, tmp_path, method, protocol):
    root, ids = synthetic_tree
    dataset = FAMILY_DATASET[method]
    code, stdout, stderr = call_cli(run_argv(method, dataset, tmp_path, "--protocol", protocol, data_root=root))
    assert code == 0, stderr
    result = only_result(tmp_path)
    n = NUM_CLASSES[dataset]
    assert result["method"]["name"] == method
    assert result["method"]["weights"]["random"] is True
    assert result["protocol"]["preset"] == protocol
    assert result["protocol"]["settings"]["classnames"] == PROTOCOLS[protocol]["names"]
    assert result["protocol"]["settings"]["crop"] == PROTOCOLS[protocol]["crop"]
    assert result["dataset"]["num_classes"] == n
    assert result["images"]["seen"] == len(ids[dataset]) == 3
    assert result["images"]["windows"] == expected_windows(root, dataset, protocol)
    counts = check_counts(result, n)
    hist, valid = gt_histogram(root, dataset)
    assert np.array_equal(counts["label"], hist)
    assert counts["pred"].sum() == valid
    rows, _ = per_image(tmp_path, result)
    assert np.array_equal(rows.sum(0), np.stack([counts[k] for k in COUNT_KEYS]))
    assert "RANDOM WEIGHTS" in stdout and dataset in stdout


def test_protocols_have_different_fingerprints(synthetic_tree, tmp_path):
    root, _ = synthetic_tree
    _write_zero_predictions(root, "voc", tmp_path / "preds")  # model-free runs
    prints = []
    for protocol in ("tcl", "sclip"):
        out = tmp_path / protocol
        code, _, stderr = call_cli(run_argv("predictions", "voc", out, "--protocol", protocol,
                                            "--predictions", tmp_path / "preds", data_root=root, tiny=False))
        assert code == 0, stderr
        prints.append(only_result(out)["protocol"]["fingerprint"])
    assert prints[0] != prints[1]


def _write_zero_predictions(root: Path, dataset: str, folder: Path) -> None:
    from PIL import Image

    for sample in list_samples(load_card(dataset), root):
        gt = np.array(Image.open(sample.gt_path))
        target = folder / f"{sample.image_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros_like(gt, dtype=np.uint8)).save(target)


# ------------------------------------------------------------ demo, determinism

def test_demo_needs_no_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("OVSEG_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # ./data does not exist here
    out = tmp_path / "runs"
    code, stdout, stderr = call_cli(run_argv("maskclip", "demo", out))
    assert code == 0, stderr
    result = only_result(out)
    assert result["dataset"]["name"] == "demo"
    assert result["dataset"]["data_root"] == "(embedded)"
    assert result["dataset"]["num_classes"] == 7
    assert result["images"]["seen"] == result["images"]["expected"] == 5
    check_counts(result, 7)
    assert "demo" in stdout and "5/5" in stdout


@pytest.fixture(scope="module")
def determinism_runs(synthetic_tree, tmp_path_factory):
    """maskclip on voc20 under the sclip protocol (18 windows of 224 over 3 images, so batches mix
    images): the same run twice, with 2 workers, with batch sizes 1 and 7; plus a tcl run."""
    root, _ = synthetic_tree
    variants = {"a": [], "b": [], "workers2": ["--workers", "2"], "batch1": ["--batch-size", "1"],
                "batch7": ["--batch-size", "7"], "tcl": ["--protocol", "tcl"]}
    runs = {}
    for name, extra in variants.items():
        out = tmp_path_factory.mktemp(f"det_{name}")
        argv = run_argv("maskclip", "voc20", out, data_root=root)
        if extra[:1] == ["--workers"]:
            at = argv.index("--workers")
            del argv[at:at + 2]
        if extra[:1] != ["--protocol"]:
            argv += ["--protocol", "sclip"]
        code, _, stderr = call_cli(argv + extra)
        assert code == 0, f"{name}: {stderr}"
        result = only_result(out)
        runs[name] = (result, per_image(out, result)[0])
    return runs


def test_determinism_setup_batches_across_images(determinism_runs, synthetic_tree):
    root, _ = synthetic_tree
    result = determinism_runs["a"][0]
    assert result["protocol"]["preset"] == "sclip"
    assert result["images"]["windows"] == expected_windows(root, "voc20", "sclip") == 18


@pytest.mark.parametrize("variant", ["b", "workers2", "batch1", "batch7"])
def test_counts_do_not_depend_on_rerun_workers_or_batch_size(determinism_runs, variant):
    base_result, base_rows = determinism_runs["a"]
    result, rows = determinism_runs[variant]
    assert result["counts"] == base_result["counts"]
    assert np.array_equal(rows, base_rows)  # per image, not just in total
    assert result["metrics"] == base_result["metrics"]
    assert result["images"]["ids_sha256"] == base_result["images"]["ids_sha256"]
    assert result["protocol"]["fingerprint"] == base_result["protocol"]["fingerprint"]


def test_workers_and_batch_size_are_recorded(determinism_runs):
    assert determinism_runs["workers2"][0]["timing"]["workers"] == 2
    assert determinism_runs["batch1"][0]["timing"]["batch_size"] == 1
    assert determinism_runs["batch7"][0]["timing"]["batch_size"] == 7


def test_single_dataset_run_equals_its_part_of_all(determinism_runs, maskclip_all):
    """The other datasets of a plan and their order do not change a dataset's counts."""
    _, result = maskclip_all["results"]["voc20"]
    tcl, rows = determinism_runs["tcl"]
    assert tcl["protocol"]["fingerprint"] == result["protocol"]["fingerprint"]
    assert result["counts"] == tcl["counts"]
    assert np.array_equal(per_image(maskclip_all["out"], result)[0], rows)


# ------------------------------------------------------------ list and data check

def test_list_methods(cli):
    code, stdout, _ = cli("list", "methods")
    assert code == 0
    names = {line.split()[0] for line in stdout.splitlines()[2:] if line.strip()}
    assert {"clip", "maskclip", "sclip", "clearclip", "naclip", "predictions"} <= names
    assert "semantic" in stdout


def test_list_datasets(cli):
    code, stdout, _ = cli("list", "datasets")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[2:] if line.strip()}
    for dataset, n in NUM_CLASSES.items():
        assert dataset in rows
        assert str(n) in rows[dataset]
    assert "demo" in rows


def test_list_protocols(cli):
    code, stdout, _ = cli("list", "protocols")
    assert code == 0
    names = {line.split()[0] for line in stdout.splitlines()[2:] if line.strip() and not line.startswith(" ")}
    assert {"tcl", "sclip"} <= names


def test_list_rejects_unknown_kind(cli):
    code, _, stderr = cli("list", "models")
    assert code == 2
    assert "models" in stderr


def test_console_script_entry_point():
    script = Path(sys.executable).with_name("ovseg-bench")
    if not script.is_file():
        pytest.skip("console script not installed beside this interpreter")
    done = subprocess.run([str(script), "list", "datasets"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ALL_BENCHMARKS)


def test_data_check_reports_count_mismatch(cli, synthetic_tree):
    root, _ = synthetic_tree
    code, stdout, _ = cli("data", "check", "voc", "--data-root", root)
    assert code == 1  # 3 images, the card expects 1449
    assert "voc" in stdout and "3 / 1449" in stdout and "count mismatch" in stdout
    assert "dataset" in stdout.splitlines()[0]  # a table header


def test_data_check_all_on_synthetic_tree(cli, synthetic_tree):
    root, _ = synthetic_tree
    code, stdout, _ = cli("data", "check", "--data-root", root)
    assert code == 1
    for dataset in ALL_BENCHMARKS:
        row = next(line for line in stdout.splitlines() if line.split()[:1] == [dataset])
        assert f"3 / {load_card(dataset).num_images}" in row and "count mismatch" in row


def test_data_check_names_missing_parts_on_empty_root(cli, tmp_path):
    code, stdout, _ = cli("data", "check", "voc", "cityscapes", "--data-root", tmp_path)
    assert code == 1
    assert "missing" in stdout
    assert str(tmp_path / "VOCdevkit" / "VOC2012") in stdout
    assert str(tmp_path / "cityscapes") in stdout
    assert "not found" in stdout


def test_data_check_names_missing_data_root(cli, tmp_path):
    gone = tmp_path / "nowhere"
    code, stdout, _ = cli("data", "check", "ade20k", "--data-root", gone)
    assert code == 1
    assert str(gone) in stdout and "does not exist" in stdout


def test_data_check_names_missing_split_file(cli, tmp_path):
    from tests.synthetic import write_dataset

    write_dataset("context", tmp_path, num_images=2)
    split = tmp_path / "VOCdevkit" / "VOC2010" / "ImageSets" / "SegmentationContext" / "val.txt"
    split.unlink()
    code, stdout, _ = cli("data", "check", "context", "--data-root", tmp_path)
    assert code == 1
    assert str(split) in stdout and "not found" in stdout
