"""The on-disk text-embedding cache (issue 15): random weights cached by seed and config, files
that are corrupt or belong to other weights recomputed, `--no-cache`, the console line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ovseg_bench.methods.prompts import TextCache, text_cache_identity
from tests.conftest import TINY_MODEL, call_cli, run_argv

RANDOM = {"architecture": "tiny_vit", "pretrained": "none", "random": True, "seed": 0, "model_config": TINY_MODEL}


class Counting:
    def __init__(self, rows: int = 2):
        self.calls, self.rows = 0, rows

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return torch.arange(self.rows * 3, dtype=torch.float32).reshape(self.rows, 3) + self.calls


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> TextCache:
    monkeypatch.setenv("OVSEG_TEXT_CACHE", str(tmp_path / "cache"))
    return TextCache()


def lookup(cache: TextCache, compute: Counting, identity=None, names=("cat", "dog")) -> torch.Tensor:
    return cache.get_or_compute(identity or text_cache_identity(RANDOM), ("a {}.",), "normalised", list(names), compute)


def test_random_weights_are_cached_by_seed_and_config(cache):
    compute = Counting()
    first, second = lookup(cache, compute), lookup(cache, compute)
    assert compute.calls == 1 and torch.equal(first, second)
    other_seed = text_cache_identity({**RANDOM, "seed": 1})
    lookup(cache, compute, identity=other_seed)
    assert compute.calls == 2


def test_the_model_configs_content_is_part_of_the_key(cache, tmp_path):
    config = tmp_path / "tiny_vit.json"
    config.write_text(Path(TINY_MODEL).read_text())
    compute = Counting()
    lookup(cache, compute, identity=text_cache_identity({**RANDOM, "model_config": str(config)}))
    data = json.loads(config.read_text())
    data["text_cfg"]["layers"] = 3
    config.write_text(json.dumps(data))
    lookup(cache, compute, identity=text_cache_identity({**RANDOM, "model_config": str(config)}))
    assert compute.calls == 2


@pytest.mark.parametrize("damage", ["garbage", "other key", "wrong rows"])
def test_a_corrupt_or_foreign_file_is_recomputed_and_replaced(cache, damage):
    compute = Counting()
    lookup(cache, compute)
    (path,) = list(cache.root.glob("*.pt"))
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "other key":
        torch.save({"key": "0" * 64, "embeddings": torch.zeros(2, 3)}, path)
    else:
        torch.save({"key": path.stem, "embeddings": torch.zeros(5, 3)}, path)
    again = lookup(cache, compute)
    assert compute.calls == 2 and torch.equal(again, torch.arange(6.0).reshape(2, 3) + 2)
    assert torch.equal(lookup(cache, compute), again) and compute.calls == 2  # the replacement is trusted


def test_off_disables_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OVSEG_TEXT_CACHE", "off")
    compute = Counting()
    lookup(TextCache(), compute)
    lookup(TextCache(), compute)
    assert compute.calls == 2


def test_a_second_run_reads_the_cache_and_says_so_and_no_cache_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("OVSEG_TEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(TextCache, "hits", 0)
    monkeypatch.setattr(TextCache, "misses", 0)
    argv = run_argv("clip", "demo", tmp_path / "out")
    code, _, stderr = call_cli(argv)
    assert code == 0, stderr
    assert "read from the cache" not in stderr and list((tmp_path / "cache").glob("*.pt"))
    code, _, stderr = call_cli(run_argv("clip", "demo", tmp_path / "out2"))
    assert code == 0 and "read from the cache" in stderr, stderr
    monkeypatch.setattr(TextCache, "hits", 0)
    before = sorted((tmp_path / "cache").glob("*.pt"))
    code, _, stderr = call_cli(run_argv("clip", "demo", tmp_path / "out3", "--no-cache"))
    assert code == 0 and "read from the cache" not in stderr, stderr
    assert sorted((tmp_path / "cache").glob("*.pt")) == before
