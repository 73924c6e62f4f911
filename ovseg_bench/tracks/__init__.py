"""The tracks by name (a card's ``track``): semantic, referring, label-conditioned."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Track


def get_track(name: str) -> Track:
    """The track a card names; its module is imported on first use."""
    from .semantic import SEMANTIC

    tracks = {SEMANTIC.name: SEMANTIC}
    if name not in tracks:
        raise ConfigError(f"track '{name}' is not one of {sorted(tracks)}")
    return tracks[name]


__all__ = ["Track", "get_track"]
