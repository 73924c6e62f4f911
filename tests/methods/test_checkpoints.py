"""Checkpoint handling shared by the adapters: safe reading, one-line refusals, strict shape checks."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ovseg_bench.errors import WeightsError
from ovseg_bench.methods import checkpoints
from ovseg_bench.methods.checkpoints import (check_state_dict, checkpoint_format, fetch_checkpoint, load_strict,
                                             read_checkpoint)


def refused(path: Path, **kwargs) -> str:
    """read_checkpoint's error for ``path``: one line naming the file, never torch's weights_only advice."""
    with pytest.raises(WeightsError) as err:
        read_checkpoint(path, **kwargs)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and "weights_only" not in message
    return message


# ----------------------------------------------------------------------------- reading
def test_formats_are_told_by_their_first_bytes(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "zip.pth")
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file({"a": torch.ones(2)}, str(tmp_path / "st.safetensors"))
    heads = {name: (tmp_path / name).read_bytes()[:64] for name in ("zip.pth", "legacy.pth", "st.safetensors")}
    assert [checkpoint_format(head) for head in heads.values()] == ["zip", "pickle", "safetensors"]
    assert checkpoint_format(b"<!DOCTYPE html>") is None and checkpoint_format(b"") is None


@pytest.mark.parametrize("save", ["zip", "legacy", "safetensors-as-bin"])
def test_tensors_load_whatever_the_suffix(tmp_path, save):
    path = tmp_path / "weights.bin"
    if save == "safetensors-as-bin":
        save_file({"a": torch.arange(3.0)}, str(path))
    else:
        torch.save({"a": torch.arange(3.0)}, path, _use_new_zipfile_serialization=save == "zip")
    assert torch.equal(read_checkpoint(path)["a"], torch.arange(3.0))


def test_a_saved_web_page_says_to_download_the_file_itself(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    path.write_text("<!DOCTYPE html>\n<html class=''><head><meta charset='utf-8'><title>model</title>")
    message = refused(path)
    assert "not a PyTorch checkpoint (it starts with '<!DOCTYPE html>'... it looks like a web page" in message
    assert "the /resolve/ link" in message


@pytest.mark.parametrize("content,found", [
    (b"definitely not a checkpoint" * 8, "it starts with 'definitely not a checkpo'... it is a text file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 99\n", "Git LFS pointer"),
    (b"", "the file is empty"),
    (bytes(range(200, 256)), "it starts with bytes c8 c9 ca cb"),
])
def test_other_non_checkpoints_say_what_they_are(tmp_path, content, found):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    message = refused(path, hint="pass the release file")
    assert "not a PyTorch checkpoint" in message and found in message
    assert message.endswith("; pass the release file")


def test_pickled_python_objects_are_refused_for_safety(tmp_path):
    path = tmp_path / "with_numpy.pth"
    torch.save({"weight": np.zeros(3)}, path)
    message = refused(path)
    assert "holds Python objects other than tensors (first: numpy." in message and "refused for safety" in message
    assert "add_safe_globals" not in message


@pytest.mark.parametrize("kind", ["zip", "pickle", "safetensors"])
def test_truncated_files_are_damaged_not_foreign(tmp_path, kind):
    path = tmp_path / "cut.bin"
    if kind == "safetensors":
        save_file({"a": torch.zeros(64)}, str(path))
    else:
        torch.save({"a": torch.zeros(64)}, path, _use_new_zipfile_serialization=kind == "zip")
    path.write_bytes(path.read_bytes()[:40])
    assert "damaged or truncated" in refused(path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but such files are still around
def test_a_torchscript_archive_is_refused_for_safety(tmp_path):
    path = tmp_path / "jit.pt"
    torch.jit.save(torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    assert "a TorchScript program, not a state dict of tensors, refused for safety" in refused(path)


# ----------------------------------------------------------------------------- checking
def test_check_state_dict_lists_every_kind_with_counts_and_first_names():
    expected = {f"w{i}": (2,) for i in range(8)}
    state = {f"w{i}": torch.zeros(3) for i in range(7)}  # w7 missing, all others mis-shaped
    state["extra"] = torch.zeros(1)
    state["w0"] = 1.5  # not a tensor at all
    with pytest.raises(WeightsError) as err:
        check_state_dict(state, expected, source="f.bin", hint="pass the right file")
    message = str(err.value)
    assert message.startswith("f.bin: the tensors do not fit the model (8 expected, 8 in the file): ")
    assert "missing (1): w7; unexpected (1): extra; mis-shaped (7): w0 (expected [2], found float), " in message
    assert "w4 (expected [2], found [3]), ... and 2 more; pass the right file" in message
    check_state_dict({"a": torch.zeros(2, 3)}, {"a": (2, 3)}, source="ok.bin")  # a fit passes silently


def test_load_strict_checks_before_loading():
    module = nn.Linear(3, 2)
    before = module.weight.clone()
    with pytest.raises(WeightsError, match=r"mis-shaped \(1\): weight \(expected \[2, 3\], found \[2, 4\]\)"):
        load_strict(module, {"weight": torch.ones(2, 4), "bias": torch.ones(2)}, source="m.pth")
    assert torch.equal(module.weight, before)  # nothing half-loaded
    load_strict(module, {"weight": torch.ones(2, 3), "bias": torch.ones(2)}, source="m.pth")
    assert torch.equal(module.weight, torch.ones(2, 3))


# ----------------------------------------------------------------------------- download
def test_a_failed_download_names_what_was_fetched(tmp_path, monkeypatch):
    def no_network(url, target):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(checkpoints, "_download", no_network)
    url = "https://example.org/releases/reco.pth"
    with pytest.raises(WeightsError) as err:
        fetch_checkpoint(url, tmp_path, what="ReCo checkpoint")
    message = str(err.value)
    assert message.startswith(f"cannot download the ReCo checkpoint {url} (")
    assert "--checkpoint PATH_TO/reco.pth" in message
