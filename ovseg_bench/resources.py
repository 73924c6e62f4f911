"""Where the shipped data files (method configs, protocol presets, dataset cards) live, and the
user cache folder.

In a source checkout or an editable install they are the top-level ``configs/`` and
``datasets/`` folders; a wheel carries them inside the package as ``ovseg_bench/configs`` and
``ovseg_bench/cards`` (see pyproject.toml).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent
_IN_PACKAGE = {"configs": "configs", "datasets": "cards"}


def shipped_dir(kind: str) -> Path:
    """Folder of the shipped ``configs`` or ``datasets`` files."""
    installed = _PACKAGE / _IN_PACKAGE[kind]
    if installed.is_dir():
        return installed
    source = _PACKAGE.parent / kind
    if source.is_dir():
        return source
    raise ConfigError(
        f"the shipped '{kind}' folder is missing (looked in {installed} and {source}); "
        "reinstall ovseg-bench with `pip install .`"
    )


def configs_dir() -> Path:
    return shipped_dir("configs")


def cards_dir() -> Path:
    return shipped_dir("datasets")


def cache_dir(kind: str) -> Path:
    """``$XDG_CACHE_HOME/ovseg_bench/<kind>``, else ``~/.cache/ovseg_bench/<kind>`` (an empty
    ``$XDG_CACHE_HOME`` counts as unset): checkpoints, text embeddings, ReCo's archive embeddings."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ovseg_bench" / kind
