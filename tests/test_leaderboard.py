"""``ovseg-bench leaderboard``: real result files from the CLI (tiny random model) plus crafted copies.

The crafted "real" TCL results are copies of a measured file with the identity of a run of the
published weights and chosen mIoU values, so differences from the reported numbers are known.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ovseg_bench import leaderboard
from ovseg_bench.datasets.cards import ALL_BENCHMARKS
from ovseg_bench.errors import ConfigError
from ovseg_bench.identity import config_digest
from tests.conftest import call_cli, result_jsons, run_argv

REPO = Path(__file__).resolve().parents[1]
# tcl_paper in leaderboard/reported.yaml (TCL paper, CVPR 2023); crafted runs add OFFSET to each.
TCL_PAPER = {"voc": 51.2, "voc20": 77.5, "context": 24.3, "context59": 30.3, "coco_stuff": 19.6,
             "coco_object": 30.4, "cityscapes": 23.1, "ade20k": 14.9}
OFFSET = 0.2
TCL_WEIGHTS = {"architecture": "ViT-B-16", "pretrained": "openai", "random": False,
               "checkpoint": "https://github.com/kakaobrain/tcl/releases/download/v1.0.0/tcl.pth",
               "checkpoint_sha256": "ab12cd34" + "0" * 56}


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def dump(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def crafted_tcl(template: dict, dataset: str, miou: float) -> dict:
    """A copy of ``template`` made to look like a full-split run of TCL's published weights."""
    result = json.loads(json.dumps(template))
    result["method"]["name"] = "tcl"
    result["method"]["weights"] = dict(TCL_WEIGHTS)
    result["dataset"]["name"] = dataset
    result["metrics"]["mIoU"] = miou
    result["metrics"]["ci95"] = {"mIoU": [round(miou - 0.6, 2), round(miou + 0.64, 2)], "half_width": 0.62,
                                 "resamples": 1000, "seed": 0}
    result["images"]["seen"] = result["images"]["expected"]
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory, synthetic_tree) -> Path:
    """Measured: clip (random) on voc and voc20, clip on voc with --limit 1; crafted: tcl on all eight."""
    root = tmp_path_factory.mktemp("lb_results")
    out = root / "runs"
    data = synthetic_tree[0]
    for extra in ((), ("--limit", "1")):
        dataset = "voc" if extra else "voc,voc20"
        code, _, err = call_cli(run_argv("clip", dataset, out, *extra, data_root=data))
        assert code == 0, err
    template = load(next(p for p in result_jsons(out) if p.name.startswith("clip__voc__") and
                         load(p)["protocol"]["limit"] is None))
    fp8 = template["protocol"]["fingerprint"][:8]
    for name, value in TCL_PAPER.items():
        dump(crafted_tcl(template, name, round(value + OFFSET, 2)), out / "real" / f"tcl__{name}__tcl__{fp8}.json")
    return out


def render(results_dir: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    return call_cli(["leaderboard", "--results", results_dir, "--out", out, *extra])


def sections(markdown: str) -> dict[str, str]:
    """``## title`` -> the text up to the next heading."""
    parts = markdown.split("\n## ")[1:]
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in parts}


def table_row(section: str, startswith: str) -> list[str]:
    line = next(line for line in section.splitlines() if line.startswith(f"| {startswith}"))
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def rendered(results, tmp_path_factory) -> Path:
    """The leaderboard of ``results``, rendered once: the out folder (README.md, details/)."""
    folder = tmp_path_factory.mktemp("lb_board")
    code, stdout, stderr = render(results, folder / "README.md")
    assert code == 0, stderr
    assert "wrote" in stdout
    return folder


@pytest.fixture(scope="module")
def board(rendered) -> str:
    return (rendered / "README.md").read_text(encoding="utf-8")


def subset(results: Path, folder: Path, *patterns: str) -> Path:
    """A copy of the result files of ``results`` matching ``patterns`` (few files: few charts to draw)."""
    for pattern in patterns:
        for path in results.rglob(pattern):
            target = folder / path.relative_to(results)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return folder


# ----------------------------------------------------------------------------- determinism

