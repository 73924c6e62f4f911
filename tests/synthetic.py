"""Tiny synthetic datasets written in exactly the on-disk formats of the eight benchmarks.

The layouts are spelled out here independently of the dataset cards, so tests that list these
trees through the cards check the cards too (MMSegmentation's data layout and converters, TCL's
COCO-Object converter):

- VOC2012: JPEGImages/<id>.jpg, SegmentationClass/<id>.png as palette ('P') PNGs with the VOC
  colour map, indices {0..20, 255}; ImageSets/Segmentation/val.txt. voc and voc20 share it.
- VOC2010 + Context: JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png (L, 0..59);
  ImageSets/SegmentationContext/val.txt. context and context59 share it.
- coco_stuff164k: images/val2017/<12 digits>.jpg and, in annotations/val2017, the raw
  stuffthingmap <id>.png (COCO category id - 1, 255 unlabelled) with the two converted GTs
  derived from it as the converters do: <id>_labelTrainIds.png (0..170, 255) and
  <id>_instanceTrainIds.png (0..80). coco_stuff and coco_object share it.
- cityscapes: leftImg8bit/val/<city>/<stem>_leftImg8bit.png (RGB PNG) and
  gtFine/val/<city>/<stem>_gtFine_labelTrainIds.png (0..18, 255), two cities.
- ade/ADEChallengeData2016: images/validation/ADE_val_<8 digits>.jpg and
  annotations/validation/ADE_val_<8 digits>.png (L, 0..150).

Everything is deterministic from ``seed``; GT has the image's size and blocky regions.
"""
from __future__ import annotations

import zlib
from functools import lru_cache
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# (height, width); a landscape, a portrait and a square one come first.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((48, 64), (70, 42), (56, 56), (45, 60), (64, 50))

# Raw COCO-Stuff values never used (mmseg's coco_stuff164k converter skips them); the other 171 of
# 0..181 map in order to 0..170.
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_USED = np.array([v for v in range(182) if v not in COCO_UNUSED], dtype=np.uint8)
NUM_COCO_THINGS = 80

CITIES = ("frankfurt", "lindau")


@lru_cache(maxsize=1)
def voc_palette() -> tuple[int, ...]:
    """The standard 256-entry PASCAL VOC colour map as a flat [r, g, b, ...] list.

    Colour of index i: bits 0, 1, 2 of each successive 3-bit group of i go to the red, green
    and blue channels, from the most significant channel bit down (index 1 is (128, 0, 0)).
    """
    palette = []
    for index in range(256):
        rgb, value = [0, 0, 0], index
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        palette.extend(rgb)
    return tuple(palette)


def smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 image of ``size`` (h, w): bilinear upsampling of a coarse random grid."""
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return cv2.resize(coarse, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def blocky_labels(rng: np.random.Generator, size: tuple[int, int], values: np.ndarray) -> np.ndarray:
    """A uint8 label map of ``size`` (h, w) made of a few rectangles with values drawn from ``values``."""
    grid_h, grid_w = rng.integers(2, 6, size=2)
    grid = rng.choice(values, size=(grid_h, grid_w)).astype(np.uint8)
    rows = np.arange(size[0]) * grid_h // size[0]
    cols = np.arange(size[1]) * grid_w // size[1]
    return grid[rows[:, None], cols[None, :]]


def _save(path: Path, array: np.ndarray, *, palette: Sequence[int] | None = None) -> None:
    """Save uint8 (h, w) as an L PNG (P with ``palette``) or (h, w, 3) as RGB; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)  # uint8 (h, w) -> L, (h, w, 3) -> RGB
    if palette is not None:
        image.putpalette(palette)  # turns the L image into a P image with the same indices
    options = {"quality": 90} if path.suffix == ".jpg" else {}
    image.save(path, **options)


