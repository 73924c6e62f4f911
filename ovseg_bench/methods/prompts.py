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
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..resources import cache_dir, configs_dir
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
    """The weights part of a :class:`TextCache` key: the results record of the CLIP weights plus
    the content of what decides them: a local weights file's sha256, a model-config JSON's
    sha256, and for random weights (keyed by their seed) the open_clip and torch versions whose
    initialisation draws them."""
    identity = dict(record)
    for field in ("pretrained", "model_config"):
        path = Path(str(identity.get(field, "")))
        if path.is_file():
            identity[f"{field}_sha256"] = _file_digest(path)
    if identity.get("random"):
        import open_clip

        identity["versions"] = [open_clip.__version__, torch.__version__]
    return identity


def weights_key(record: dict[str, Any]) -> str:
    """One string for the content of a weights record (:func:`text_cache_identity`, plus the
    sha256 of any local ``checkpoint`` file): equal strings, equal weights. Keys shared trunks."""
    identity = text_cache_identity(record)
    path = Path(str(identity.get("checkpoint", "")))
    if path.is_file():
        identity["checkpoint_sha256"] = _file_digest(path)
    return json.dumps(identity, sort_keys=True, default=str)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file, computed once per process for a given (path, size, mtime)."""
    from ..atomic import sha256_file

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


NO_CACHE = "off"  # OVSEG_TEXT_CACHE=off (what `--no-cache` sets) turns the cache off


class TextCache:
    """Text embeddings on disk keyed by the weights' identity (:func:`text_cache_identity`),
    templates, averaging and names; random weights too, keyed by their seed and config.

    Each file holds its key beside the embeddings; a file that cannot be read, or whose key is
    not the one asked for, is recomputed and replaced, never trusted. ``$OVSEG_TEXT_CACHE`` moves
    the cache (``off`` disables it).
    """

    hits = 0      # process-wide: entries read from the cache (the run says so)
    misses = 0

    def __init__(self, root: Path | None = None):
        default = cache_dir("text")
        setting = os.environ.get("OVSEG_TEXT_CACHE")
        self.enabled = setting != NO_CACHE
        self.root = Path(setting if setting and self.enabled else (root or default))

    def key(self, weights: dict[str, Any], templates: tuple[str, ...], average: str, names: list[str]) -> str:
        blob = json.dumps([weights, templates, average, names], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def get_or_compute(self, weights: dict[str, Any], templates: tuple[str, ...], average: str,
                       names: list[str], compute: Any) -> torch.Tensor:
        if not self.enabled:
            return compute()
        key = self.key(weights, templates, average, names)
        path = self.root / f"{key}.pt"
        cached = self._read(path, key, len(names))
        if cached is not None:
            TextCache.hits += 1
            return cached
        TextCache.misses += 1
        embeddings = compute()
        with atomic_path(path) as tmp:
            torch.save({"key": key, "embeddings": embeddings.detach().cpu()}, tmp)
        return embeddings

    @staticmethod
    def _read(path: Path, key: str, rows: int) -> torch.Tensor | None:
        """The cached embeddings, or None when absent, unreadable, or not this key's."""
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file is recomputed, whatever broke it
            return None
        if not isinstance(saved, dict) or saved.get("key") != key:
            return None
        embeddings = saved.get("embeddings")
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] != rows:
            return None
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
        embeddings = self.cache.get_or_compute(self.identity, self.templates, self.average, names,
                                               lambda: self._encode_once(names))
        return embeddings.to(self.device).float()

    def _encode_once(self, names: list[str]) -> torch.Tensor:
        """Rows of ``names``, each name encoded once per process for these weights, templates and
        averaging: methods and datasets that share them (voc20's names are voc's) share the rows.
        A name's row depends on that name alone (its templates are one batch), so this is exact."""
        keys = {name: self.cache.key(self.identity, self.templates, self.average, [name]) for name in names}
        rows = {name: ENCODED[key] for name, key in keys.items() if key in ENCODED}
        missing = [name for name in keys if name not in rows]
        if missing:
            encoded = encode_names(self.model, self.tokenizer, missing, self.templates, self.average, self.device)
            for name, row in zip(missing, encoded):
                rows[name] = row.cpu()
                ENCODED.put(keys[name], rows[name])
        return torch.stack([rows[name] for name in names])


class _Encoded(OrderedDict):
    """Name rows encoded by this process, the most recent ``limit`` kept (2 KiB each at E=512)."""

    limit = 8192

    def put(self, key: str, row: torch.Tensor) -> None:
        self[key] = row
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


ENCODED = _Encoded()
