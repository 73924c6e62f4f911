"""Synthetic trees of the label-conditioned track, written in the exact on-disk formats.

The layouts are spelled out here independently of the cards, so listing them through the cards
checks the cards too:

- VOC2012 (``VOCdevkit/VOC2012``): ``JPEGImages/<id>.jpg``; ``SegmentationClass/<id>.png``
  palette PNGs (tests/synthetic.py's VOC colour map) for the train ids; ``SegmentationClassAug/<id>.png``
  8-bit L PNGs for every train_aug id (the same labels as SegmentationClass for train ids);
  ``Annotations/<id>.xml`` in the devkit's schema (objects with ``difficult``, ``truncated``,
  person ``<part>``s); ``ImageSets/Segmentation/train.txt`` and ``train_aug.txt`` (sorted).
- COCO2014: ``JPEGImages/train2014/COCO_train2014_<12 digits>.jpg`` and
  ``annotations/instances_train2014.json`` (the 80 thing categories; overlapping polygon
  instances, a multi-polygon one with a degenerate part, a crowd region as uncompressed RLE, a
  category the JSON does not list, and an image without annotations).
- CAM files: ``np.save`` of WeakTr's ``{class index: float32 [H, W]}`` and CLIP-ES's
  ``{"keys", "attn_highres"}`` dicts.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tests.synthetic import _save, blocky_labels, smooth_image, voc_palette

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")  # the devkit's object names; VOC label = index + 1
COCO_THINGS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
VOC_SIZES = ((48, 64), (70, 42), (56, 56), (45, 60), (64, 50))


@dataclasses.dataclass
class VocTree:
    root: Path
    train_ids: list[str]
    aug_ids: list[str]                           # sorted, train ids included
    xml_objects: dict[str, list[tuple[str, int]]]  # id -> (name, difficult) in file order


def _voc_xml(image_id: str, size: tuple[int, int], objects: Sequence[tuple[str, int]]) -> str:
    """An Annotations file in the VOC2012 devkit's schema."""
    parts = [f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>\n"
             f"\t<size>\n\t\t<width>{size[1]}</width>\n\t\t<height>{size[0]}</height>\n\t\t<depth>3</depth>\n"
             "\t</size>\n\t<segmented>1</segmented>\n"]
    for k, (name, difficult) in enumerate(objects):
        part = "\t\t<part>\n\t\t\t<name>head</name>\n\t\t</part>\n" if name == "person" else ""
        parts.append(f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
                     f"\t\t<truncated>{k % 2}</truncated>\n\t\t<difficult>{difficult}</difficult>\n"
                     f"\t\t<bndbox>\n\t\t\t<xmin>1</xmin>\n\t\t\t<ymin>1</ymin>\n\t\t\t<xmax>9</xmax>\n"
                     f"\t\t\t<ymax>9</ymax>\n\t\t</bndbox>\n{part}\t</object>\n")
    return "".join(parts) + "</annotation>\n"


def _xml_objects(rng: np.random.Generator, gt: np.ndarray) -> list[tuple[str, int]]:
    """Objects for the XML: one per GT class (twice for the first), in shuffled order, plus a
    difficult object of a class the GT does not show (VOC marks difficult objects void)."""
    present = [int(v) for v in np.unique(gt) if 0 < v < 255]
    absent = [c for c in range(1, 21) if c not in present]
    objects = [(VOC_CLASSES[c - 1], 0) for c in present + present[:1]]
    rng.shuffle(objects)
    return objects + [(VOC_CLASSES[int(rng.choice(absent)) - 1], 1)]


