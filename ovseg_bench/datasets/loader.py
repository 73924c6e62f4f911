"""The torch Dataset the runner iterates: decode, check, resize, in DataLoader workers.

Problems are returned as data (``Sample.error``) rather than raised inside a worker, so the
runner reports them with the file's name and can honour ``--on-error skip`` for bad images.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from ..imaging import (decode_image, decode_label, label_geometry, model_input, reduce_zero_label,
                                 resized_shape)
from .cards import DatasetCard

if TYPE_CHECKING:  # settings are read by field; datasets never import the engine
    from ..engine.protocol import DatasetSettings
from .listing import SampleRef


@dataclasses.dataclass
class Sample:
    index: int
    image_id: str
    image: torch.Tensor | None        # [3,h,w] uint8 RGB, resized by the protocol
    gt: torch.Tensor | None           # [H,W] uint8 classes: the card's gt_map or reduce_zero_label applied
    error: str | None = None
    skippable: bool = False           # an unreadable image: --on-error skip may drop it


class SplitDataset(Dataset):
    """One split of a dataset card, resized for one protocol's settings."""

    def __init__(self, card: DatasetCard, samples: list[SampleRef], settings: DatasetSettings):
        self.card, self.samples, self.settings = card, samples, settings
        self.gt_lut = card.gt_lut()  # read once here (ConfigError before any worker starts), pickled to workers

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        bgr = self.decode(index)
        return self.sample(index, bgr, None if bgr is None else self.model_input(bgr))

    def decode(self, index: int) -> np.ndarray | None:
        """The listed image as HxWx3 uint8 BGR, or None when it is missing or not decodable."""
        path = self.samples[index].image_path
        return decode_image(path) if path.is_file() else None

    def model_input(self, bgr: np.ndarray) -> torch.Tensor:
        """[3,h,w] uint8 RGB of a decoded image, resized by the protocol."""
        settings = self.settings
        return model_input(bgr, settings.short_side, settings.long_side, rule=settings.resize,
                           center_crop=settings.center_crop, interpolation=settings.interpolation)

    def sample(self, index: int, bgr: np.ndarray | None, rgb: torch.Tensor | None) -> Sample:
        """The sample of listing position ``index``: its decoded image (None: unreadable), model input and GT."""
        ref = self.samples[index]
        if bgr is None:
            state = "is not a decodable image" if ref.image_path.is_file() else "is missing"
            return Sample(index, ref.image_id, None, None, f"{ref.image_path}: image {state}", skippable=True)
        gt, problem = self._read_gt(ref.gt_path, bgr.shape[:2])
        if problem:
            return Sample(index, ref.image_id, None, None, problem)
        settings = self.settings
        if settings.center_crop is not None:  # the GT takes the input's geometry; scores are made at its size
            size = resized_shape(bgr.shape[:2], settings.short_side, settings.long_side, rule=settings.resize)
            gt = label_geometry(gt, size, settings.center_crop)
        return Sample(index, ref.image_id, rgb, torch.from_numpy(gt))

    def _read_gt(self, path: Path, image_shape: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
        if not path.is_file():
            return None, f"{path}: ground truth missing for image of the same name; check the data layout (see `ovseg-bench data check`)"
        try:
            raw = decode_label(path)
        except OSError as exc:
            return None, f"{path}: ground truth is not a readable PNG ({exc})"
        if raw.ndim != 2:
            return None, f"{path}: ground truth has shape {raw.shape}; expected a single-channel label map"
        if raw.shape != tuple(image_shape):
            return None, (f"{path}: ground truth is {raw.shape[1]}x{raw.shape[0]} but its image is "
                          f"{image_shape[1]}x{image_shape[0]} (width x height, after EXIF orientation)")
        bad = np.unique(raw[(raw > self.card.raw_label_max) & (raw != self.card.ignore_index)])
        if bad.size:
            return None, (f"{path}: label values {bad[:10].tolist()} are outside 0..{self.card.raw_label_max} "
                          f"(and {self.card.ignore_index} = ignore) for dataset '{self.card.name}'; "
                          "was the dataset converted (e.g. train ids for COCO-Stuff / Cityscapes)?")
        if self.gt_lut is not None:  # raw values -> scored classes (COCO-Stuff-27, Cityscapes-27)
            if raw.dtype.kind == "i" and raw.size and raw.min() < 0:  # a signed map would index from the end
                return None, f"{path}: ground truth holds negative values; expected an 8-bit label map"
            return self.gt_lut[raw], None
        return (reduce_zero_label(raw) if self.card.reduce_zero_label else raw), None


@dataclasses.dataclass
class ImageSamples:
    """One image of a shared stream: a sample per dataset (the same model input, each its own GT)."""

    index: int
    image_id: str
    samples: list[Sample]


class SharedImagesDataset(Dataset):
    """Several splits that list the same image files, read alike (``streams.image_key``): each
    image is decoded and resized once, each dataset's GT read on its own."""

    def __init__(self, splits: list[SplitDataset]):
        self.splits = splits

    def __len__(self) -> int:
        return len(self.splits[0])

    def __getitem__(self, index: int) -> ImageSamples:
        first = self.splits[0]
        bgr = first.decode(index)
        rgb = None if bgr is None else first.model_input(bgr)
        return ImageSamples(index, first.samples[index].image_id, [split.sample(index, bgr, rgb) for split in self.splits])
