"""Prompt templates and class-name text embeddings, shared by every CLIP-based adapter: the
one CLIP text encoder (:class:`ClipTextEncoder`) with its on-disk cache.

The two averaging orders of the references:
``raw``: mean of the raw template embeddings, then L2-normalise (TCL, models/tcl/tcl.py
``build_text_embedding``);
``normalised``: L2-normalise each template embedding, mean, L2-normalise (MaskCLIP,
tools/maskclip_utils/prompt_engineering.py; the SCLIP family's clip_segmentor.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..resources import configs_dir
from ..atomic import atomic_path

AVERAGING = ("raw", "normalised")


def load_templates(name: str) -> tuple[str, ...]:
    """Templates of a shipped set (``configs/templates/<name>.txt``), one per line."""
    path = configs_dir() / "templates" / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise ConfigError(f"unknown template set '{name}'; known: {', '.join(known)}")
    return tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line)


@torch.no_grad()
def encode_names(model: Any, tokenizer: Any, names: list[str], templates: tuple[str, ...],
                 average: str, device: torch.device | str) -> torch.Tensor:
    """[len(names), E] float32 L2-normalised text embeddings, one row per name."""
    if average not in AVERAGING:
        raise ConfigError(f"template averaging '{average}' is not one of {AVERAGING}")
    rows = []
    for name in names:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)
        feats = model.encode_text(tokens)  # averaged in the tower's dtype, as the references do (fp16 for ReCo's retrieval)
        if average == "normalised":
            feats = F.normalize(feats, dim=-1)
        rows.append(F.normalize(feats.mean(dim=0), dim=-1).float())
    return torch.stack(rows)


def text_cache_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The weights part of a :class:`TextCache` key: the results record of the CLIP weights plus,
    for a local weights file, its size and mtime (a replaced file must not hit old entries)."""
    identity = dict(record)
    path = Path(str(identity.get("pretrained", "")))
    if path.is_file():
        stat = path.stat()
        identity["file_stat"] = [stat.st_size, stat.st_mtime_ns]
    return identity


class TextCache:
    """Text embeddings on disk keyed by weights, templates, averaging and names.

    Random weights are never cached (their identity is the seed, cheap to recompute anyway).
    """

    def __init__(self, root: Path | None = None):
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ovseg_bench" / "text"
        self.root = Path(os.environ.get("OVSEG_TEXT_CACHE", root or default))

    def key(self, weights: dict[str, Any], templates: tuple[str, ...], average: str, names: list[str]) -> str:
        blob = json.dumps([weights, templates, average, names], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def get_or_compute(self, weights: dict[str, Any], templates: tuple[str, ...], average: str,
                       names: list[str], compute: Any) -> torch.Tensor:
        if weights.get("random"):
            return compute()
        path = self.root / f"{self.key(weights, templates, average, names)}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        embeddings = compute()
        with atomic_path(path) as tmp:
            torch.save(embeddings.cpu(), tmp)
        return embeddings


class ClipTextEncoder:
    """A CLIP model's text tower with its template set, averaging order and on-disk cache: what
    every CLIP-based adapter (the CLIP family, TCL, and later GLCF and CLIP-ES) encodes names with.

    ``weights`` is the weights record written into results (:class:`~.clip_model.LoadedClip`),
    which keys the cache together with the templates, the averaging and the names.
    """

    def __init__(self, model: Any, tokenizer: Any, weights: dict[str, Any], *, templates: str, average: str,
                 device: torch.device | str, cache: TextCache | None = None):
        if average not in AVERAGING:
            raise ConfigError(f"template averaging '{average}' is not one of {AVERAGING}")
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.templates, self.average = load_templates(templates), average
        self.identity = text_cache_identity(weights)
        self.cache = cache or TextCache()

    def encode(self, names: list[str]) -> torch.Tensor:
        """[len(names), E] float32 L2-normalised embeddings on the device, one row per name."""
        embeddings = self.cache.get_or_compute(
            self.identity, self.templates, self.average, names,
            lambda: encode_names(self.model, self.tokenizer, names, self.templates, self.average, self.device))
        return embeddings.to(self.device).float()
