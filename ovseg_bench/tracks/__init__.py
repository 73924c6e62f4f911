"""The tracks by name (a card's ``track``): semantic, referring, label-conditioned."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Track


def get_track(name: str) -> Track:
    """The track a card names; its module is imported on first use."""
    from .label_conditioned import LABEL_CONDITIONED
    from .referring import REFERRING
    from .semantic import SEMANTIC

    tracks = {track.name: track for track in (SEMANTIC, REFERRING, LABEL_CONDITIONED)}
    if name not in tracks:
        raise ConfigError(f"track '{name}' is not one of {sorted(tracks)}")
    return tracks[name]


__all__ = ["Track", "get_track"]
