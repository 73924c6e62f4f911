"""Protocol presets: per-dataset data-side settings, resolved and fingerprinted.

A preset (``configs/protocols/<name>.yaml``) fixes for every dataset the resize (short side S,
long side cap L, mmcv rounding), the inference mode (slide crop/stride, or whole image) and the
class-name scheme. Method-side knobs (templates, thresholds, refinement) live in the method
configs. The fingerprint hashes everything that changes the arithmetic of a run and is the same
for every method, so tables and the regression gate only compare like with like.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from typing import Any

from ..errors import ConfigError
from ..registry import unknown_name_message
from ..resources import configs_dir
from ..yamlconf import from_mapping, read_yaml

MODES = ("slide", "whole")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
    """Effective data-side settings of one dataset under a preset."""

    short_side: int
    long_side: int
    mode: str
    crop: int
    stride: int
    classnames: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"inference mode '{self.mode}' is not one of {MODES}")
        if min(self.short_side, self.long_side, self.crop, self.stride) <= 0:
            raise ConfigError(f"sizes must be positive, found {self}")


@dataclasses.dataclass(frozen=True)
class ProtocolPreset:
    name: str
    description: str
    source: str
    defaults: dict[str, Any]
    datasets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def settings_for(self, dataset: str) -> DatasetSettings:
        merged = {**self.defaults, **self.datasets.get(dataset, {})}
        return from_mapping(DatasetSettings, merged, f"protocol '{self.name}', dataset '{dataset}'")

    def definition(self) -> dict[str, Any]:
        """The preset's arithmetic-relevant content (description and source excluded)."""
        return {"name": self.name, "defaults": dict(self.defaults),
                "datasets": {k: dict(v) for k, v in sorted(self.datasets.items())}}


@lru_cache(maxsize=None)
def load_protocol(name: str) -> ProtocolPreset:
    path = configs_dir() / "protocols" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(unknown_name_message("protocol", name, protocol_names()))
    preset = from_mapping(ProtocolPreset, read_yaml(path), str(path))
    preset.settings_for("__defaults__")  # validate the defaults early, naming the file
    for dataset in preset.datasets:
        preset.settings_for(dataset)
    return preset


def protocol_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "protocols").glob("*.yaml"))


# Which images a ``--limit N`` run evaluates. It is part of the fingerprint, so results of
# different subsets never compare as equal; the result's ``images.ids_sha256`` names the ids.
LIMIT_RULE = "first_n_in_listing_order"


def image_rule(limit: int | None) -> str:
    """The image subset in words, for result files: ``all`` or ``first N in listing order``."""
    return "all" if limit is None else f"first {limit} in listing order"


def fingerprint(preset: ProtocolPreset, *, precision: str, limit: int | None) -> str:
    """sha256 of the preset definition, the precision and the image subset (reference §9.20).

    Without a limit the payload is exactly the one of the first results (their fingerprints stay
    valid); with ``limit=N`` it also holds the subset rule, the first N images of the listing
    order (reference §9.9), so a change of rule can never pass for the same subset.
    """
    payload: dict[str, Any] = {"protocol": preset.definition(), "precision": precision, "limit": limit,
                               "metric": "mmseg-iou/int64"}
    if limit is not None:
        payload["images"] = {"rule": LIMIT_RULE, "n": limit}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
