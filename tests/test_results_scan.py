"""Reading result folders (ovseg_bench.results.scan_results*) and run identity (ovseg_bench.identity)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ovseg_bench.errors import DataError
from ovseg_bench.identity import config_digest, method_variant, result_config_digest
from ovseg_bench.results import SCHEMA, scan_results, scan_results_with_skipped, skipped_note


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two results, and beside them what readers must pass over."""
    write(tmp_path / "b" / "clip__voc.json", {"schema": SCHEMA, "n": 2})
    write(tmp_path / "a.json", {"schema": SCHEMA, "n": 1})
    write(tmp_path / "notes.json", {"title": "why these runs"})                # no schema
    write(tmp_path / "b" / "baseline.json", {"schema": "ovseg-bench/baseline/v1", "entries": {}})
    write(tmp_path / "list.json", [1, 2, 3])                                   # not a mapping
    write(tmp_path / ".tmp-a.json", "{half a writ")                            # an atomic write in flight
    write(tmp_path / ".hidden" / "x.json", "not json at all")
    return tmp_path


def test_results_are_read_and_other_json_is_skipped_in_path_order(folder):
    found, skipped = scan_results_with_skipped(folder)
    assert [p.relative_to(folder).as_posix() for p, _ in found] == ["a.json", "b/clip__voc.json"]
    assert [result["n"] for _, result in found] == [1, 2]
    assert [p.relative_to(folder).as_posix() for p in skipped] == ["b/baseline.json", "list.json", "notes.json"]
    assert scan_results(folder) == found  # the older entry point: results only


def test_skipped_note_is_one_line_naming_the_files(folder, tmp_path):
    _, skipped = scan_results_with_skipped(folder)
    assert skipped_note(folder, skipped) == (f"skipped 3 JSON file(s) that are not result files under {folder}: "
                                             "b/baseline.json, list.json, notes.json")
    many = [folder / f"n{i}.json" for i in range(7)]
    assert skipped_note(folder, many).endswith("n3.json, n4.json and 2 more")
    assert skipped_note(folder, []) is None


@pytest.mark.parametrize("text, message", [
    ('{"schema": "ovseg-bench/result/v2", "method":', "not a readable result file"),
    ("", "not a readable result file"),
    ('{"schema": "ovseg-bench/result/v9"}', "'ovseg-bench/result/v9' is not"),
])
def test_a_broken_or_future_result_fails_naming_the_file(folder, text, message):
    write(folder / "sub" / "broken.json", text)
    with pytest.raises(DataError) as info:
        scan_results_with_skipped(folder)
    assert str(folder / "sub" / "broken.json") in str(info.value) and message in str(info.value)


def test_a_file_given_by_name_is_always_read_as_a_result(folder):
    with pytest.raises(DataError, match="notes.json"):
        scan_results_with_skipped(folder / "notes.json")
    assert scan_results_with_skipped(folder / "a.json") == ([(folder / "a.json", {"schema": SCHEMA, "n": 1})], [])


def test_config_digest_is_the_sha256_of_the_canonical_json():
    config = {"templates": "maskclip85", "logit_scale": 40.0, "pamr_settings": {"dilations": [1, 2]}}
    canonical = '{"logit_scale":40.0,"pamr_settings":{"dilations":[1,2]},"templates":"maskclip85"}'
    assert config_digest(config) == hashlib.sha256(canonical.encode()).hexdigest()
    assert config_digest(dict(reversed(list(config.items())))) == config_digest(config)  # key order
    assert config_digest({**config, "pamr_settings": {"dilations": (1, 2)}}) == config_digest(config)
    assert config_digest({**config, "logit_scale": 50.0}) != config_digest(config)


def test_identity_of_older_and_newer_files():
    older = {"method": {"name": "clip", "config": {"a": 1}}}
    assert method_variant(older) is None and result_config_digest(older) == config_digest({"a": 1})
    newer = {"method": {"name": "clip", "variant": "my_thresh", "config": {"a": 1}, "config_sha256": "f" * 64}}
    assert method_variant(newer) == "my_thresh" and result_config_digest(newer) == "f" * 64
    assert method_variant({"method": {"variant": None}}) is None
