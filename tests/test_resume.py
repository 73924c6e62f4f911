"""``run --resume``: a run killed with SIGKILL and resumed equals an uninterrupted run, exactly.

The kill is real: the CLI runs in a subprocess that saves its state every 2 images
(``$OVSEG_SAVE_EVERY``) and gets SIGKILL as soon as the first state file appears. Also here:
finished datasets are skipped, states of another run or listing are refused, a stale state is
replaced without ``--resume``, and the ``--limit`` part of the fingerprint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_bench.engine.protocol import LIMIT_RULE, fingerprint, image_rule, load_protocol
from ovseg_bench.engine.runner import PARTIAL_FORMAT, SAVE_EVERY_ENV, resolve_save_every
from ovseg_bench.errors import ConfigError
from ovseg_bench.resources import configs_dir
from ovseg_bench.results import ResultKey, image_ids_digest, run_digest
from tests.conftest import TINY_MODEL, call_cli, result_jsons
from tests.synthetic import write_dataset

NUM_IMAGES = 12
SAVE_EVERY = 2
SIZES = ((48, 64), (56, 56))  # 2 and 1 tcl windows: a quick loop
VOC_TCL = load_protocol("tcl").settings_for("voc")
FULL_FP = fingerprint(VOC_TCL, metric="mmseg-iou/int64", precision="fp32", limit=None)


def clip9_stem(config: Path, fp: str) -> str:
    """The result stem of ``argv``'s run, from the method's own identity (as plan.result_key)."""
    import torch

    from ovseg_bench.methods.base import WeightsOptions
    from ovseg_bench.registry import get_method

    method = get_method("clip")(WeightsOptions(model=TINY_MODEL, pretrained="none"), torch.device("cpu"), config)
    config_block = json.loads(json.dumps(method.settings("voc")))
    return ResultKey("clip", method.variant, "voc", "tcl", fp, run_digest(method.weights(), config_block)).stem


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def voc12(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("voc12")
    return root, write_dataset("voc", root, num_images=NUM_IMAGES, sizes=SIZES)


@pytest.fixture(scope="module")
def clip9(tmp_path_factory) -> Path:
    """The clip config with TCL's 9 templates instead of 80: the same loop, quicker text encoding."""
    text = (configs_dir() / "methods" / "clip.yaml").read_text(encoding="utf-8")
    assert "templates: imagenet80" in text
    path = tmp_path_factory.mktemp("config") / "clip9.yaml"
    path.write_text(text.replace("templates: imagenet80", "templates: tcl9"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stem(clip9) -> str:
    return clip9_stem(clip9, FULL_FP)


def argv(root: Path, out: Path, config: Path, *extra: str, quiet: bool = True) -> list[str]:
    args = ["run", "--method", "clip", "--dataset", "voc", "--data-root", str(root), "--output", str(out),
            "--model", TINY_MODEL, "--pretrained", "none", "--config", str(config),
            "--workers", "0", "--device", "cpu", *extra]
    return args + ["--quiet"] if quiet else args


def subprocess_env() -> dict[str, str]:
    # One thread as in the in-process runs (conftest), so every run does the same arithmetic.
    return {**os.environ, SAVE_EVERY_ENV: str(SAVE_EVERY), "OMP_NUM_THREADS": "1"}


def kill_at_first_state(args: list[str], out: Path, stem: str, timeout: float = 120.0) -> Path:
    """Start ``ovseg-bench run`` in a subprocess, SIGKILL it once it has saved a state; the state path."""
    partial = out / f"{stem}.partial.pt"
    log = out.parent / f"{out.name}.stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "ovseg_bench", *args], env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + timeout
            while not partial.exists():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (exit {proc.returncode}) before saving a state: {log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no state saved within {timeout} s")
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return partial


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def sidecar(result_path: Path) -> tuple[np.ndarray, list[str]]:
    result = load_json(result_path)
    with np.load(result_path.parent / result["per_image"]["file"]) as npz:
        return npz["counts"], [str(i) for i in npz["image_ids"]]


@pytest.fixture(scope="module")
def uninterrupted(voc12, clip9, stem, tmp_path_factory) -> Path:
    root, _ = voc12
    out = tmp_path_factory.mktemp("uninterrupted")
    code, _, stderr = call_cli(argv(root, out, clip9))
    assert code == 0, stderr
    return out / f"{stem}.json"


@pytest.fixture(scope="module")
def killed(voc12, clip9, stem, tmp_path_factory) -> dict:
    """A run killed after its first saved state; a copy of that state is kept for the refusal tests."""
    root, ids = voc12
    out = tmp_path_factory.mktemp("killed")
    partial = kill_at_first_state(argv(root, out, clip9), out, stem)
    assert not (out / f"{stem}.json").exists(), "the run finished before the kill; nothing to resume"
    copy = tmp_path_factory.mktemp("saved_state") / partial.name
    shutil.copy(partial, copy)
    return {"root": root, "ids": ids, "out": out, "partial": partial, "copy": copy}


# ----------------------------------------------------------------------------- the kill

def test_saved_state_is_plain_and_holds_the_first_images(killed):
    state = torch.load(killed["partial"], weights_only=True)
    assert state["format"] == PARTIAL_FORMAT
    done = len(state["processed_ids"])
    assert 0 < done < NUM_IMAGES and done % SAVE_EVERY == 0  # saved at block ends only
    assert state["processed_ids"] == state["image_ids"] == killed["ids"][:done]
    assert state["scored_at"] == list(range(done)) and state["skipped"] == []
    assert state["counts"]["kind"] == "mmseg-iou" and state["counts"]["per_item"].shape == (done, 4, 21)
    assert state["counts"]["additive"].dtype == torch.int64  # the confusion matrix
    identity = json.loads(state["identity"])
    assert identity["fingerprint"] == FULL_FP and identity["save_every"] == SAVE_EVERY
    assert identity["listed"] == NUM_IMAGES


def test_killed_then_resumed_equals_uninterrupted(killed, clip9, stem, uninterrupted):
    out = killed["out"]
    done = len(torch.load(killed["partial"], weights_only=True)["processed_ids"])
    args = argv(killed["root"], out, clip9, "--resume", quiet=False)
    resumed = subprocess.run([sys.executable, "-m", "ovseg_bench", *args], env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # The bar starts at the saved images: the run continued, it did not start again.
    assert f" {done}/{NUM_IMAGES} " in resumed.stderr and f" 0/{NUM_IMAGES} " not in resumed.stderr

    path = out / f"{stem}.json"
    got, want = load_json(path), load_json(uninterrupted)
    assert got["counts"] == want["counts"]
    assert got["metrics"] == want["metrics"]
    assert got["images"] == want["images"]  # seen, listed, windows, skipped, ids_sha256
    got_rows, got_ids = sidecar(path)
    want_rows, want_ids = sidecar(uninterrupted)
    assert got_ids == want_ids == killed["ids"]
    assert got_rows.dtype == np.int64 and np.array_equal(got_rows, want_rows)
    assert got["timing"]["save_every"] == SAVE_EVERY
    # The state goes with the result; no temporary file is left behind.
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.per_image.npz"]


def test_resume_skips_a_finished_dataset(killed, clip9, uninterrupted, monkeypatch):
    import ovseg_bench.plan

    path = uninterrupted
    before = path.read_bytes()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished dataset was evaluated again")

    monkeypatch.setattr(ovseg_bench.plan, "evaluate", no_evaluation)
    code, stdout, stderr = call_cli(argv(killed["root"], path.parent, clip9, "--resume"))
    assert code == 0, stderr
    assert path.read_bytes() == before
    assert f"{load_json(path)['metrics']['mIoU']:.2f}" in stdout  # still in the summary


def test_resume_refuses_a_state_of_another_listing(killed, clip9, tmp_path, monkeypatch):
    monkeypatch.setenv(SAVE_EVERY_ENV, str(SAVE_EVERY))
    root = tmp_path / "data"
    shutil.copytree(killed["root"], root)
    split = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    ids = split.read_text().split()
    split.write_text("\n".join([ids[1], ids[0], *ids[2:]]) + "\n")  # same size, other order
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(killed["copy"], out / killed["copy"].name)
    code, _, stderr = call_cli(argv(root, out, clip9, "--resume"))
    assert code == 2 and "Traceback" not in stderr
    assert "not the first ones of this run's listing" in stderr and f"saved '{ids[0]}'" in stderr
    assert killed["copy"].name in stderr and "without --resume" in stderr
    assert result_jsons(out) == []


def test_resume_refuses_a_state_of_other_settings(killed, clip9, tmp_path, monkeypatch):
    monkeypatch.setenv(SAVE_EVERY_ENV, "4")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(killed["copy"], out / killed["copy"].name)
    code, _, stderr = call_cli(argv(killed["root"], out, clip9, "--resume"))
    assert code == 2 and "Traceback" not in stderr
    assert "saved by a different run" in stderr and "save_every" in stderr
    assert result_jsons(out) == []


def test_resume_refuses_states_of_another_process_count(voc12, clip9, stem, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{stem}.partial.rank1-of-2.pt").write_bytes(b"x")
    code, _, stderr = call_cli(argv(voc12[0], out, clip9, "--resume"))
    assert code == 2 and "another number of processes" in stderr and "rank1-of-2" in stderr


# ----------------------------------------------------------------------------- --limit

def test_limit_run_replaces_a_stale_state_and_records_its_images(voc12, clip9, tmp_path):
    root, ids = voc12
    limited_fp = fingerprint(VOC_TCL, metric="mmseg-iou/int64", precision="fp32", limit=4)
    stem = clip9_stem(clip9, limited_fp)
    stale = tmp_path / f"{stem}.partial.pt"
    stale.write_bytes(b"not a state")

    code, _, stderr = call_cli(argv(root, tmp_path, clip9, "--limit", "4", "--resume"))
    assert code == 2 and "not a readable partial state" in stderr and "without --resume" in stderr

    code, _, stderr = call_cli(argv(root, tmp_path, clip9, "--limit", "4"))  # ignored and replaced
    assert code == 0, stderr
    assert not stale.exists()
    result = load_json(tmp_path / f"{stem}.json")
    assert result["protocol"]["fingerprint"] == limited_fp != FULL_FP
    assert result["protocol"]["limit"] == 4 and result["protocol"]["images"] == "first 4 in listing order"
    assert result["images"]["ids_sha256"] == image_ids_digest(ids[:4])
    assert result["images"]["seen"] == result["images"]["listed"] == 4


def test_fingerprint_without_limit_is_unchanged():
    # Pinned (schema v2): voc's settings under tcl, the semantic metric, fp32, all images.
    assert FULL_FP == "2926dd2c4c4f2c890f91dd8332f79fb0db292edc3d4919449134bc05eda657cb"
    assert image_rule(None) == "all"


def test_fingerprint_records_the_limit_and_its_rule(monkeypatch):
    prints = {n: fingerprint(VOC_TCL, metric="mmseg-iou/int64", precision="fp32", limit=n) for n in (1, 4, 500)}
    assert len({FULL_FP, *prints.values()}) == 4
    assert fingerprint(VOC_TCL, metric="mmseg-iou/int64", precision="fp32", limit=4) == prints[4]  # deterministic
    # The subset rule is in the hashed payload: another rule gives another fingerprint.
    import ovseg_bench.engine.protocol as protocol

    monkeypatch.setattr(protocol, "LIMIT_RULE", "random_n")
    assert protocol.fingerprint(VOC_TCL, metric="mmseg-iou/int64", precision="fp32", limit=4) != prints[4]
    assert protocol.fingerprint(VOC_TCL, metric="mmseg-iou/int64", precision="fp32", limit=None) == FULL_FP
    assert LIMIT_RULE == "first_n_in_listing_order"


def test_save_every_comes_from_the_option_or_the_environment(monkeypatch):
    monkeypatch.delenv(SAVE_EVERY_ENV, raising=False)
    assert resolve_save_every(None) == 25
    assert resolve_save_every(7) == 7
    monkeypatch.setenv(SAVE_EVERY_ENV, "3")
    assert resolve_save_every(None) == 3 and resolve_save_every(7) == 7
    for bad in ("x", "0", "-2"):
        monkeypatch.setenv(SAVE_EVERY_ENV, bad)
        with pytest.raises(ConfigError, match=SAVE_EVERY_ENV):
            resolve_save_every(None)
    with pytest.raises(ConfigError, match="positive"):
        resolve_save_every(0)
