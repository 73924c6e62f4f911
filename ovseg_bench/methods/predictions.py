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

from ..imaging import decode_label
from ..errors import ConfigError, DataError
from ..registry import register_method
from .base import CamMethod, DatasetInfo, LabelMethod, MethodInputs, SavedMaskMethod, WeightsOptions

NO_PREDICTION = 255
OUT_OF_RANGE_RULES = ("error", "ignore")
# Saved CAMs: the background-threshold grid WeakTr's evaluation scans (hustvl/WeakTr@3457ad3
# evaluation.py, thresholds i / 100), and the fixed threshold when --bg-threshold is not given.
CAM_GRID = tuple(i / 100 for i in range(30, 61))
DEFAULT_BG_THRESHOLD = 0.45


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
class PredictionsMethod(LabelMethod, SavedMaskMethod, CamMethod):
    """Saved outputs on every track: label maps (semantic, and pseudo masks on the
    label-conditioned track), binary masks (referring), CAMs (label-conditioned, ``.npy``)."""

    name = "predictions"
    tracks = ("semantic", "referring", "label-conditioned")
    inputs = ("predictions", "predictions_out_of_range", "bg_threshold")

    def __init__(self, weights: WeightsOptions, device: torch.device, config_path: Path | None = None,
                 inputs: MethodInputs | None = None):
        inputs = inputs or MethodInputs()
        if config_path is not None:
            raise ConfigError("method 'predictions' has no config; drop --config")
        if not inputs.predictions:
            raise ConfigError("method 'predictions' needs --predictions DIR (one <image_id>.png label map per image)")
        if inputs.predictions_out_of_range not in OUT_OF_RANGE_RULES:
            raise ConfigError(f"--predictions-out-of-range '{inputs.predictions_out_of_range}' is not one of "
                              f"{OUT_OF_RANGE_RULES}")
        self.out_of_range = inputs.predictions_out_of_range
        self.bg_threshold = inputs.bg_threshold
        self.plain, self.named = parse_prediction_folders(tuple(inputs.predictions))
        self._several = False  # whether the run scores several datasets (check_datasets)
        self._cams: dict[str, bool] = {}  # dataset -> its folder holds .npy CAMs (scanned once)
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
        settings: dict[str, Any] = {"predictions": str(self.folder_for(dataset).resolve()),
                                    "out_of_range": self.out_of_range}
        if self._has_cams(dataset):
            grid, fixed = self.curve(dataset)
            settings.update({"cams": True, "bg_threshold": fixed, "bg_grid": [grid[0], grid[-1], len(grid)]})
        return settings

    def _has_cams(self, dataset: str) -> bool:
        """A folder of ``.npy`` CAMs (label-conditioned track) rather than label PNGs."""
        if dataset not in self._cams:
            try:
                self._cams[dataset] = next(self.folder_for(dataset).rglob("*.npy"), None) is not None
            except DataError:
                return False
        return self._cams[dataset]

    def adapter_for(self, track: str, dataset: str) -> type | None:
        if track == "label-conditioned":  # one method, two kinds of saved output: the folder says which
            return CamMethod if self._has_cams(dataset) else LabelMethod
        return None

    def curve(self, dataset: str) -> tuple[tuple[float, ...], float]:
        fixed = DEFAULT_BG_THRESHOLD if self.bg_threshold is None else float(self.bg_threshold)
        if fixed not in CAM_GRID:
            raise ConfigError(f"--bg-threshold {fixed} is not on the grid 0.30, 0.31, ..., 0.60 "
                              "(steps of 0.01, as WeakTr scans)")
        return CAM_GRID, fixed

    def cams(self, image: np.ndarray, labels: tuple[int, ...], info: DatasetInfo, *, image_id: str,
             image_path: Path | None = None) -> Any:
        from ..datasets.cams import load_cams

        path = self.folder_for(info.name) / f"{image_id}.npy"
        if not path.is_file():
            raise DataError(f"{path}: CAMs missing for image '{image_id}'; write one .npy per image id")
        cams = load_cams(path, info.num_classes)
        if cams.maps.shape[1:] != image.shape[:2]:
            raise DataError(f"{path}: CAMs are {cams.maps.shape[2]}x{cams.maps.shape[1]}, the image is "
                            f"{image.shape[1]}x{image.shape[0]} (width x height); save them at image size")
        return cams

    def mask_for(self, sample_id: str, shape: tuple[int, int], dataset: str) -> np.ndarray:
        path = self.folder_for(dataset) / f"{sample_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: mask missing for sample '{sample_id}'; write one <ref_id>_<sent_id>.png "
                            "per sample")
        mask = self._read_png(path, shape)
        values = np.unique(mask)
        if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
            raise DataError(f"{path}: a referring mask holds 0/1 or 0/255, found values {values[:6].tolist()}")
        return mask > 0

    def labels_for(self, image_id: str, shape: tuple[int, int], info: DatasetInfo) -> np.ndarray:
        path = self.folder_for(info.name) / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: prediction missing for image '{image_id}'; write one label PNG per image id")
        labels = self._read_png(path, shape)
        if self.out_of_range == "error":
            _check_range(labels, info.num_classes, path)
        return labels


    @staticmethod
    def _read_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
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


def _check_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    outside = np.unique(labels[(labels >= num_classes) & (labels != NO_PREDICTION)])
    if outside.size:
        shown = ", ".join(str(v) for v in outside[:5]) + (" ..." if outside.size > 5 else "")
        raise DataError(f"{path}: values {shown} lie outside the {num_classes} classes (0..{num_classes - 1}, "
                        f"{NO_PREDICTION} = no prediction); write labels in the dataset's order, or pass "
                        "--predictions-out-of-range ignore to drop them as mmseg does")
