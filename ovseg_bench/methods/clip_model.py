"""One factory for the open_clip models every CLIP-based adapter builds on.

``--model`` is an open_clip architecture name or the path of an open_clip model-config JSON (so
tests and CI run a tiny model); ``--pretrained`` is an open_clip tag (fetched through open_clip
from Hugging Face and cached), a local weights file, or ``none`` for seeded random weights whose
numbers are meaningless and flagged as such everywhere. A local file is checked name by name and
shape by shape before anything loads; one that does not fit names the architecture its shapes
belong to.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import os
import pickle
import re
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError, WeightsError
from .checkpoints import check_state_dict, load_strict, read_checkpoint

RANDOM = "none"
RANDOM_SEED = 0
# Printed wherever numbers of random weights are shown (the run table, predict).
RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS (--pretrained none): numbers test the pipeline only and mean nothing"
LIST_MODELS = 'python -c "import open_clip; print(open_clip.list_models())"'
_MAX_SUGGESTED = 3  # close names offered for a mistyped model or tag
_MAX_MATCHES = 4  # registered architectures named for a file of other sizes
# Ints OpenAI's JIT files keep beside the weights; open_clip drops them too.
_OPENAI_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")
_VISION_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.")


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
        _load_local(net, Path(pretrained).expanduser(), name=name)
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
    known = open_clip.list_models()
    if model not in known:
        close = _close_matches(model, known)
        guess = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown open_clip model '{model}'.{guess} Pass an open_clip model name or a model-config "
                          f"JSON file; list the {len(known)} known names with: {LIST_MODELS}")
    return model


def _close_matches(word: str, known: list[str], n: int = _MAX_SUGGESTED) -> list[str]:
    """Up to ``n`` entries of ``known`` close to ``word``, ignoring case (``OPENAI`` finds ``openai``)."""
    by_lower: dict[str, str] = {}
    for name in known:
        by_lower.setdefault(name.lower(), name)
    return [by_lower[match] for match in difflib.get_close_matches(word.lower(), list(by_lower), n=n)]


def _load_local(net: torch.nn.Module, path: Path, *, name: str = "this architecture") -> None:
    """Load a local weights file into ``net``, refusing it unless every name and shape fits.

    Accepts what ``open_clip.load_checkpoint`` accepts: a state dict, bare or under
    ``state_dict``/``model``, keys prefixed ``module.`` or not, in open_clip's, OpenAI's or a
    converted third-party layout, with position tables of another length (resized as open_clip
    does); big_vision ``.npz`` files go to open_clip itself. ``name`` is the architecture of
    ``net`` for the message.

    Raises:
        WeightsError: before anything is loaded, listing the keys that do not fit and naming the
            architecture the file seems to be made for.
    """
    if path.suffix in (".npz", ".npy"):
        _load_big_vision(net, path, name)
        return
    state = _open_clip_layout(net, _state_dict_of(read_checkpoint(path), path, name))
    hint = _architecture_hint(state, net, name)
    check_state_dict(state, _fitting_shapes(net, state), source=str(path), hint=hint)
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    resize_pos_embed(state, net)
    resize_text_pos_embed(state, net)
    load_strict(net, state, source=str(path), hint=hint)


def _load_big_vision(net: torch.nn.Module, path: Path, name: str) -> None:
    import open_clip

    try:
        open_clip.load_checkpoint(net, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError, OSError, AssertionError, pickle.UnpicklingError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{path}: not big_vision weights of {name} ({first_line[:200]}); pass the .npz file "
                           f"released for --model {name}") from None


def _state_dict_of(checkpoint: Any, path: Path, name: str) -> dict[str, Any]:
    """The name -> tensor mapping inside what was read, without wrappers, ``module.`` or OpenAI's ints."""
    if isinstance(checkpoint, Mapping):
        for wrapper in ("state_dict", "model"):  # training scripts save {"state_dict": ...} or {"model": ...}
            if isinstance(checkpoint.get(wrapper), Mapping):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        found = "an empty dict" if isinstance(checkpoint, Mapping) else f"a {type(checkpoint).__name__}"
        raise WeightsError(f"{path}: expected a state dict (parameter name -> tensor), found {found}; pass the "
                           f"open_clip_pytorch_model.bin or .safetensors file of --model {name}")
    state = {str(key): value for key, value in checkpoint.items()}
    if all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    for key in _OPENAI_ATTRIBUTES:
        state.pop(key, None)
    return state


