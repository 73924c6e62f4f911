"""Decoding, mmcv-compatible rescaling and per-method normalisation: a leaf module (numpy, cv2,
Pillow, torch), so datasets and methods use it without importing the engine.

Exactness rules, those of mmcv 2.1.0's loaders and resize (open-mmlab/mmcv@v2.1.0:
mmcv/image/io.py and mmcv/image/geometric.py) as mmseg 1.2.2 calls them: images are decoded by
cv2 (BGR uint8, EXIF orientation applied), label maps by Pillow without conversion (palette
indices for VOC), and resized with mmcv's ``rescale_size`` rounding and cv2's uint8 bilinear,
never antialiased.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image


def decode_image(path: Path) -> np.ndarray | None:
    """HxWx3 uint8 BGR exactly as ``cv2.imdecode(..., IMREAD_COLOR)``; None if undecodable.

    IMREAD_COLOR applies the EXIF Orientation tag (unless IMREAD_IGNORE_ORIENTATION is given), as
    mmcv's loader does: ``mmcv.imfrombytes`` with the cv2 backend and flag ``color``.
    """
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def decode_pil_rgb(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB as Pillow's ``Image.open(path).convert("RGB")`` gives it: EXIF orientation not
    applied, Pillow's own JPEG decoding (WeakTr's and CLIP-ES's loaders)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def decode_label(path: Path) -> np.ndarray:
    """HxW uint8 label map as ``np.array(PIL.Image.open(path))``: palette indices, no EXIF.

    This is what mmseg's ``LoadAnnotations`` reads (``mmcv.imfrombytes``, Pillow backend, flag
    ``unchanged``, then squeeze and uint8).
    """
    with Image.open(path) as img:
        label = np.array(img)
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[..., 0]
    return label


def rescale_size(width: int, height: int, short_side: int, long_side: int) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: (new_w, new_h).

    The factor is one float64 division per side taken first, as in mmcv's ``rescale_size``
    (mmcv/image/geometric.py); multiplying first or
    rounding half-to-even gives different sizes for some images (645x480 at 336 -> 451, not 452).
    """
    max_long, max_short = max(long_side, short_side), min(long_side, short_side)
    factor = min(max_long / max(height, width), max_short / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_image(image: np.ndarray, short_side: int, long_side: int) -> np.ndarray:
    """Keep-ratio resize of a uint8 HxWx3 image with cv2 bilinear (fixed-point, no antialiasing)."""
    height, width = image.shape[:2]
    new_w, new_h = rescale_size(width, height, short_side, long_side)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """torchvision ``Resize(S)`` sizes: (new_w, new_h), the short side S, the long side
    ``int(S * long / short)`` truncated (torchvision/transforms/functional.py,
    ``_compute_resized_output_size``)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def resized_shape(shape: tuple[int, int], short_side: int, long_side: int, *, rule: str = "mmcv") -> tuple[int, int]:
    """(h, w) after the protocol's resize of an image of ``shape`` (h, w), before any crop."""
    height, width = shape
    if rule == "mmcv":
        new_w, new_h = rescale_size(width, height, short_side, long_side)
    else:
        new_w, new_h = short_side_size(width, height, short_side)
    return new_h, new_w


def center_crop_box(height: int, width: int, side: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``center_crop`` to side x side: ``int(round((H - side) / 2))``,
    Python's round, half to even (532 -> 425 wide: left 52, not 53)."""
    return int(round((height - side) / 2.0)), int(round((width - side) / 2.0))


# How the image is resized (DatasetSettings.interpolation): cv2's uint8 bilinear without
# antialiasing (mmcv), or Pillow's resample filters as torchvision applies them to PIL images
# (ReCo: NEAREST for COCO-Stuff and Cityscapes, BILINEAR for Pascal Context).
INTERPOLATIONS = ("cv2_bilinear", "pil_bilinear", "pil_nearest")
_PIL_FILTERS = {"pil_bilinear": Image.BILINEAR, "pil_nearest": Image.NEAREST}


def model_input(bgr: np.ndarray, short_side: int, long_side: int, *, rule: str = "mmcv",
                center_crop: int | None = None, interpolation: str = "cv2_bilinear") -> torch.Tensor:
    """Decoded HxWx3 uint8 BGR -> the resized (and centre-cropped) [3,h,w] uint8 RGB tensor a
    method is fed, normalised later on the device.

    ``rule``: ``mmcv`` (keep ratio, long side capped, :func:`rescale_size`) or ``short_side``
    (:func:`short_side_size`); ``interpolation``: one of :data:`INTERPOLATIONS`.
    """
    new_h, new_w = resized_shape(bgr.shape[:2], short_side, long_side, rule=rule)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    if interpolation == "cv2_bilinear":
        resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    else:
        resized = np.array(Image.fromarray(rgb).resize((new_w, new_h), _PIL_FILTERS[interpolation]))
    if center_crop is not None:
        top, left = center_crop_box(resized.shape[0], resized.shape[1], center_crop)
        resized = resized[top:top + center_crop, left:left + center_crop]
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def label_geometry(label: np.ndarray, size: tuple[int, int], center_crop: int) -> np.ndarray:
    """A label map given the model input's geometry: nearest-neighbour resize to ``size`` (h, w)
    with PIL (whose NEAREST picks other source pixels than ``floor((j + 0.5) * W / W')`` at a few
    positions; NoelShin/reco@5c5e1bc utils/utils.py resizes labels with it), then the centre crop."""
    height, width = size
    resized = np.array(Image.fromarray(label).resize((width, height), Image.NEAREST))
    top, left = center_crop_box(height, width, center_crop)
    return np.ascontiguousarray(resized[top:top + center_crop, left:left + center_crop])


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> 255 (ignored), every other value v -> v - 1."""
    reduced = label.astype(np.int64) - 1
    reduced[label == 0] = 255
    reduced[label == 255] = 255
    return reduced.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Per-channel statistics on the 0-255 scale, RGB order.

    Both reference pipelines give exactly the float32 quotient ``(x - mean) / std``: mmseg 1.x
    divides in float32, and mmcv's ``imnormalize`` (mmseg 0.x: TCL, MaskCLIP) multiplies by a
    float64 reciprocal in float64 and rounds once, which is the correctly rounded quotient
    (tests/engine/test_transforms.py checks both).
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    unit: bool = False  # torchvision's order: x / 255 in float32 first, then the unit-scale statistics

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] uint8 RGB -> float32 normalised, on the images' device."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        x = images.float() / 255 if self.unit else images.float()
        return (x - mean) / std


IMAGENET = Normalisation("imagenet", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
CLIP = Normalisation("clip", (122.771, 116.746, 104.094), (68.501, 66.632, 70.323))
# ReCo's: torchvision's ToTensor (x / 255) then Normalize with the unit-scale ImageNet statistics
# (NoelShin/reco@5c5e1bc datasets/*.py), which rounds differently from the 0-255 form above.
IMAGENET_UNIT = Normalisation("imagenet_unit", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), unit=True)
NORMALISATIONS = {n.name: n for n in (IMAGENET, CLIP, IMAGENET_UNIT)}