def test_same_inputs_give_identical_bytes_in_another_clone(results, tmp_path, monkeypatch):
    """A second run, in another folder, over files with other modification times and over the
    output of the first run, writes byte-identical files."""
    snapshots = []
    for clone, base in (("a", 1_000_000_000), ("b", 2_000_000_000)):
        shutil.copytree(results, tmp_path / clone / "results")
        for offset, path in enumerate(sorted((tmp_path / clone / "results").rglob("*.json"), reverse=clone == "b")):
            os.utime(path, (base + offset, base + offset))
        if snapshots:  # the second run finds the first one's output in place
            shutil.copytree(tmp_path / "a" / "board", tmp_path / clone / "board")
        monkeypatch.chdir(tmp_path / clone)
        code, _, stderr = render(Path("results"), Path("board/README.md"))
        assert code == 0, stderr
        snapshots.append(snapshot(tmp_path / clone / "board"))
    first, second = snapshots
    pngs = [name for name in first if name.endswith(".png")]
    assert "README.md" in first and len(pngs) == len(result_jsons(results)) + len(TCL_PAPER)
    assert all(f"details/{Path(p).stem}.md" in first for p in pngs)
    assert second.keys() == first.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_pngs_are_charts_without_a_software_chunk(rendered):
    pngs = sorted((rendered / "details").glob("*.png"))
    assert pngs
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000
        assert b"Software" not in data and b"matplotlib" not in data.lower()


# ----------------------------------------------------------------------------- content

def test_reported_rows_sit_under_their_preset_with_their_tags(board):
    parts = sections(board)
    full_tcl = next(body for title, body in parts.items() if "protocol `tcl`" in title and "limit" not in title and "semantic" in title)
    assert "tcl — reported [R] `tcl_paper`" in full_tcl and "reco — reported ? `reco_table`" in full_tcl
    assert "maskclip — reported [R] `maskclip_tcl_table`" in full_tcl
    sclip = parts["semantic · protocol `sclip` · reported only"]
    assert "sclip — reported R `sclip_readme`" in sclip and "sclip_paper" in sclip and "tcl_paper" not in sclip
    elsewhere = parts["Reported elsewhere (each paper's own protocol)"]
    assert "clearclip — reported S2 `clearclip_paper`" in elsewhere and "naclip_readme_v2" in elsewhere
    assert table_row(elsewhere, "proxyclip")[4] == "80.3 ?"  # voc20, an uncertain '?' cell
    # every entry is listed with its source; every tag used is explained
    sources = parts["Sources of the reported numbers"]
    reported = leaderboard.load_reported()
    assert all(f"- `{e.id}` ({e.tag}): " in sources for e in reported.entries)
    assert all(f"- `{tag}`: " in sources for tag in {e.tag for e in reported.entries})


def test_random_and_limit_runs_are_flagged(board):
    parts = sections(board)
    full = next(body for title, body in parts.items() if "protocol `tcl`" in title and "limit" not in title and "semantic" in title)
    limited_title = next(title for title in parts if title.endswith("· limit 1"))
    limited = parts[limited_title]
    assert table_row(full, "clip")[0] == "clip ⚠ random weights"
    assert table_row(limited, "clip")[0] == "clip ⚠ random weights ⚠ limit 1"
    assert "⚠ random weights: built with `--pretrained none`" in full
    assert "⚠ limit N: only the first N images" in limited
    assert "reported" not in limited  # quick checks are never compared with paper numbers
    assert "No measured runs with real weights yet" not in board  # the crafted tcl rows count as real


def test_avg_is_marked_when_benchmarks_are_missing(board, results):
    full = next(body for title, body in sections(board).items() if "protocol `tcl`" in title and "limit" not in title and "semantic" in title)
    header = table_row(full, "method")
    clip = dict(zip(header, table_row(full, "clip")))
    mious = [load(p)["metrics"]["mIoU"] for p in result_jsons(results)
             if load(p)["protocol"]["limit"] is None and load(p)["dataset"]["name"] in ("voc", "voc20")]
    assert clip["Avg"] == f"{sum(mious) / 2:.2f}*"
    assert "(+" not in clip["voc"] and "(-" not in clip["voc"]  # random weights: no difference shown
    assert "\\* Avg over the benchmarks present in the row only" in full
    assert clip["voc"].endswith(" †")  # 3 synthetic images out of the 1449 of VOC's split


def test_measured_rows_show_the_difference_from_the_reported_value(board):
    full = next(body for title, body in sections(board).items() if "protocol `tcl`" in title and "limit" not in title and "semantic" in title)
    header = table_row(full, "method")
    tcl = dict(zip(header, table_row(full, "tcl ")))
    assert tcl["backbone"] == "ViT-B-16" and tcl["weights"] == "openai + tcl.pth (ab12cd34)"
    assert tcl["method"] == "tcl"  # real weights, full split: no flag
    assert tcl["voc"].startswith("[51.40 ± 0.62](details/tcl__voc__tcl__") and tcl["voc"].endswith(".md) (+0.20)")
    assert all(tcl[name].endswith("(+0.20)") for name in ALL_BENCHMARKS)
    # Avg: all eight present (no '*'), compared with the printed 33.9, not the cells' mean
    measured_avg = sum(round(v + OFFSET, 2) for v in TCL_PAPER.values()) / 8
    assert tcl["Avg"] == f"{measured_avg:.2f} ({measured_avg - 33.9:+.2f})"
    assert "tcl (ViT-B-16) against `tcl_paper`" in full


