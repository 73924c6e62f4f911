"""``predictions``: score label maps a user already has, with the exact protocol metric.

``--predictions DIR`` holds one 8-bit label PNG per image, named after the image id
(``DIR/<image_id>.png``; Cityscapes ids keep their city folder). Values are class indices in the
dataset's label order after reduce_zero_label (what a model predicts), read like GT (no EXIF,
palette indices kept); 255 means "no prediction" and is dropped, as mmseg drops it.

Several datasets in one run take one folder each: ``DIR/<dataset>/`` when it exists (what
``run --save-predictions`` writes under ``predictions/<method>/``), or ``--predictions NAME=DIR``
per dataset. A single dataset may also use ``DIR`` itself.

Values outside the class range other than 255 are an error, as they are in ground truth
(a prediction of another label order scored silently is a wrong number);
``--predictions-out-of-range ignore`` drops them per histogram as mmseg's IoUMetric does, and the
result records the choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.transforms import decode_label
from ..errors import ConfigError, DataError
from ..registry import register_method
from .base import DatasetInfo, LabelMethod, WeightsOptions

NO_PREDICTION = 255
OUT_OF_RANGE_RULES = ("error", "ignore")


def parse_prediction_folders(values: tuple[str | Path, ...]) -> tuple[Path | None, dict[str, Path]]:
    """``--predictions`` values -> (the plain DIR or None, {dataset: DIR} from ``NAME=DIR`` forms)."""
    plain: list[Path] = []
    named: dict[str, Path] = {}
    for value in values:
        text = str(value)
        name, sep, folder = text.partition("=")
        if sep and name and "/" not in name:
            if name in named:
                raise ConfigError(f"--predictions {name}=... is given twice; give one folder per dataset")
            named[name.strip()] = Path(folder).expanduser()
        else:
            plain.append(Path(text).expanduser())
    if len(plain) > 1:
        raise ConfigError(f"--predictions takes one plain DIR (found {len(plain)}); "
                          "name the others per dataset as --predictions NAME=DIR")
    return (plain[0] if plain else None), named


@register_method("predictions")
class PredictionsMethod(LabelMethod):
    name = "predictions"

    def __init__(self, weights: WeightsOptions, device: torch.device, config_path: Path | None = None):
        if config_path is not None:
            raise ConfigError("method 'predictions' has no config; drop --config")
        if not weights.predictions:
            raise ConfigError("method 'predictions' needs --predictions DIR (one <image_id>.png label map per image)")
        if weights.predictions_out_of_range not in OUT_OF_RANGE_RULES:
            raise ConfigError(f"--predictions-out-of-range '{weights.predictions_out_of_range}' is not one of "
                              f"{OUT_OF_RANGE_RULES}")
        self.out_of_range = weights.predictions_out_of_range
        self.plain, self.named = parse_prediction_folders(tuple(weights.predictions))
        self._several = False  # whether the run scores several datasets (check_datasets)
        for folder in [*([self.plain] if self.plain else []), *self.named.values()]:
            if not folder.is_dir():
                raise DataError(f"--predictions {folder}: folder not found")

    def check_datasets(self, datasets: tuple[str, ...]) -> None:
        """Every dataset of the run has its folder, before any image is read."""
        unknown = sorted(set(self.named) - set(datasets))
        if unknown:
            raise ConfigError(f"--predictions names dataset(s) {unknown} that this run does not evaluate "
                              f"({', '.join(datasets)})")
        self._several = len(datasets) > 1
        for dataset in datasets:
            self.folder_for(dataset)

    def folder_for(self, dataset: str) -> Path:
        """``NAME=DIR``, else ``DIR/<dataset>/``, else (a run of one dataset only) ``DIR``."""
        if dataset in self.named:
            return self.named[dataset]
        if self.plain is not None and (self.plain / dataset).is_dir():
            return self.plain / dataset
        if self.plain is not None and not self._several:
            return self.plain
        where = f"{self.plain / dataset}/ or " if self.plain is not None else ""
        raise DataError(f"--predictions: no folder for dataset '{dataset}'; a run of several datasets takes one "
                        f"folder per dataset: {where}--predictions {dataset}=DIR")

    def _roots(self) -> dict[str, str]:
        roots = {name: str(folder.resolve()) for name, folder in sorted(self.named.items())}
        if self.plain is not None:
            roots[""] = str(self.plain.resolve())
        return roots

    def weights(self) -> dict[str, Any]:
        roots = self._roots()
        return {"predictions": roots[""] if list(roots) == [""] else roots, "random": False}

    def settings(self, dataset: str) -> dict[str, Any]:
        return {"predictions": str(self.folder_for(dataset).resolve()), "out_of_range": self.out_of_range}

    def labels_for(self, image_id: str, shape: tuple[int, int], info: DatasetInfo) -> np.ndarray:
        path = self.folder_for(info.name) / f"{image_id}.png"
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
        if self.out_of_range == "error":
            _check_range(labels, info.num_classes, path)
        return labels


def _check_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    outside = np.unique(labels[(labels >= num_classes) & (labels != NO_PREDICTION)])
    if outside.size:
        shown = ", ".join(str(v) for v in outside[:5]) + (" ..." if outside.size > 5 else "")
        raise DataError(f"{path}: values {shown} lie outside the {num_classes} classes (0..{num_classes - 1}, "
                        f"{NO_PREDICTION} = no prediction); write labels in the dataset's order, or pass "
                        "--predictions-out-of-range ignore to drop them as mmseg does")
