"""Results you can trust on disk (issue 10): no lost run, no silent overwrite, configs owned by
their method, skipped images and out-of-range predictions said out loud."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg_bench.datasets.cards import load_card
from ovseg_bench.datasets.listing import list_samples
from ovseg_bench.results import ResultKey
from tests.conftest import call_cli, read_gt, result_jsons, run_argv, unwritable

REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sclip_variant_config(tmp_path: Path, *, name: str = "sclip", variant_of: str | None = None) -> Path:
    text = (REPO / "configs" / "methods" / "sclip.yaml").read_text().replace("name: sclip", f"name: {name}")
    if variant_of:
        text += f"variant_of: {variant_of}\n"
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- item 1

def test_unwritable_output_fails_before_the_model_loads(tmp_path, synthetic_tree, monkeypatch):
    root, _ = synthetic_tree
    import ovseg_bench.methods.clip_model as clip_model

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the output folder was checked")

    monkeypatch.setattr(clip_model, "load_clip", no_loading)
    out = tmp_path / "locked"
    with unwritable(out):
        code, _, stderr = call_cli(run_argv("clip", "voc", out, data_root=root))
        nested_code, _, nested_err = call_cli(run_argv("clip", "voc", out / "sub" / "dir", data_root=root))
    assert code == 2 and nested_code == 2
    for err in (stderr, nested_err):
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --output") and "cannot write" in lines[0], err
    assert not any(out.rglob("*"))


def test_output_that_is_a_file_is_refused(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    (tmp_path / "file").write_text("x")
    code, _, stderr = call_cli(run_argv("clip", "voc", tmp_path / "file", data_root=root))
    assert code == 2 and "not a folder" in stderr


# ----------------------------------------------------------------------------- item 2

def test_runs_with_other_configs_or_backbones_keep_their_own_files(tmp_path, synthetic_tree, tiny_model):
    root, _ = synthetic_tree
    out = tmp_path / "runs"
    variant = sclip_variant_config(tmp_path, name="sclip_hot", variant_of="sclip")
    wide = tmp_path / "tiny_wide.json"
    config = json.loads(Path(tiny_model).read_text())
    config["vision_cfg"]["width"] = config["vision_cfg"]["width"] * 2
    wide.write_text(json.dumps(config))
    runs = [run_argv("sclip", "voc", out, data_root=root),
            run_argv("sclip", "voc", out, "--config", variant, data_root=root),
            [*run_argv("sclip", "voc", out, data_root=root, tiny=False), "--model", wide, "--pretrained", "none"]]
    for argv in runs:
        code, _, stderr = call_cli(argv)
        assert code == 0, stderr
        assert "replaced" not in stderr
    files = result_jsons(out)
    assert len(files) == 3, files
    results = [load(f) for f in files]
    assert sorted(str(r["method"]["variant"]) for r in results) == ["None", "None", "sclip_hot"]
    assert any(f.name.startswith("sclip@sclip_hot__voc__tcl__") for f in files)
    for path, result in zip(files, results):
        assert path.stem == ResultKey.of(result).stem
    code, _, stderr = call_cli(runs[1])  # the very same run again: replaces its own file and says so
    assert code == 0 and "replaced the earlier result of this same run" in stderr
    assert len(result_jsons(out)) == 3


def test_resume_still_refuses_a_finished_result_of_another_run(tmp_path, synthetic_tree):
    """A result whose file name is this run's but whose content is not (edited, or written by an
    older release) is refused under --resume, never silently taken."""
    root, _ = synthetic_tree
    out = tmp_path / "runs"
    assert call_cli(run_argv("clip", "voc", out, data_root=root))[0] == 0
    (path,) = result_jsons(out)
    result = load(path)
    result["method"]["config"]["logit_scale"] = 1.0
    path.write_text(json.dumps(result))
    code, _, stderr = call_cli(run_argv("clip", "voc", out, "--resume", data_root=root))
    assert code == 2 and "another run" in stderr and "method config" in stderr


# ----------------------------------------------------------------------------- item 4

def test_config_of_another_method_is_refused(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    code, _, stderr = call_cli(run_argv("clip", "voc", tmp_path / "out", "--config",
                                        REPO / "configs" / "methods" / "sclip.yaml", data_root=root))
    assert code == 2 and "is for method 'sclip', not 'clip'" in stderr and "variant_of: clip" in stderr
    assert not result_jsons(tmp_path / "out")


def test_variant_of_another_method_and_stolen_names_are_refused(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    wrong_parent = sclip_variant_config(tmp_path, name="mine", variant_of="naclip")
    code, _, stderr = call_cli(run_argv("clip", "voc", tmp_path / "out", "--config", wrong_parent, data_root=root))
    assert code == 2 and "variant of 'naclip', not of 'clip'" in stderr
    stolen = sclip_variant_config(tmp_path, name="naclip", variant_of="sclip")
    code, _, stderr = call_cli(run_argv("sclip", "voc", tmp_path / "out", "--config", stolen, data_root=root))
    assert code == 2 and "another registered method" in stderr


def test_declared_variant_runs_as_the_method_and_is_named(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    variant = sclip_variant_config(tmp_path, name="clip_like_sclip", variant_of="clip")
    code, _, stderr = call_cli(run_argv("clip", "voc", tmp_path / "out", "--config", variant, data_root=root))
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    result = load(path)
    assert result["method"]["name"] == "clip" and result["method"]["variant"] == "clip_like_sclip"
    assert result["method"]["config"]["attention"] == "sclip"


def test_an_edited_copy_under_the_method_name_is_a_digest_variant(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    edited = tmp_path / "clip.yaml"
    edited.write_text((REPO / "configs" / "methods" / "clip.yaml").read_text().replace("logit_scale: 40",
                                                                                        "logit_scale: 50"))
    same = tmp_path / "same.yaml"
    same.write_text((REPO / "configs" / "methods" / "clip.yaml").read_text())
    assert call_cli(run_argv("clip", "voc", tmp_path / "a", "--config", edited, data_root=root))[0] == 0
    assert call_cli(run_argv("clip", "voc", tmp_path / "b", "--config", same, data_root=root))[0] == 0
    (a,), (b,) = result_jsons(tmp_path / "a"), result_jsons(tmp_path / "b")
    assert load(a)["method"]["variant"].startswith("cfg-") and len(load(a)["method"]["variant"]) == 12
    assert load(b)["method"]["variant"] is None  # an identical copy is the shipped config


# ----------------------------------------------------------------------------- item 7

def write_predictions(root: Path, dataset: str, folder: Path, *, outside: int | None = None) -> None:
    card = load_card(dataset)
    for sample in list_samples(card, root):
        gt = read_gt(sample.gt_path, card.reduce_zero_label)
        pred = np.where(gt == 255, 0, gt).astype(np.uint8)
        if outside is not None:
            pred[0, 0] = outside
        target = folder / f"{sample.image_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(target)


def test_out_of_range_predictions_fail_unless_ignored(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    preds = tmp_path / "preds"
    write_predictions(root, "voc", preds, outside=21)
    argv = run_argv("predictions", "voc", tmp_path / "out", "--predictions", preds, data_root=root, tiny=False)
    code, _, stderr = call_cli(argv)
    assert code == 2 and "values 21 lie outside the 21 classes" in stderr
    assert "--predictions-out-of-range ignore" in stderr and not result_jsons(tmp_path / "out")
    code, _, stderr = call_cli([*argv, "--predictions-out-of-range", "ignore"])
    assert code == 0, stderr
    (path,) = result_jsons(tmp_path / "out")
    assert load(path)["method"]["config"]["out_of_range"] == "ignore"


def test_255_in_predictions_is_no_prediction(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    write_predictions(root, "voc", tmp_path / "preds", outside=255)
    code, _, stderr = call_cli(run_argv("predictions", "voc", tmp_path / "out", "--predictions", tmp_path / "preds",
                                        data_root=root, tiny=False))
    assert code == 0, stderr


def test_predictions_of_several_datasets_take_one_folder_each(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    preds = tmp_path / "preds"
    write_predictions(root, "voc", preds / "voc")
    write_predictions(root, "ade20k", tmp_path / "ade_elsewhere")
    base = run_argv("predictions", "voc,ade20k", tmp_path / "out", data_root=root, tiny=False)
    code, _, stderr = call_cli([*base, "--predictions", preds])
    assert code == 2 and "no folder for dataset 'ade20k'" in stderr and "ade20k=DIR" in stderr
    assert not result_jsons(tmp_path / "out")
    code, _, stderr = call_cli([*base, "--predictions", preds, "--predictions", f"ade20k={tmp_path / 'ade_elsewhere'}"])
    assert code == 0, stderr
    results = {load(p)["dataset"]["name"]: load(p) for p in result_jsons(tmp_path / "out")}
    assert results["voc"]["metrics"]["mIoU"] == 100.0 and results["ade20k"]["metrics"]["mIoU"] == 100.0
    assert results["ade20k"]["method"]["config"]["predictions"] == str((tmp_path / "ade_elsewhere").resolve())
    code, _, stderr = call_cli([*base, "--predictions", preds, "--predictions", f"context={preds}"])
    assert code == 2 and "does not evaluate" in stderr


def test_skipped_images_are_counted_on_the_console(tmp_path, synthetic_tree):
    root, ids = synthetic_tree
    data = tmp_path / "data"
    shutil.copytree(root / "VOCdevkit", data / "VOCdevkit")
    broken = list_samples(load_card("voc"), data)[0]
    broken.image_path.write_bytes(b"not a jpeg")
    code, _, stderr = call_cli(run_argv("clip", "voc", tmp_path / "out", "--on-error", "skip", data_root=data))
    assert code == 0, stderr
    assert f"voc: 1 image(s) skipped as unreadable (--on-error skip), not scored: {broken.image_id}" in stderr


def test_quiet_still_says_where_results_went(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    code, _, stderr = call_cli(run_argv("clip", "voc", tmp_path / "out", data_root=root))  # run_argv passes --quiet
    (path,) = result_jsons(tmp_path / "out")
    assert code == 0 and f"-> {path}" in stderr


def test_batch_size_and_workers_have_their_own_messages(tmp_path, synthetic_tree):
    root, _ = synthetic_tree
    code, _, batch = call_cli(run_argv("clip", "voc", tmp_path, "--batch-size", "0", data_root=root))
    assert code == 2 and "--batch-size 0" in batch and "--workers" not in batch
    code, _, workers = call_cli([*run_argv("clip", "voc", tmp_path, data_root=root, fast=False), "--workers", "-1"])
    assert code == 2 and "--workers -1" in workers and "--batch-size" not in workers


def test_version():
    code, out, _ = call_cli(["--version"])
    from ovseg_bench import __version__

    assert code == 0 and out.strip() == f"ovseg-bench {__version__}"
