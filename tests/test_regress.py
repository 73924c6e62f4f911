"""``ovseg-bench regress``: exit codes, exact-counts mode, --update, and the example CI workflow."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ovseg_bench.engine.metrics import summarize
from ovseg_bench.regress import BASELINE_SCHEMA, read_baseline
from tests.conftest import call_cli, result_jsons, run_argv

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "ovseg-regress.yml"


@pytest.fixture(scope="module")
def runs(synthetic_tree, tmp_path_factory):
    """Real results: maskclip on voc and voc20 (the baseline run), and on voc with --limit 2."""
    root, _ = synthetic_tree
    base = tmp_path_factory.mktemp("regress_base")
    code, _, err = call_cli(run_argv("maskclip", "voc,voc20", base, data_root=root))
    assert code == 0, err
    limited = tmp_path_factory.mktemp("regress_limit")
    code, _, err = call_cli(run_argv("maskclip", "voc", limited, "--limit", "2", data_root=root))
    assert code == 0, err
    baseline = tmp_path_factory.mktemp("regress_baseline") / "ci" / "baseline.json"
    code, out, err = call_cli(["regress", "--results", base, "--baseline", baseline, "--update"])
    assert code == 0, err
    return {"base": base, "limited": limited, "baseline": baseline, "update_out": out}


def copy_results(folder: Path, dest: Path) -> dict[str, Path]:
    """Copy a results folder; dataset name -> copied JSON path."""
    shutil.copytree(folder, dest)
    return {json.loads(p.read_text())["dataset"]["name"]: p for p in result_jsons(dest)}


def edit_counts(path: Path, change) -> dict:
    """Apply ``change(counts)`` to a result's counts and recompute its metrics like the runner does."""
    result = json.loads(path.read_text())
    counts = result["counts"]
    change(counts)
    counts["union"] = [p + l - i for i, p, l in zip(counts["intersect"], counts["pred"], counts["label"])]
    summary = summarize(*(torch.tensor(counts[k]) for k in ("intersect", "union", "label")))
    result["metrics"].update(mIoU=summary.miou, aAcc=summary.aacc, mAcc=summary.macc)
    path.write_text(json.dumps(result, indent=2))
    return result


def regress(results: Path, baseline: Path, *extra: object):
    return call_cli(["regress", "--results", results, "--baseline", baseline, *extra])


def test_update_writes_a_stable_sorted_baseline(runs, tmp_path):
    entries = read_baseline(runs["baseline"])
    assert sorted(entries) == ["maskclip/voc/tcl", "maskclip/voc20/tcl"]
    voc = entries["maskclip/voc/tcl"]
    result = json.loads(next(p for p in result_jsons(runs["base"]) if "__voc__" in p.name).read_text())
    assert voc["counts"] == result["counts"] and voc["mIoU"] == result["metrics"]["mIoU"]
    assert voc["fingerprint"] == result["protocol"]["fingerprint"]
    assert voc["images"]["ids_sha256"] == result["images"]["ids_sha256"]
    text = runs["baseline"].read_text()
    assert json.loads(text)["schema"] == BASELINE_SCHEMA
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    again = tmp_path / "again.json"
    assert regress(runs["base"], again, "--update")[0] == 0
    assert again.read_bytes() == runs["baseline"].read_bytes()  # round trip: same results, same bytes
    assert "wrote 2 entries" in runs["update_out"]
    assert not [p for p in runs["baseline"].parent.iterdir() if p.name.startswith(".")]


def test_unchanged_results_pass_in_both_modes(runs):
    code, out, err = regress(runs["base"], runs["baseline"])
    assert code == 0, out + err
    assert "PASSED" in out and "+0.00" in out
    code, out, _ = regress(runs["base"], runs["baseline"], "--tolerance", "0")
    assert code == 0 and "exact-counts mode" in out and out.count(" same") == 2


def test_improved_result_passes(runs, tmp_path):
    files = copy_results(runs["base"], tmp_path / "now")

    def perfect(counts):  # every overlapping pixel right
        counts["intersect"] = [min(p, l) for p, l in zip(counts["pred"], counts["label"])]

    edit_counts(files["voc"], perfect)
    code, out, _ = regress(tmp_path / "now", runs["baseline"])
    assert code == 0
    assert "improved" in out