def write_voc_label_tree(data_root: Path, *, num_train: int = 3, num_extra: int = 2, seed: int = 0) -> VocTree:
    """VOC2012 with train and train_aug lists, GT (palette and Aug), XML annotations."""
    rng = np.random.default_rng(seed)
    root = Path(data_root) / "VOCdevkit" / "VOC2012"
    train_ids = [f"2007_{32 + 7 * k:06d}" for k in range(num_train)]
    extra_ids = [f"2008_{2 + 5 * k:06d}" for k in range(num_extra)]
    values = np.array([0, 0, 0, 1, 5, 9, 15, 20, 255])
    objects: dict[str, list[tuple[str, int]]] = {}
    for k, image_id in enumerate(train_ids + extra_ids):
        size = VOC_SIZES[k % len(VOC_SIZES)]
        _save(root / "JPEGImages" / f"{image_id}.jpg", smooth_image(rng, size))
        gt = blocky_labels(rng, size, values)
        if image_id in train_ids:
            _save(root / "SegmentationClass" / f"{image_id}.png", gt, palette=voc_palette())
        _save(root / "SegmentationClassAug" / f"{image_id}.png", gt)
        objects[image_id] = _xml_objects(rng, gt)
        xml = root / "Annotations" / f"{image_id}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(_voc_xml(image_id, size, objects[image_id]), encoding="utf-8")
    aug_ids = sorted(train_ids + extra_ids)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train_ids), encoding="utf-8")
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in aug_ids), encoding="utf-8")
    return VocTree(root, train_ids, aug_ids, objects)


# ----------------------------------------------------------------------------------- COCO


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool [H, W] mask: run lengths in column-major order,
    starting with a (possibly empty) run of zeros, as crowd annotations store them."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _box_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _coco_annotations() -> list[dict]:
    """Annotations of the synthetic images 9, 25 and 30 (image 42 has none), in JSON order."""
    crowd = np.zeros((40, 50), dtype=bool)
    crowd[20:36, 5:30] = True
    return [
        # image 9: person (1) first, then an overlapping car (3): person wins the overlap.
        {"id": 101, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": [_box_polygon(4, 4, 30, 24)]},
        {"id": 102, "image_id": 9, "category_id": 3, "iscrowd": 0, "segmentation": [_box_polygon(20, 10, 45, 35)]},
        # a crowd of dogs (18) as uncompressed RLE, under the car where they overlap
        {"id": 103, "image_id": 9, "category_id": 18, "iscrowd": 1, "segmentation": uncompressed_rle(crowd)},
        # image 25: two polygons of one toothbrush (90), the second degenerate (4 numbers)
        {"id": 201, "image_id": 25, "category_id": 90, "iscrowd": 0,
         "segmentation": [_box_polygon(2, 2, 12, 10), [30, 5, 40, 20, 25, 28], [1, 1, 5, 5]]},
        # a category the JSON does not list (12, unused by COCO 2014): 255 in the GT
        {"id": 202, "image_id": 25, "category_id": 12, "iscrowd": 0, "segmentation": [_box_polygon(8, 8, 20, 20)]},
        # image 30: a triangle of class 44 (bottle) drawn over by nothing
        {"id": 301, "image_id": 30, "category_id": 44, "iscrowd": 0, "segmentation": [[3, 3, 33, 6, 10, 30]]},
    ]


COCO_IMAGES = ((9, 40, 50), (25, 32, 44), (30, 36, 36), (42, 30, 40))  # (id, height, width)


def write_coco2014_tree(data_root: Path, *, split: str = "train", seed: int = 0) -> Path:
    """COCO2014 images and ``annotations/instances_<split>2014.json``; returns the JSON's path."""
    rng = np.random.default_rng(seed)
    root = Path(data_root) / "COCO2014"
    images = []
    for image_id, height, width in COCO_IMAGES:
        name = f"COCO_{split}2014_{image_id:012d}.jpg"
        _save(root / "JPEGImages" / f"{split}2014" / name, smooth_image(rng, (height, width)))
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    images.reverse()  # the JSON's image order is not the file-name order
    categories = [{"id": i, "name": f"thing{i}", "supercategory": "thing"} for i in COCO_THINGS]
    data = {"images": images, "annotations": _coco_annotations(), "categories": categories}
    path = root / "annotations" / f"instances_{split}2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- CAMs


def write_weaktr_cams(path: Path, cams: Mapping[int, np.ndarray]) -> Path:
    """WeakTr's file: ``np.save`` of {0-based class index: float32 [H, W]} (dict order kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, dict(cams))
    return path


def write_clip_es_cams(path: Path, keys: Sequence[int], maps: np.ndarray) -> Path:
    """CLIP-ES's file: ``np.save`` of {"keys": int64 [K], "attn_highres": float16 [K, H, W]}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, {"keys": np.asarray(keys, dtype=np.int64), "attn_highres": np.asarray(maps).astype(np.float16)})
    return path