def _open_clip_layout(net: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The conversions ``open_clip.load_checkpoint`` applies before loading, minus the load."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    state = dict(convert_state_dict(net, state))  # third-party layouts (MobileCLIP)
    if "positional_embedding" in state and not hasattr(net, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # text tower keys moved under text.
    for key in ("logit_scale", "logit_bias"):  # scalar vs 1-element parameter, both in the wild
        ours, value = getattr(net, key, None), state.get(key)
        if isinstance(ours, Tensor) and isinstance(value, Tensor) and value.numel() == ours.numel():
            state[key] = value.reshape(ours.shape)
    if getattr(net, "logit_bias", None) is not None and isinstance(state.get("logit_scale"), Tensor):
        state.setdefault("logit_bias", torch.zeros_like(state["logit_scale"]))  # CLIP weights into SigLIP
    state.pop("text.transformer.embeddings.position_ids", None)  # dropped by transformers >= 4.31
    return state


def _fitting_shapes(net: torch.nn.Module, state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``net``'s shapes, except position tables of another length that open_clip's resizers fit."""
    expected = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    for key in ("visual.positional_embedding", "positional_embedding", "text.positional_embedding"):
        value = state.get(key)
        if key not in expected or not isinstance(value, Tensor) or value.ndim != 2 or len(expected[key]) != 2:
            continue
        if value.shape[1] != expected[key][1] or value.shape[0] < 2:
            continue  # another width is another architecture
        if key.startswith("visual.") and (not hasattr(net.visual, "grid_size") or not _is_square(value.shape[0] - 1)):
            continue  # resize_pos_embed needs a class token plus a square grid
        expected[key] = tuple(value.shape)
    return expected


def _is_square(count: int) -> bool:
    return count > 0 and math.isqrt(count) ** 2 == count


# ----------------------------------------------------------------------------- which architecture a file is for
def _vit_dimensions(state: Mapping[str, Any]) -> dict[str, int]:
    """ViT CLIP sizes read off a state dict's shapes: width, layers, patch, image, text_width (those found)."""
    dims: dict[str, int] = {}
    conv = state.get("visual.conv1.weight")
    if isinstance(conv, Tensor) and conv.ndim == 4:
        dims["width"], dims["patch"] = int(conv.shape[0]), int(conv.shape[-1])
    cls = state.get("visual.class_embedding")
    if isinstance(cls, Tensor) and cls.ndim == 1:
        dims["width"] = int(cls.shape[0])
    blocks = {match.group(1) for key in state if (match := _VISION_BLOCK.match(key))}
    if blocks:
        dims["layers"] = len(blocks)
    tokens = state.get("token_embedding.weight", state.get("text.token_embedding.weight"))
    if isinstance(tokens, Tensor) and tokens.ndim == 2:
        dims["text_width"] = int(tokens.shape[1])
    pos = state.get("visual.positional_embedding")
    if "patch" in dims and isinstance(pos, Tensor) and pos.ndim == 2 and _is_square(pos.shape[0] - 1):
        dims["image"] = math.isqrt(pos.shape[0] - 1) * dims["patch"]
    return dims


def _config_dimensions(cfg: Mapping[str, Any]) -> dict[str, int] | None:
    """The same sizes from an open_clip model config; None for timm or ResNet image towers."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    vision_defaults, text_defaults = CLIPVisionCfg(), CLIPTextCfg()
    layers = vision.get("layers", vision_defaults.layers)
    if "timm_model_name" in vision or not isinstance(layers, int):
        return None
    dims = {"width": vision.get("width", vision_defaults.width), "layers": layers,
            "patch": vision.get("patch_size", vision_defaults.patch_size)}
    image = vision.get("image_size", vision_defaults.image_size)
    if isinstance(image, int):
        dims["image"] = image
    if "hf_model_name" not in text:
        dims["text_width"] = text.get("width", text_defaults.width)
    return dims


def _matching_models(dims: Mapping[str, int], *, coca: bool) -> list[str]:
    """Registered open_clip models with these sizes, only those of the same image size if any.

    Shortest names first, so the plain architecture (``ViT-L-14``) leads its variants.
    """
    import open_clip

    keys = [key for key in ("width", "layers", "patch", "text_width") if key in dims]
    matches = []
    for model in open_clip.list_models():
        cfg = open_clip.get_model_config(model) or {}
        found = _config_dimensions(cfg)
        if found is not None and ("multimodal_cfg" in cfg) == coca and all(found.get(k) == dims[k] for k in keys):
            matches.append((model, found.get("image")))
    same_image = [model for model, image in matches if image == dims.get("image")]
    return sorted(same_image or [model for model, _ in matches], key=lambda model: (len(model), model))


def _describe(dims: Mapping[str, int]) -> str:
    labels = (("width", "vision width {}"), ("layers", "{} layers"), ("patch", "patch {}"), ("image", "image {}"),
              ("text_width", "text width {}"))
    return ", ".join(label.format(dims[key]) for key, label in labels if key in dims)


def _architecture_hint(state: Mapping[str, Any], net: torch.nn.Module, name: str) -> str:
    """What the file seems to be made for, inferred from its shapes, and what to pass instead."""
    found, ours = _vit_dimensions(state), _vit_dimensions(net.state_dict())
    if "width" not in found:
        return (f"its keys are not those of an open_clip ViT CLIP; pass the open_clip_pytorch_model.bin or "
                f".safetensors file of --model {name}")
    if all(ours.get(key) == value for key, value in found.items() if key != "image"):
        return (f"the file has the sizes of {name} ({_describe(found)}) but not all of its tensors, so it may be "
                f"truncated or saved from a modified model; pass the complete weights file of --model {name}")
    matches = _matching_models(found, coca=any(key.startswith("text_decoder.") for key in state))
    if not matches:
        return (f"the file holds a ViT CLIP with {_describe(found)}, sizes no registered open_clip model has, not "
                f"{name} ({_describe(ours)}); pass the weights file of --model {name}, or a --model config JSON "
                "with the file's sizes")
    more = f" (and {len(matches) - _MAX_MATCHES} more)" if len(matches) > _MAX_MATCHES else ""
    return (f"the file looks like {', '.join(matches[:_MAX_MATCHES])}{more} weights ({_describe(found)}), not "
            f"{name} ({_describe(ours)}); pass --model {matches[0]} with this file, or the weights file of "
            f"--model {name}")


def _create_with_tag(open_clip: Any, name: str, tag: str) -> torch.nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        close = _close_matches(tag, tags)
        guess = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"'{tag}' is neither a file nor an open_clip pretrained tag of {name}.{guess} Tags of {name}: "
            f"{', '.join(tags) or 'none'}; use --pretrained none for random weights"
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
    where = f"https://huggingface.co/{hub[0]}/resolve/main/{hub[1]}" if hub else cfg.get("url", "the open_clip release")
    # A file loads into the architecture as named; OpenAI weights need QuickGELU, which the tag
    # switches on by itself but a plain file path cannot.
    model = f"{name}-quickgelu" if cfg.get("quick_gelu") and not name.endswith("-quickgelu") else name
    return (
        f"cannot download the '{tag}' weights of {name} (no network or no cache): download {where} "
        f"and pass --model {model} --pretrained PATH_TO_THAT_FILE, or run the pipeline with random weights: --pretrained none"
    )