def test_regressed_result_fails(runs, tmp_path):
    files = copy_results(runs["base"], tmp_path / "now")
    assert read_baseline(runs["baseline"])["maskclip/voc/tcl"]["mIoU"] > 0.3  # so dropping to 0 is > tolerance

    def nothing_right(counts):
        counts["intersect"] = [0] * len(counts["intersect"])

    edit_counts(files["voc"], nothing_right)
    code, out, _ = regress(tmp_path / "now", runs["baseline"], "--tolerance", "0.3")
    assert code == 1
    row = next(line for line in out.splitlines() if " voc " in line)
    assert "REGRESSED" in row and "0.00" in row
    assert "FAILED" in out and "maskclip/voc/tcl: REGRESSED: mIoU dropped" in out


def test_incomparable_fingerprint_exits_2_and_says_which(runs, tmp_path):
    now = tmp_path / "now"
    shutil.copytree(runs["limited"], now)  # voc with --limit 2: another fingerprint, and voc20 is missing
    code, out, _ = regress(now, runs["baseline"])
    assert code == 2
    assert "NOT COMPARABLE" in out and "maskclip/voc/tcl: NOT COMPARABLE: protocol fingerprint" in out
    assert "limit None vs 2" in out
    assert "MISSING" in out  # voc20 is still reported


def test_exact_mode_fails_on_one_pixel_and_names_the_class(runs, tmp_path):
    files = copy_results(runs["base"], tmp_path / "now")
    base = read_baseline(runs["baseline"])["maskclip/voc20/tcl"]
    moved = next(c for c, value in enumerate(base["counts"]["intersect"]) if value > 0)
    name = base["classes"][moved]

    def one_pixel(counts):  # one pixel of `moved` now predicted wrong
        counts["intersect"][moved] -= 1

    edit_counts(files["voc20"], one_pixel)
    assert regress(tmp_path / "now", runs["baseline"])[0] == 0  # within the 0.3 tolerance
    code, out, _ = regress(tmp_path / "now", runs["baseline"], "--tolerance", "0")
    assert code == 1
    assert "maskclip/voc20/tcl: counts moved in 1 class(es)" in out
    row = next(line for line in out.splitlines() if f" {name} " in line)
    assert row.split()[:4] == [str(moved), name, "-1", "+1"]  # intersect -1, union +1
    assert "maskclip/voc/tcl" not in out.split("counts moved")[1]  # only the entry that moved is detailed


def test_missing_and_new_entries(runs, tmp_path):
    now = tmp_path / "now"
    files = copy_results(runs["base"], now)
    files["voc20"].unlink()
    code, out, _ = regress(now, runs["baseline"])
    assert code == 1 and "maskclip/voc20/tcl: MISSING" in out

    extra = tmp_path / "extra"
    shutil.copytree(runs["base"], extra)
    shutil.copytree(runs["limited"], extra / "more")  # recursive: a voc result under another key
    for path in result_jsons(extra / "more"):
        result = json.loads(path.read_text())
        result["method"]["name"] = "maskclip_variant"
        path.write_text(json.dumps(result))
    code, out, _ = regress(extra, runs["baseline"])
    assert code == 0
    assert next(line for line in out.splitlines() if line.startswith("maskclip_variant")).endswith("new")


def test_bad_inputs_exit_2_with_a_message(runs, tmp_path):
    code, _, err = regress(runs["base"], tmp_path / "none.json")
    assert code == 2 and "--update" in err and "not found" in err
    code, _, err = regress(tmp_path, runs["baseline"])
    assert code == 2 and "no result files" in err
    code, _, err = regress(runs["base"], runs["baseline"], "--tolerance", "-1")
    assert code == 2 and "--tolerance" in err
    twice = tmp_path / "twice"
    shutil.copytree(runs["base"], twice / "one")
    shutil.copytree(runs["base"], twice / "two")
    code, _, err = regress(twice, runs["baseline"])
    assert code == 2 and "two results" in err


