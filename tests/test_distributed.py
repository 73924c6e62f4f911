"""torchrun: two CPU processes on gloo give exactly the numbers of one process.

The real run: ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m ovseg_bench
run ...`` on 5 images in blocks of 2 (``$OVSEG_SAVE_EVERY``), so rank 0 gets images 0, 1, 4
and rank 1 images 2, 3: uneven, interleaved shards whose counts must come back in listing order.
The shard rule and the merge are also checked alone, without processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg_bench.engine.distributed import Ranks, merge_states, ranks_from_env, shard
from ovseg_bench.engine.metrics import IoUCounts
from ovseg_bench.engine.runner import SAVE_EVERY_ENV, Evaluation
from ovseg_bench.errors import ConfigError
from ovseg_bench.resources import configs_dir
from tests.conftest import TINY_MODEL, call_cli, result_jsons
from tests.synthetic import write_dataset

NUM_IMAGES = 5
BLOCK = 2


# ----------------------------------------------------------------------------- shard rule and merge

def test_shards_are_whole_blocks_dealt_round_robin():
    assert shard(5, 2, Ranks(0, 2)) == (0, 1, 4)
    assert shard(5, 2, Ranks(1, 2)) == (2, 3)
    assert shard(5, 25, Ranks(1, 2)) == ()  # fewer images than one block: rank 1 idles
    for num, block, world in ((0, 3, 2), (1449, 25, 8), (7, 1, 3), (10, 4, 4)):
        parts = [shard(num, block, Ranks(r, world)) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(num))  # each image exactly once
        for part in parts:
            assert list(part) == sorted(part)
            assert len({i // block % world for i in part}) <= 1  # every block on one rank


def test_ranks_from_the_environment():
    assert ranks_from_env({}) == Ranks(0, 1, 0) and not Ranks().active and Ranks().main
    ranks = ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ranks == Ranks(3, 4, 1) and ranks.active and not ranks.main
    for bad in ({"WORLD_SIZE": "two"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(ConfigError, match="torchrun"):
            ranks_from_env(bad)


def _evaluate_alone(labels: list[tuple[torch.Tensor, torch.Tensor]], positions: list[int],
                    skip: int = 3) -> Evaluation:
    """What the runner holds after ``positions``, image ``skip`` left out as unreadable."""
    counts = IoUCounts(5)
    scored = [k for k in positions if k != skip]
    for k in scored:
        counts.update(*labels[k])
    skipped = [{"image_id": f"img{k}", "reason": "unreadable"} for k in positions if k == skip]
    return Evaluation(counts, [f"img{k}" for k in scored], skipped, 3 * len(scored), float(len(positions)),
                      scored, [k for k in positions if k == skip], [f"img{k}" for k in positions])


def test_merge_puts_shards_back_in_listing_order():
    gen = torch.Generator().manual_seed(0)
    labels = [(torch.randint(0, 7, (6, 9), generator=gen), torch.randint(0, 6, (6, 9), generator=gen))
              for _ in range(NUM_IMAGES)]
    whole = _evaluate_alone(labels, list(range(NUM_IMAGES)))
    parts = [_evaluate_alone(labels, list(shard(NUM_IMAGES, BLOCK, Ranks(r, 3)))) for r in range(3)]
    confusion = sum(p.counts.confusion for p in parts)
    merged = merge_states([p.state_dict() for p in parts], confusion)
    assert torch.equal(merged.counts.confusion, whole.counts.confusion)
    assert torch.equal(merged.counts.per_image, whole.counts.per_image)
    assert merged.image_ids == whole.image_ids == ["img0", "img1", "img2", "img4"]
    assert merged.scored_at == whole.scored_at and merged.counts.num_images == 4
    assert merged.skipped == whole.skipped and merged.skipped_at == [3]
    assert merged.processed_ids == [f"img{k}" for k in range(NUM_IMAGES)]
    assert merged.num_windows == whole.num_windows
    assert merged.seconds == max(p.seconds for p in parts)  # the slowest rank


# ----------------------------------------------------------------------------- torchrun, 2 processes

@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("voc5")
    ids = write_dataset("voc", root, num_images=NUM_IMAGES)
    text = (configs_dir() / "methods" / "clip.yaml").read_text(encoding="utf-8")
    config = root / "clip9.yaml"  # TCL's 9 templates: quicker text encoding, the same loop
    config.write_text(text.replace("templates: imagenet80", "templates: tcl9"), encoding="utf-8")
    return {"root": root, "ids": ids, "config": config}


def run_args(setup: dict, out: Path) -> list[str]:
    return ["run", "--method", "clip", "--dataset", "voc", "--data-root", str(setup["root"]),
            "--output", str(out), "--model", TINY_MODEL, "--pretrained", "none", "--config", str(setup["config"]),
            "--workers", "0", "--device", "cpu"]


def read(out: Path) -> tuple[dict, np.ndarray, list[str]]:
    (path,) = result_jsons(out)
    result = json.loads(path.read_text(encoding="utf-8"))
    with np.load(out / result["per_image"]["file"]) as npz:
        return result, npz["counts"], [str(i) for i in npz["image_ids"]]


def test_torchrun_two_processes_equal_one(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, stderr = call_cli(run_args(setup, one) + ["--quiet"])
    assert code == 0, stderr

    env = {**os.environ, SAVE_EVERY_ENV: str(BLOCK), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "ovseg_bench"]
    proc = subprocess.run(torchrun + run_args(setup, two), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    want, want_rows, want_ids = read(one)
    got, got_rows, got_ids = read(two)
    assert got_ids == want_ids == setup["ids"]
    assert got_rows.dtype == np.int64 and np.array_equal(got_rows, want_rows)
    assert got["counts"] == want["counts"]
    assert got["metrics"] == want["metrics"]
    assert got["images"] == want["images"]
    assert got["protocol"] == want["protocol"]
    assert got["timing"]["world_size"] == 2 and want["timing"]["world_size"] == 1
    # Only rank 0 prints the summary and reports the file; rank 1's shard leaves no state behind.
    assert proc.stdout.count("dataset") == 1 and proc.stderr.count("mIoU") == 1, proc.stdout + proc.stderr
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
