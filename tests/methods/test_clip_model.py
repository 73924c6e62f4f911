"""The open_clip factory: config JSON models, local weight files, tags, offline behaviour."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ovseg_bench.errors import ConfigError, WeightsError
from ovseg_bench.methods import clip_model
from ovseg_bench.methods.clip_model import load_clip

TINY = str(Path(__file__).parents[1] / "assets" / "tiny_vit.json")


def test_random_weights_are_seeded_and_flagged():
    a, b = load_clip(TINY, "none"), load_clip(TINY, "none")
    assert a.record["random"] is True and a.record["architecture"] == "tiny_vit"
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_local_weights_file_in_open_clip_layout_loads(tmp_path):
    source = load_clip(TINY, "none").model
    with torch.no_grad():
        source.visual.proj.mul_(3.0)  # make it differ from the seeded random init
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(source.state_dict(), path)
    loaded = load_clip(TINY, str(path))
    assert loaded.record["random"] is False and loaded.record["pretrained"] == str(path.resolve())
    assert torch.equal(loaded.model.visual.proj, source.visual.proj)


def test_a_file_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "wrong.bin"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsError, match="wrong.bin"):
        load_clip(TINY, str(path))


def test_unknown_model_and_tag_suggest_what_exists():
    with pytest.raises(ConfigError, match="ViT-B-16"):
        load_clip("ViT-B-61", "none")
    with pytest.raises(ConfigError, match="openai"):
        load_clip("ViT-B-16", "opnai")
    with pytest.raises(ConfigError, match="not found"):
        load_clip("missing_config.json", "none")


def test_offline_without_cache_says_what_to_download(monkeypatch):
    monkeypatch.setattr(clip_model, "_is_cached", lambda cfg: False)
    monkeypatch.setattr(clip_model, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsError) as err:
        load_clip("ViT-B-16", "openai")
    message = str(err.value)
    assert "huggingface.co/timm/vit_base_patch16_clip_224.openai" in message
    assert "--model ViT-B-16-quickgelu --pretrained" in message and "--pretrained none" in message