def test_details_pages_hold_per_class_tables(results, rendered):
    path = next(p for p in result_jsons(results) if p.name.startswith("clip__voc__"))
    page = (rendered / "details" / f"{path.stem}.md").read_text(encoding="utf-8")
    result = load(path)
    assert page.startswith(leaderboard.GENERATED) and f"![per-class IoU]({path.stem}.png)" in page
    for name, values in result["metrics"]["per_class"].items():
        iou = "–" if values["iou"] is None else f"{values['iou']:.2f}"
        assert any(line.startswith(f"| {name} ") and f"| {iou:>5} |" in line for line in page.splitlines()), name
    assert "⚠ random weights" in page and str(results) not in page  # no machine-dependent paths


# ----------------------------------------------------------------------------- duplicates, stale pages

def test_duplicates_keep_the_lexicographically_last_file_name(results, tmp_path):
    folder = subset(results, tmp_path / "results", "tcl__voc__*.json")
    kept = next((folder / "real").glob("tcl__voc__*.json"))
    twin = load(kept)
    twin["metrics"]["mIoU"] = 60.0
    dump(twin, folder / "real" / "a_rerun.json")      # sorts before tcl__voc__...: set aside
    dump(twin, folder / "zz" / kept.name)             # same name, later path: kept
    assert render(folder, tmp_path / "out" / "README.md")[0] == 0
    text = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    aside = sections(text)["Results set aside"]
    assert f"- `real/a_rerun.json` (shown: `zz/{kept.name}`)" in aside
    assert f"- `real/{kept.name}` (shown: `zz/{kept.name}`)" in aside
    assert "[60.00 ± 0.62]" in text and "[51.40" not in text


def test_stale_generated_pages_are_removed_and_others_kept(results, tmp_path):
    details = tmp_path / "details"
    details.mkdir()
    (details / "old.md").write_text(leaderboard.GENERATED + "\n# old\n", encoding="utf-8")
    (details / "old.png").write_bytes(b"png")
    (details / "notes.md").write_text("# mine\n", encoding="utf-8")
    assert render(subset(results, tmp_path / "results", "tcl__voc__*.json"), tmp_path / "README.md")[0] == 0
    assert not (details / "old.md").exists() and not (details / "old.png").exists()
    assert (details / "notes.md").read_text(encoding="utf-8") == "# mine\n"


# ----------------------------------------------------------------------------- distinct runs, skipped files

def set_config(result: dict, **changes: object) -> dict:
    """Change the recorded method config, and its recorded digest like the writer would."""
    result["method"]["config"].update(changes)
    if "config_sha256" in result["method"]:
        result["method"]["config_sha256"] = config_digest(result["method"]["config"])
    return result


def full_tcl_section(markdown: str) -> str:
    return next(body for title, body in sections(markdown).items()
                if "protocol `tcl`" in title and "limit" not in title and "semantic" in title)


def measured_rows(section: str, method: str) -> list[list[str]]:
    """Cells of the measured rows of ``method`` (reported rows excluded)."""
    lines = [line for line in section.splitlines()
             if line.startswith(f"| {method} ") and " — reported " not in line]
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]


