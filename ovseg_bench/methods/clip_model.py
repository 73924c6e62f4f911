"""One factory for the open_clip models every CLIP-based adapter builds on.

``--model`` is an open_clip architecture name or the path of an open_clip model-config JSON (so
tests and CI run a tiny model); ``--pretrained`` is an open_clip tag (fetched through open_clip
from Hugging Face and cached), a local weights file, or ``none`` for seeded random weights whose
numbers are meaningless and flagged as such everywhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import socket
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError

from ..errors import ConfigError, WeightsError

RANDOM = "none"
RANDOM_SEED = 0


@dataclasses.dataclass
class LoadedClip:
    model: Any          # open_clip CLIP, eval mode
    tokenizer: Any
    record: dict[str, Any]  # the weights identity written into results


def load_clip(model: str, pretrained: str, device: torch.device | str = "cpu") -> LoadedClip:
    """Build an open_clip model and its tokenizer with the requested weights."""
    import open_clip

    name = _register_model(model)
    if pretrained == RANDOM:
        torch.manual_seed(RANDOM_SEED)  # same random weights every run: pipeline tests are repeatable
        with _quiet_root_logger():  # open_clip warns that no weights were loaded: we flag that ourselves
            net = open_clip.create_model(name, pretrained=None)
        record = {"architecture": name, "pretrained": RANDOM, "random": True, "seed": RANDOM_SEED}
    elif Path(pretrained).expanduser().is_file():
        with _quiet_root_logger():
            net = open_clip.create_model(name, pretrained=None)
        _load_local(net, Path(pretrained).expanduser())
        record = {"architecture": name, "pretrained": str(Path(pretrained).expanduser().resolve()), "random": False}
    else:
        net = _create_with_tag(open_clip, name, pretrained)
        record = {"architecture": name, "pretrained": pretrained, "random": False}
    if model.endswith(".json"):
        record["model_config"] = str(Path(model).resolve())
    net = net.to(device).eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return LoadedClip(net, open_clip.get_tokenizer(name), record)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _register_model(model: str) -> str:
    """Architecture name for ``model``; a config JSON is registered under its file stem."""
    import open_clip

    if model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(f"model config {path} not found; pass an open_clip model name or an existing JSON file")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        from ..registry import unknown_name_message

        raise ConfigError(unknown_name_message("open_clip model", model, open_clip.list_models()))
    return model


def _load_local(net: torch.nn.Module, path: Path) -> None:
    import open_clip

    try:
        open_clip.load_checkpoint(net, str(path), strict=True, weights_only=True)
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise WeightsError(
            f"{path}: not an open_clip state dict for this architecture ({first_line[:300]}). "
            "Pass the open_clip_pytorch_model.bin or .safetensors file of the same --model"
        ) from None


def _create_with_tag(open_clip: Any, name: str, tag: str) -> torch.nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise ConfigError(
            f"'{tag}' is neither a file nor an open_clip pretrained tag of {name} (tags: {', '.join(tags) or 'none'}); "
            "use --pretrained none for random weights"
        )
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not _is_cached(cfg) and not _hub_reachable():
        raise WeightsError(_offline_message(name, tag, cfg))
    try:
        return open_clip.create_model(name, pretrained=tag)
    except RuntimeError as exc:
        raise WeightsError(f"{_offline_message(name, tag, cfg)} ({str(exc).splitlines()[0][:200]})") from None


def _hub_file(cfg: dict[str, Any]) -> tuple[str, str] | None:
    """(repo id, file name) of a pretrained config's Hugging Face copy, if it has one."""
    parts = cfg.get("hf_hub", "").strip("/").split("/")
    if len(parts) < 2:
        return None
    return "/".join(parts[:2]), "/".join(parts[2:]) or "open_clip_pytorch_model.bin"


def _is_cached(cfg: dict[str, Any]) -> bool:
    hub = _hub_file(cfg)
    if hub is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in (hub[1], "open_clip_model.safetensors"):
        found = try_to_load_from_cache(hub[0], filename)
        if isinstance(found, str):
            return True
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast offline: huggingface_hub would otherwise retry for about a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(name: str, tag: str, cfg: dict[str, Any]) -> str:
    hub = _hub_file(cfg)
    where = f"https://huggingface.co/{hub[0]}/blob/main/{hub[1]}" if hub else cfg.get("url", "the open_clip release")
    # A file loads into the architecture as named; OpenAI weights need QuickGELU, which the tag
    # switches on by itself but a plain file path cannot.
    model = f"{name}-quickgelu" if cfg.get("quick_gelu") and not name.endswith("-quickgelu") else name
    return (
        f"cannot download the '{tag}' weights of {name} (no network or no cache): download {where} "
        f"and pass --model {model} --pretrained PATH_TO_THAT_FILE, or run the pipeline with random weights: --pretrained none"
    )
