"""``ovseg_bench.load_results``: one DataFrame row per result file written by the CLI."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

import ovseg_bench
from ovseg_bench.api import load_results, weights_label
from ovseg_bench.errors import DataError
from ovseg_bench.identity import config_digest
from tests.conftest import call_cli, result_jsons, run_argv

# The documented columns, in order (README "Python API"); method settings follow as setting.<key>.
COLUMNS = ["method", "variant", "config_sha256", "architecture", "weights", "random", "dataset", "track", "protocol",
           "fingerprint", "precision", "limit", "mIoU", "aAcc", "mAcc", "oIoU", "mIoU_ci_low", "mIoU_ci_high",
           "mIoU_ci_half_width", "images_seen", "images_expected", "seconds", "images_per_s", "path"]


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_tree) -> Path:
    """clip (tiny, random) on voc and voc20 (full synthetic splits), then voc with --limit 1 in a subfolder."""
    out = tmp_path_factory.mktemp("api_runs")
    data = synthetic_tree[0]
    for dataset, folder, extra in (("voc,voc20", out, ()), ("voc", out / "quick", ("--limit", "1"))):
        code, _, err = call_cli(run_argv("clip", dataset, folder, *extra, data_root=data))
        assert code == 0, err
    return out


def all_jsons(folder: Path) -> list[Path]:
    return result_jsons(folder) + result_jsons(folder / "quick")


def test_one_row_per_result_file_with_the_documented_columns(runs):
    frame = load_results(runs)
    files = all_jsons(runs)
    assert len(files) == 3 and len(frame) == 3
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS
    assert all(c.startswith("setting.") for c in frame.columns[len(COLUMNS):])
    assert {"setting.templates", "setting.logit_scale", "setting.attention"} <= set(frame.columns)
    # rows in the order of the relative paths: quick/... sorts after the top-level files
    assert [Path(p).name for p in frame["path"]] == [p.name for p in files]


def test_row_values_come_from_the_files(runs):
    frame = load_results(runs).set_index("path")
    for path in all_jsons(runs):
        result, row = load(path), frame.loc[str(path)]
        assert row["method"] == "clip" and row["dataset"] == result["dataset"]["name"]
        assert row["architecture"] == "tiny_vit" and row["weights"] == "none" and bool(row["random"]) is True
        assert row["protocol"] == "tcl" and row["fingerprint"] == result["protocol"]["fingerprint"]
        assert row["precision"] == "fp32" and row["track"] == "semantic"
        for key in ("mIoU", "aAcc", "mAcc"):
            assert row[key] == result["metrics"][key]
        assert row["images_seen"] == result["images"]["seen"] and row["images_expected"] == result["images"]["expected"]
        assert row["seconds"] == result["timing"]["seconds"]
        assert row["setting.templates"] == result["method"]["config"]["templates"]
        if "ci95" not in result["metrics"]:  # older files: NaN, not an error
            assert math.isnan(row["mIoU_ci_low"]) and math.isnan(row["mIoU_ci_high"])
    assert sorted(str(v) for v in frame["limit"]) == ["1", "<NA>", "<NA>"]


def test_confidence_interval_and_nested_settings_columns(runs, tmp_path):
    result = load(result_jsons(runs)[0])
    result["metrics"]["ci95"] = {"mIoU": [1.5, 2.75], "half_width": 0.62, "resamples": 1000, "seed": 0}
    result["method"]["config"]["pamr_settings"] = {"num_iter": 10, "dilations": [1, 2, 4]}
    (tmp_path / "one.json").write_text(json.dumps(result), encoding="utf-8")
    row = load_results(tmp_path / "one.json").iloc[0]  # a single file works too
    assert (row["mIoU_ci_low"], row["mIoU_ci_high"], row["mIoU_ci_half_width"]) == (1.5, 2.75, 0.62)
    assert row["setting.pamr_settings.num_iter"] == 10 and row["setting.pamr_settings.dilations"] == (1, 2, 4)


def test_pivot_as_in_the_readme(runs):
    frame = load_results(runs)
    table = frame[frame["limit"].isna()].pivot_table(index=["method", "weights"], columns="dataset",
                                                     values="mIoU")
    assert list(table.columns) == ["voc", "voc20"] and len(table) == 1


def test_weights_are_named_without_machine_paths():
    assert weights_label({"pretrained": "openai"}) == "openai"
    assert weights_label({"pretrained": "/home/me/ckpt/model.bin"}) == "model.bin"
    assert weights_label({"pretrained": "openai", "checkpoint": "https://x.org/a/tcl.pth",
                          "checkpoint_sha256": "0123456789abcdef"}) == "openai + tcl.pth (01234567)"
    assert weights_label({"predictions": "/data/masks/run3"}) == "run3"
    assert weights_label({}) == "–"


def test_missing_path_unknown_schema_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_results(tmp_path / "nowhere")
    empty = load_results(tmp_path)
    assert isinstance(empty, pd.DataFrame) and empty.empty and list(empty.columns) == COLUMNS
    (tmp_path / "x.json").write_text('{"schema": "ovseg-bench/result/v9"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.json.*ovseg-bench/result/v9"):
        load_results(tmp_path)
    (tmp_path / "x.json").write_text('{"schema": "ovseg-bench/result/v2", ', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.json: not a readable result file"):
        load_results(tmp_path)
    (tmp_path / "x.json").write_text('{"schema": "ovseg-bench/result/v2", "method": {}}', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.json: not a complete result file"):
        load_results(tmp_path)


def test_json_that_is_not_a_result_is_skipped_with_one_warning(runs, tmp_path):
    folder = tmp_path / "runs"
    shutil.copytree(runs, folder)
    (folder / "notes.json").write_text('{"title": "my notes"}', encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "other.json").write_text('{"schema": "something/else"}', encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        frame = load_results(folder)
    assert len(frame) == len(all_jsons(runs))
    assert [str(w.message) for w in caught] == [
        f"skipped 2 JSON file(s) that are not result files under {folder}: notes.json, sub/other.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean folder warns nothing
        load_results(runs)


def test_variant_and_config_digest_columns(runs, tmp_path):
    result = load(result_jsons(runs)[0])
    frame = load_results(runs)
    assert frame["variant"].isna().all()  # shipped configs
    assert list(frame["config_sha256"]) == [config_digest(load(p)["method"]["config"]) for p in all_jsons(runs)]
    older = json.loads(json.dumps(result))
    older["method"].pop("variant", None)
    older["method"].pop("config_sha256", None)
    (tmp_path / "older.json").write_text(json.dumps(older), encoding="utf-8")
    row = load_results(tmp_path / "older.json").iloc[0]  # written before the keys existed
    assert row["variant"] is None and row["config_sha256"] == config_digest(result["method"]["config"])
    result["method"].update(variant="my_thresh", config_sha256="ab" * 32)
    (tmp_path / "older.json").write_text(json.dumps(result), encoding="utf-8")
    row = load_results(tmp_path / "older.json").iloc[0]
    assert (row["variant"], row["config_sha256"]) == ("my_thresh", "ab" * 32)


def test_package_attribute_is_lazy():
    assert ovseg_bench.load_results is load_results
    with pytest.raises(AttributeError, match="no_such_thing"):
        ovseg_bench.no_such_thing  # noqa: B018
    probe = ("import sys, ovseg_bench\n"
             "assert 'pandas' not in sys.modules and 'ovseg_bench.api' not in sys.modules\n"
             "ovseg_bench.load_results\n"
             "assert 'pandas' in sys.modules\n")
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
