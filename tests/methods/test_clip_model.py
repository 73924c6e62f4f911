"""The open_clip factory: config JSON models, local weight files, tags, offline behaviour."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
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


# ----------------------------------------------------------------------------- weights that do not fit
def _tiny_config(**vision) -> dict:
    config = json.loads(Path(TINY).read_text())
    config["vision_cfg"].update(vision)
    return config


def _one_line_error(path: Path) -> str:
    with pytest.raises(WeightsError) as err:
        load_clip(TINY, str(path))
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert "weights_only" not in message and "Traceback" not in message
    return message


def test_weights_of_another_width_name_the_keys_and_the_architecture(tmp_path):
    """A file for a registered architecture of width 96 in the width-64 tiny model: no open_clip assert."""
    config = tmp_path / "tiny_vit_wide.json"
    config.write_text(json.dumps(_tiny_config(width=96)))
    path = tmp_path / "wide.bin"
    torch.save(load_clip(str(config), "none").model.state_dict(), path)
    message = _one_line_error(path)
    assert "mis-shaped (44): visual.class_embedding (expected [64], found [96])" in message
    assert "visual.positional_embedding (expected [197, 64], found [197, 96])" in message
    assert "the file looks like tiny_vit_wide weights (vision width 96, 3 layers, patch 16" in message
    assert "not tiny_vit (vision width 64, 3 layers" in message and "--model tiny_vit_wide" in message


def test_weights_of_unregistered_sizes_state_the_inferred_sizes(tmp_path):
    cfg = _tiny_config(width=80, layers=2, patch_size=14)
    net = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True)
    path = tmp_path / "odd.bin"
    torch.save(net.state_dict(), path)
    message = _one_line_error(path)
    assert "unexpected (12): visual.transformer.resblocks" not in message  # 2 layers into 3: missing, not extra
    assert "missing (12): visual.transformer.resblocks.2." in message
    assert "a ViT CLIP with vision width 80, 2 layers, patch 14, image 224, text width 32" in message
    assert "no registered open_clip model" in message


def test_missing_keys_are_listed_by_name(tmp_path):
    state = load_clip(TINY, "none").model.state_dict()
    del state["visual.proj"], state["logit_scale"]
    path = tmp_path / "partial.bin"
    torch.save(state, path)
    message = _one_line_error(path)
    assert "missing (2): logit_scale, visual.proj" in message and "mis-shaped" not in message
    assert "has the sizes of tiny_vit" in message


@pytest.mark.parametrize("content,found", [
    (b"<!DOCTYPE html>\n<html><head><title>open_clip_pytorch_model.bin</title>", "it looks like a web page"),
    (b"definitely not a checkpoint" * 8, "it is a text file"),
])
def test_a_file_that_is_no_checkpoint_gets_a_plain_sentence(tmp_path, content, found):
    path = tmp_path / "open_clip_pytorch_model.bin"
    path.write_bytes(content)
    message = _one_line_error(path)
    assert "not a PyTorch checkpoint" in message and found in message


def test_wrapped_prefixed_and_openai_style_files_still_load(tmp_path):
    """What open_clip.load_checkpoint accepted: {"state_dict": ...}, module. keys, OpenAI's ints, other context."""
    source = load_clip(TINY, "none").model
    state = {f"module.{key}": value for key, value in source.state_dict().items()}
    state["module.positional_embedding"] = state["module.positional_embedding"][:64].clone()  # resized on load
    state["module.context_length"] = torch.tensor(64)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = load_clip(TINY, str(path)).model
    assert torch.equal(loaded.visual.proj, source.visual.proj)
    assert loaded.positional_embedding.shape == source.positional_embedding.shape


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    source = load_clip(TINY, "none").model
    path = tmp_path / "open_clip_model.safetensors"
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, str(path))
    assert torch.equal(load_clip(TINY, str(path)).model.visual.proj, source.visual.proj)


# ----------------------------------------------------------------------------- names and hints
def test_offline_message_links_the_direct_download(monkeypatch):
    monkeypatch.setattr(clip_model, "_is_cached", lambda cfg: False)
    monkeypatch.setattr(clip_model, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsError) as err:
        load_clip("ViT-B-16", "openai")
    message = str(err.value)
    assert "https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/" in message
    assert "/blob/" not in message


@pytest.mark.parametrize("tag", ["opanai", "OPENAI"])
def test_mistyped_tag_suggests_the_close_one(monkeypatch, tag):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_clip("ViT-B-16", tag)
    assert f"'{tag}' is neither a file nor an open_clip pretrained tag of ViT-B-16. Did you mean openai?" in str(
        err.value)


def test_unknown_model_names_a_few_close_ones_not_all(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_clip("vit-b-16", "none")
    message = str(err.value)
    suggested = message.split("Did you mean ")[1].split("?")[0].split(", ")
    assert suggested[0] == "ViT-B-16" and len(suggested) <= 3
    assert "RN50" not in message and "convnext" not in message
    assert 'python -c "import open_clip; print(open_clip.list_models())"' in message