def _write_split(path: Path, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def _write_voc(data_root: Path, rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list[str]:
    root = data_root / "VOCdevkit" / "VOC2012"
    ids = [f"2007_{33 + 7 * k:06d}" for k in range(len(sizes))]
    values = np.array([*range(21), 255])
    for image_id, size in zip(ids, sizes):
        _save(root / "JPEGImages" / f"{image_id}.jpg", smooth_image(rng, size))
        gt = blocky_labels(rng, size, values)
        _save(root / "SegmentationClass" / f"{image_id}.png", gt, palette=voc_palette())
    _write_split(root / "ImageSets" / "Segmentation" / "val.txt", ids)
    return ids


def _write_context(data_root: Path, rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list[str]:
    root = data_root / "VOCdevkit" / "VOC2010"
    ids = [f"2008_{2 + 5 * k:06d}" for k in range(len(sizes))]
    for image_id, size in zip(ids, sizes):
        _save(root / "JPEGImages" / f"{image_id}.jpg", smooth_image(rng, size))
        gt = blocky_labels(rng, size, np.arange(60))
        _save(root / "SegmentationClassContext" / f"{image_id}.png", gt)
    _write_split(root / "ImageSets" / "SegmentationContext" / "val.txt", ids)
    return ids


def coco_train_ids(raw: np.ndarray) -> np.ndarray:
    """COCO-Stuff raw values -> train ids 0..170 (rank among the used values); 255 stays (as mmseg's)."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[COCO_USED] = np.arange(len(COCO_USED), dtype=np.uint8)
    return lut[raw]


def coco_object_ids(raw: np.ndarray) -> np.ndarray:
    """COCO-Stuff raw values -> COCO-Object 0..80: things 1..80, stuff and unlabelled 0 (as TCL's)."""
    train = coco_train_ids(raw)
    return np.where(train < NUM_COCO_THINGS, train + 1, 0).astype(np.uint8)


def _write_coco(data_root: Path, rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list[str]:
    root = data_root / "coco_stuff164k"
    ids = [f"{139 + 146 * k:012d}" for k in range(len(sizes))]
    values = np.array([*COCO_USED, 255])
    ann = root / "annotations" / "val2017"
    for image_id, size in zip(ids, sizes):
        _save(root / "images" / "val2017" / f"{image_id}.jpg", smooth_image(rng, size))
        raw = blocky_labels(rng, size, values)
        _save(ann / f"{image_id}.png", raw)
        _save(ann / f"{image_id}_labelTrainIds.png", coco_train_ids(raw))
        _save(ann / f"{image_id}_instanceTrainIds.png", coco_object_ids(raw))
    return sorted(ids)


def _write_cityscapes(data_root: Path, rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list[str]:
    root = data_root / "cityscapes"
    values = np.array([*range(19), 255])
    ids = []
    for k, size in enumerate(sizes):
        city = CITIES[k % len(CITIES)]
        stem = f"{city}_000000_{19 + 2 * k:06d}"
        _save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", smooth_image(rng, size))
        gt = blocky_labels(rng, size, values)
        _save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", gt)
        ids.append(f"{city}/{stem}")
    return sorted(ids)


def _write_ade(data_root: Path, rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list[str]:
    root = data_root / "ade" / "ADEChallengeData2016"
    ids = [f"ADE_val_{k + 1:08d}" for k in range(len(sizes))]
    for image_id, size in zip(ids, sizes):
        _save(root / "images" / "validation" / f"{image_id}.jpg", smooth_image(rng, size))
        gt = blocky_labels(rng, size, np.arange(151))
        _save(root / "annotations" / "validation" / f"{image_id}.png", gt)
    return ids


Writer = Callable[[Path, np.random.Generator, list[tuple[int, int]]], list[str]]

# Datasets that share one tree share one writer (and so the same files for the same seed).
_TREES: dict[str, tuple[str, Writer]] = {
    "voc": ("voc", _write_voc), "voc20": ("voc", _write_voc),
    "context": ("context", _write_context), "context59": ("context", _write_context),
    "coco_stuff": ("coco", _write_coco), "coco_object": ("coco", _write_coco),
    "cityscapes": ("cityscapes", _write_cityscapes), "ade20k": ("ade20k", _write_ade),
}


def write_dataset(name: str, data_root: Path, *, num_images: int = 3, seed: int = 0,
                  sizes: Sequence[tuple[int, int]] | None = None) -> list[str]:
    """Write dataset ``name``'s tree under ``data_root``; return its image ids in listing order.

    ``sizes`` are (height, width) per image, cycled if shorter than ``num_images``. Writing
    one dataset of a pair (voc/voc20, context/context59, coco_stuff/coco_object) writes the
    shared tree, GTs of both included.
    """
    if name not in _TREES:
        raise ValueError(f"no synthetic writer for '{name}'; known: {sorted(_TREES)}")
    tree, writer = _TREES[name]
    chosen = list(sizes or DEFAULT_SIZES)
    per_image = [chosen[k % len(chosen)] for k in range(num_images)]
    # Salt by tree so different datasets get different content for the same seed.
    rng = np.random.default_rng([seed, zlib.crc32(tree.encode())])
    return writer(Path(data_root), rng, per_image)


def write_all(data_root: Path, **kw) -> dict[str, list[str]]:
    """Write all eight benchmarks' trees (each shared tree once); ids per dataset name."""
    written: dict[str, list[str]] = {}
    ids_by_tree: dict[str, list[str]] = {}
    for name, (tree, _) in _TREES.items():
        if tree not in ids_by_tree:
            ids_by_tree[tree] = write_dataset(name, data_root, **kw)
        written[name] = ids_by_tree[tree]
    return written
