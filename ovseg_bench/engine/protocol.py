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
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..imaging import INTERPOLATIONS
from ..registry import unknown_name_message
from ..resources import configs_dir
from ..yamlconf import from_mapping, read_yaml

MODES = ("slide", "whole")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
    """Effective data-side settings of one dataset under a preset.

    ``resize``: ``mmcv`` (keep-ratio to short side S with the long side capped at L, mmcv's
    rounding) or ``short_side`` (short side to S, long side ``int(S * long / short)`` truncated,
    as torchvision's ``Resize(S)``; L unused). ``center_crop``: after the resize, the centred
    square of that side (offsets rounded half to even, as ``round``); the GT then gets the same
    geometry, resized with nearest neighbour, and scores are computed at the cropped size.
    """

    short_side: int
    long_side: int
    mode: str
    crop: int
    stride: int
    classnames: str
    resize: str = "mmcv"
    center_crop: int | None = None
    labels_from: str | None = None  # label-conditioned track: image labels from "gt" or "xml"; None = card default
    interpolation: str = "cv2_bilinear"  # the image resize (imaging.INTERPOLATIONS)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"inference mode '{self.mode}' is not one of {MODES}")
        if self.resize not in RESIZE_RULES:
            raise ConfigError(f"resize rule '{self.resize}' is not one of {RESIZE_RULES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation '{self.interpolation}' is not one of {INTERPOLATIONS}")
        if min(self.short_side, self.long_side, self.crop, self.stride) <= 0:
            raise ConfigError(f"sizes must be positive, found {self}")
        if self.center_crop is not None and not 0 < self.center_crop <= self.short_side:
            raise ConfigError(f"center_crop must lie in 1..short_side ({self.short_side}), found {self.center_crop}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings as hashed: fields added after the first results are left out while they
        hold their defaults, so adding a field never moves an existing fingerprint."""
        fields = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        return fields


RESIZE_RULES = ("mmcv", "short_side")
LATER_FIELDS = {"resize": "mmcv", "center_crop": None, "labels_from": None, "interpolation": "cv2_bilinear"}  # fields added after schema v2's first results


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


NATIVE = "native"  # `--protocol native`: each method's own preset


def resolve_protocol(requested: str, method_cls: Any, config: Path | None = None) -> str:
    """``native`` -> the method's own preset (``method_cls.native_protocol(config)``, from its
    config file); any other name as given."""
    if requested != NATIVE:
        return requested
    resolved = method_cls.native_protocol(config)
    if resolved is None:
        raise ConfigError(f"--protocol native: method '{method_cls.name}' has no native preset shipped yet; "
                          "pass a preset by name (`ovseg-bench list protocols`)")
    return resolved


def protocol_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "protocols").glob("*.yaml"))


# Which images a ``--limit N`` run evaluates. It is part of the fingerprint, so results of
# different subsets never compare as equal; the result's ``images.ids_sha256`` names the ids.
LIMIT_RULE = "first_n_in_listing_order"


def image_rule(limit: int | None) -> str:
    """The image subset in words, for result files: ``all`` or ``first N in listing order``."""
    return "all" if limit is None else f"first {limit} in listing order"


def fingerprint(settings: DatasetSettings, *, metric: str, precision: str, limit: int | None) -> str:
    """sha256 of one dataset's effective settings, the track's metric id, the precision and the
    image subset (result schema v2).

    Only the dataset at hand counts, so a per-dataset override added for one card never moves the
    fingerprints of the others, and two presets with equal settings for a dataset (``native``
    and the preset it resolves to) compare equal. The precision is hashed because the references
    differ in it: kakaobrain/tcl@bc2b551 evaluates in fp32 with no autocast, mc-lan/ClearCLIP@ad68a40
    and mc-lan/ProxyCLIP@e7b767f build CLIP with ``precision='fp16'``. With ``limit=N`` the payload
    also holds the subset rule, the first N images of the listing order (MMSegmentation's, see
    :mod:`ovseg_bench.datasets.listing`), so a change of rule can never pass for the same subset.
    """
    payload: dict[str, Any] = {"settings": settings.fingerprint_fields(), "metric": metric, "precision": precision,
                               "images": {"rule": LIMIT_RULE, "n": limit} if limit is not None else "all"}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