def test_example_workflow_parses_and_runs_the_gate():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    job = next(iter(jobs.values()))
    assert job["runs-on"] == ["self-hosted", "gpu"]
    commands = "\n".join(step.get("run", "") for step in job["steps"])
    assert "pip install" in commands
    assert "ovseg-bench run --method tcl --checkpoint" in commands and "--limit 300" in commands
    assert "--dataset voc,ade20k" in commands and "--output runs/ci" in commands
    assert "ovseg-bench regress --results runs/ci --baseline ci/baseline.json --tolerance 0.3" in commands
    uploads = [step for step in job["steps"] if str(step.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["if"] == "always()" and "runs/ci" in uploads[0]["with"]["path"]


def test_a_baseline_beside_the_results_is_not_read_as_a_result(runs, tmp_path):
    now = tmp_path / "now"
    shutil.copytree(runs["base"], now)
    shutil.copy(runs["baseline"], now / "baseline.json")
    code, out, err = regress(now, now / "baseline.json")
    assert code == 0, out + err
    code, _, err = regress(now, now / "baseline.json", "--update")
    assert code == 0 and read_baseline(now / "baseline.json") == read_baseline(runs["baseline"])


def as_variant(path: Path, variant: str) -> None:
    """Turn a result file into a run of a config variant (as the writer records it)."""
    result = json.loads(path.read_text())
    result["method"]["variant"] = variant
    path.write_text(json.dumps(result))


def test_update_merges_and_lists_what_it_replaced(runs, tmp_path):
    baseline = tmp_path / "baseline.json"
    shutil.copy(runs["baseline"], baseline)
    now = tmp_path / "now"
    files = copy_results(runs["base"], now)
    files["voc20"].unlink()  # this job reran voc only

    def nothing_right(counts):
        counts["intersect"] = [0] * len(counts["intersect"])

    edit_counts(files["voc"], nothing_right)
    variant = now / "variant"
    shutil.copytree(runs["limited"], variant)
    for path in result_jsons(variant):
        as_variant(path, "my_thresh")
    code, out, err = regress(now, baseline, "--update")
    assert code == 0, err
    entries = read_baseline(baseline)
    assert sorted(entries) == ["maskclip/voc/tcl", "maskclip/voc20/tcl", "maskclip@my_thresh/voc/tcl"]
    assert entries["maskclip/voc20/tcl"] == read_baseline(runs["baseline"])["maskclip/voc20/tcl"]  # kept
    assert entries["maskclip/voc/tcl"]["mIoU"] == 0.0
    assert entries["maskclip@my_thresh/voc/tcl"]["variant"] == "my_thresh"
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines() if line.startswith("maskclip")}
    assert rows["maskclip voc"].endswith("replaced") and rows["maskclip@my_thresh voc"].endswith("added")
    assert "maskclip voc20" not in rows
    assert "wrote 3 entries to" in out and "1 replaced, 1 added; 1 other entry kept" in out

    code, out, err = regress(now, baseline, "--update", "--replace")
    assert code == 0, err
    assert sorted(read_baseline(baseline)) == ["maskclip/voc/tcl", "maskclip@my_thresh/voc/tcl"]
    assert "rewritten from the results alone (--replace)" in out


def test_update_creates_a_missing_baseline_and_refuses_replace_alone(runs, tmp_path):
    code, out, err = regress(runs["base"], tmp_path / "new" / "baseline.json", "--update")
    assert code == 0, err
    assert "2 added; created" in out
    assert (tmp_path / "new" / "baseline.json").read_bytes() == runs["baseline"].read_bytes()
    code, _, err = regress(runs["base"], runs["baseline"], "--replace")
    assert code == 2 and "--replace only goes with --update" in err


def test_variants_are_compared_under_their_own_key(runs, tmp_path):
    now = tmp_path / "now"
    shutil.copytree(runs["base"], now)
    shutil.copytree(runs["base"], now / "variant")  # same method and datasets, another config
    for path in result_jsons(now / "variant"):
        as_variant(path, "my_thresh")
    code, out, _ = regress(now, runs["baseline"])
    assert code == 0
    assert sum(line.startswith("maskclip@my_thresh ") and line.endswith("new") for line in out.splitlines()) == 2


def test_json_that_is_not_a_result_is_skipped_and_named(runs, tmp_path):
    now = tmp_path / "now"
    shutil.copytree(runs["base"], now)
    (now / "notes.json").write_text('{"title": "why this run"}')
    code, out, err = regress(now, runs["baseline"])
    assert code == 0, out + err
    assert f"note: skipped 1 JSON file(s) that are not result files under {now}: notes.json" in err.splitlines()
    code, _, err = regress(now, tmp_path / "b.json", "--update")
    assert code == 0 and "notes.json" in err


def test_a_broken_result_file_fails_naming_it(runs, tmp_path):
    now = tmp_path / "now"
    shutil.copytree(runs["base"], now)
    (now / "broken.json").write_text('{"schema": "ovseg-bench/result/v2", "method": {"name": "x"}}')
    code, _, err = regress(now, runs["baseline"])
    assert code == 2 and "broken.json" in err and "not a complete result file" in err
    (now / "broken.json").write_text('{"schema": "ovseg-bench/result/v2", ')
    code, _, err = regress(now, runs["baseline"])
    assert code == 2 and "broken.json" in err and "not a readable result file" in err
