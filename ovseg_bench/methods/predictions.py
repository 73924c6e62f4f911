"""``predictions``: score label maps a user already has, with the exact protocol metric.

``--predictions DIR`` holds one 8-bit label PNG per image, named after the image id
(``DIR/<image_id>.png``; Cityscapes ids keep their city folder). Values are class indices in the
dataset's label order after reduce_zero_label (what a model predicts), read like GT (no EXIF,
palette indices kept).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.transforms import decode_label
from ..errors import ConfigError, DataError
from ..registry import register_method
from .base import LabelMethod, WeightsOptions


@register_method("predictions")
class PredictionsMethod(LabelMethod):
    name = "predictions"

    def __init__(self, weights: WeightsOptions, device: torch.device, config_path: Path | None = None):
        if weights.predictions is None:
            raise ConfigError("method 'predictions' needs --predictions DIR (one <image_id>.png label map per image)")
        self.root = Path(weights.predictions).expanduser()
        if not self.root.is_dir():
            raise DataError(f"--predictions {self.root}: folder not found")

    def weights(self) -> dict[str, Any]:
        return {"predictions": str(self.root.resolve()), "random": False}

    def settings(self, dataset: str) -> dict[str, Any]:
        return {"predictions": str(self.root.resolve())}

    def labels_for(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        path = self.root / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: prediction missing for image '{image_id}'; write one label PNG per image id")
        try:
            labels = decode_label(path)
        except OSError as exc:
            raise DataError(f"{path}: not a readable PNG ({exc})") from None
        if labels.ndim != 2:
            raise DataError(f"{path}: prediction has shape {labels.shape}; expected a single-channel "
                            "(L or P mode) PNG of class indices")
        if labels.shape != tuple(shape):
            raise DataError(f"{path}: prediction is {labels.shape[1]}x{labels.shape[0]}, "
                            f"the ground truth is {shape[1]}x{shape[0]} (width x height); predict at GT size")
        return labels