def test_runs_that_differ_only_in_config_variant_get_their_own_rows(results, tmp_path):
    """The shipped config and two variants of tcl on voc: three rows; per-dataset knobs keep one run in one row."""
    folder = subset(results, tmp_path / "results", "tcl__*.json")
    for offset, path in enumerate(sorted((folder / "real").glob("tcl__*.json"))):
        shipped = load(path)  # per-dataset knobs: the recorded config differs between datasets of one run
        dump(set_config(shipped, prob_thd=round(0.1 * offset, 1)), path)
    voc = load(next((folder / "real").glob("tcl__voc__*.json")))
    for variant, miou in (("my_thresh", 60.0), ("cfg-1a2b3c4d", 61.0)):
        run = set_config(json.loads(json.dumps(voc)), prob_thd=0.9)
        run["method"]["variant"] = variant
        run["metrics"]["mIoU"] = miou
        dump(run, folder / "variants" / f"tcl@{variant}__voc.json")
    code, _, stderr = render(folder, tmp_path / "out" / "README.md")
    assert code == 0, stderr
    text = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    header = table_row(full_tcl_section(text), "method")
    rows = {row[0]: dict(zip(header, row)) for row in measured_rows(full_tcl_section(text), "tcl")}
    assert sorted(rows) == ["tcl", "tcl · cfg-1a2b3c4d", "tcl · variant my_thresh"]
    assert all(rows["tcl"][name].endswith("(+0.20)") for name in ALL_BENCHMARKS)  # one row for all eight
    assert rows["tcl · variant my_thresh"]["voc"].startswith("[60.00 ± 0.62]")
    assert rows["tcl · cfg-1a2b3c4d"]["voc"].startswith("[61.00 ± 0.62]")
    assert "(+" not in rows["tcl · variant my_thresh"]["voc"]  # a variant is not the published method
    assert "Results set aside" not in text


def test_older_files_differing_only_in_config_are_both_shown(results, tmp_path):
    """Without a recorded variant, two configs on one dataset are told apart by their digest."""
    folder = subset(results, tmp_path / "results", "tcl__voc__*.json")
    path = next((folder / "real").glob("tcl__voc__*.json"))
    other = set_config(load(path), prob_thd=0.9)
    other["method"].pop("variant", None)  # as written before variants were recorded
    other["method"].pop("config_sha256", None)
    other["metrics"]["mIoU"] = 60.0
    dump(other, folder / "real" / "tcl__voc__other_config.json")
    assert render(folder, tmp_path / "out" / "README.md")[0] == 0
    text = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    rows = measured_rows(full_tcl_section(text), "tcl")
    digests = sorted(config_digest(load(p)["method"]["config"])[:8]
                     for p in (path, folder / "real" / "tcl__voc__other_config.json"))
    assert sorted(row[0] for row in rows) == sorted(f"tcl · config {d}" for d in digests)
    assert {row[3][:6] for row in rows} == {"[51.40", "[60.00"}  # voc is the first dataset column
    assert "Results set aside" not in text


def test_duplicates_of_one_run_are_counted_on_stderr(results, tmp_path):
    folder = subset(results, tmp_path / "results", "tcl__voc__*.json")
    kept = next((folder / "real").glob("tcl__voc__*.json"))
    for name in ("a_rerun.json", "b_rerun.json"):
        shutil.copy(kept, folder / "real" / name)
    out = tmp_path / "out" / "README.md"
    code, _, stderr = render(folder, out)
    assert code == 0, stderr
    line = next(line for line in stderr.splitlines() if "set aside" in line)
    assert line.startswith("note: 2 result file(s) set aside as duplicates")
    assert "real/a_rerun.json, real/b_rerun.json" in line and str(out) in line
    aside = sections(out.read_text(encoding="utf-8"))["Results set aside"]
    assert f"- `real/a_rerun.json` (shown: `real/{kept.name}`)" in aside


def test_json_files_that_are_not_results_are_skipped_and_named(results, tmp_path):
    folder = subset(results, tmp_path / "results", "tcl__voc__*.json")
    dump({"comment": "my notes"}, folder / "notes.json")
    dump({"schema": "someone/else/v1"}, folder / "sub" / "other.json")
    code, stdout, stderr = render(folder, tmp_path / "README.md")
    assert code == 0, stderr
    assert "1 result(s)" in stdout
    assert (f"note: skipped 2 JSON file(s) that are not result files under {folder}: notes.json, sub/other.json"
            in stderr.splitlines())


@pytest.mark.parametrize("text, problem", [
    ('{"schema": "ovseg-bench/result/v2", "method": {', "not a readable result file"),
    ('{"schema": "ovseg-bench/result/v2", "method": {"name": "tcl"}}', "not a complete result file"),
])
def test_a_broken_result_file_still_fails_naming_it(results, tmp_path, text, problem):
    folder = subset(results, tmp_path / "results", "tcl__voc__*.json")
    (folder / "real" / "broken.json").write_text(text, encoding="utf-8")
    code, _, stderr = render(folder, tmp_path / "README.md")
    assert code == 2 and "broken.json" in stderr and problem in stderr
    assert "Traceback" not in stderr and not (tmp_path / "README.md").exists()


# ----------------------------------------------------------------------------- errors and empty folders

def test_unknown_schema_is_refused_naming_the_file(results, tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    dump({"schema": "ovseg-bench/result/v9"}, folder / "sub" / "future.json")
    code, _, stderr = render(folder, tmp_path / "README.md")
    assert code == 2 and "future.json" in stderr and "ovseg-bench/result/v9" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "README.md").exists()


def test_other_ovseg_documents_beside_results_are_skipped(results, tmp_path):
    folder = subset(results, tmp_path / "results", "tcl__voc__*.json")
    dump({"schema": "ovseg-bench/baseline/v1", "entries": []}, folder / "baseline.json")
    code, stdout, stderr = render(folder, tmp_path / "README.md")
    assert code == 0, stderr
    assert "1 result(s)" in stdout


def test_missing_results_folder_is_an_error(tmp_path):
    code, _, stderr = render(tmp_path / "nowhere", tmp_path / "README.md")
    assert code == 2 and "nowhere" in stderr and "no such folder" in stderr


def test_empty_results_folder_renders_reported_rows_only(tmp_path):
    (tmp_path / "results").mkdir()
    code, _, stderr = render(tmp_path / "results", tmp_path / "board" / "README.md")
    assert code == 0 and "reported numbers only" in stderr
    text = (tmp_path / "board" / "README.md").read_text(encoding="utf-8")
    assert "No measured runs with real weights yet" in text and "`tcl_paper`" in text
    assert not (tmp_path / "board" / "details").exists()


def test_committed_leaderboard_is_up_to_date(tmp_path, monkeypatch):
    """leaderboard/README.md is what the documented command gives with no measured runs."""
    (tmp_path / "leaderboard" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert call_cli(["leaderboard", "--results", "leaderboard/results", "--out", "leaderboard/README.md"])[0] == 0
    fresh = (tmp_path / "leaderboard" / "README.md").read_text(encoding="utf-8")
    assert fresh == (REPO / "leaderboard" / "README.md").read_text(encoding="utf-8"), (
        "leaderboard/README.md is stale: run `ovseg-bench leaderboard --results leaderboard/results "
        "--out leaderboard/README.md` in the repo")


def test_without_out_the_tracked_leaderboard_is_left_alone(tmp_path, monkeypatch):
    """The default --out is runs/leaderboard/README.md (ignored by git), details/ beside it."""
    (tmp_path / "leaderboard").mkdir()
    (tmp_path / "leaderboard" / "README.md").write_text("tracked\n", encoding="utf-8")
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = call_cli(["leaderboard", "--results", "results"])
    assert code == 0, stderr
    assert (tmp_path / "leaderboard" / "README.md").read_text(encoding="utf-8") == "tracked\n"
    written = tmp_path / "runs" / "leaderboard" / "README.md"
    assert "`tcl_paper`" in written.read_text(encoding="utf-8")
    assert stdout.startswith("wrote runs/leaderboard/README.md: ") and "runs/leaderboard/details" in stdout
    assert "--out runs/leaderboard/README.md" in written.read_text(encoding="utf-8").splitlines()[0]


# ----------------------------------------------------------------------------- reported.yaml

def test_reported_file_checks_keys_tags_and_datasets(tmp_path):
    good = (REPO / "leaderboard" / "reported.yaml").read_text(encoding="utf-8")
    cases = {"typo": good.replace("    decimals: 1\n", "    decimal: 1\n", 1),
             "tag": good.replace('tag: "S1"', 'tag: "S3"', 1),
             "dataset": good.replace("values: {voc: 51.2,", "values: {pascal: 51.2,", 1),
             "metric": good.replace("metric: oIoU", "metric: AP50", 1)}
    expected = {"typo": "unknown key(s) ['decimal']", "tag": "tag 'S3' is not defined", "dataset": "['pascal']",
                "metric": "metric 'AP50' is not one of"}
    for case, text in cases.items():
        path = tmp_path / f"{case}.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            leaderboard.load_reported(path)
        assert str(path) in str(info.value) and expected[case] in str(info.value)


def test_without_a_checkout_the_reported_file_must_be_given(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(leaderboard, "default_reported_path", lambda: tmp_path / "missing.yaml")
    code, _, stderr = render(tmp_path / "results", tmp_path / "README.md")
    assert code == 2 and "--reported PATH" in stderr
    code, _, stderr = render(tmp_path / "results", tmp_path / "README.md",
                             "--reported", REPO / "leaderboard" / "reported.yaml")
    assert code == 0, stderr


def test_referring_reported_rows_name_their_metric(board):
    referring = next(body for title, body in sections(board).items() if title.startswith("referring"))
    assert "glcf — reported S2 `glcf_paper_miou`" in referring
    assert "glcf — reported oIoU [R] `glcf_paper_oiou`" in referring and "24.88" in referring
