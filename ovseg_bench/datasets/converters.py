"""Pure conversions from the published raw annotations to the label maps the cards read.

Every function here maps arrays or parsed JSON to a ``uint8`` (H, W) label map and touches no
file, so each is tested on hand-made inputs and run in worker processes by
:mod:`ovseg_bench.datasets.prepare`. The rules follow the published converters named below:

- Pascal Context (open-mmlab/mmsegmentation@v1.2.2:tools/dataset_converters/pascal_context.py
  with the Detail API of zhanghang1989/detail-api): the PASCAL in Detail ``trainval_merged.json``
  holds, per image, a list of annotations (``annos_segmentation``) whose ``segmentation`` is
  COCO-style RLE. The Detail API's ``getMask`` starts from zeros and paints each annotation's
  Detail category id in list order (later annotations overwrite earlier ones, crowd included);
  MMSegmentation's converter then maps the 60 listed ids (0 and the 59 classes) to their rank.
  The RLE is decoded here in NumPy, so neither the Detail API nor its C extension is needed.
- COCO-Stuff 164k (``clsID_to_trID`` in MMSegmentation's
  tools/dataset_converters/coco_stuff164k.py): raw value = COCO category id - 1; the 171 used
  values map in ascending order to train ids 0..170; 255 (unlabelled) stays 255.
- COCO-Object (kakaobrain/tcl@bc2b551:convert_dataset/convert_coco_object.py, copied by the SCLIP
  family as datasets/cvt_coco_object.py): from the same raw maps, raw thing values 0..89 become
  1..80 (the rank among the 80 used thing values, plus one); every other value, stuff and
  unlabelled 255 alike, becomes 0 = background.
- Cityscapes (MMSegmentation's tools/dataset_converters/cityscapes.py): train ids rendered from
  ``*_gtFine_polygons.json`` exactly as cityscapesscripts' ``json2labelImg(..., 'trainIds')``
  draws them (Pillow ``ImageDraw.polygon`` in file order on a 255 background), or remapped from
  ``*_gtFine_labelIds.png`` (which differs along object edges, mcordts/cityscapesScripts#29).
  Label ids (Cityscapes-27) are drawn the same way with encoding 'ids' (background 0).

Values the published files never hold (the 11 unused COCO values, ids outside the Cityscapes
table) are mapped to the ignore or background value rather than left as they are; the callers
count them so that ``prepare`` can report them (the references would have written them
through unchanged, which cannot happen on the published files).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError

# --------------------------------------------------------------------------- Pascal Context

# The Detail category ids of background (0) and the 59 Context classes, sorted: label value =
# index in this tuple (the sorted ``_mapping`` of MMSegmentation's pascal_context converter).
CONTEXT_CATEGORY_IDS: tuple[int, ...] = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105,
    113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308,
    324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)


def rle_counts_from_string(text: str | bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the ``counts`` of ``maskApi.c``'s rleToString).

    Each count is a little-endian base-32 number written as characters 48 + (5 data bits | 0x20
    continuation bit); the sign bit of the last group (0x10) sign-extends. From the fourth count
    on, the stored number is the difference to the count two places before.
    """
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    counts: list[int] = []
    pos = 0
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(data):
                raise DataError(f"RLE string ends inside a number (after {len(counts)} counts)")
            chunk = data[pos] - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            pos += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_string_from_counts(counts: Sequence[int]) -> str:
    """Inverse of :func:`rle_counts_from_string` (COCO ``rleToString``)."""
    out = bytearray()
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = value != -1 if chunk & 0x10 else value != 0
            if more:
                chunk |= 0x20
            out.append(chunk + 48)
    return out.decode("ascii")


def decode_rle(segmentation: Mapping[str, Any]) -> np.ndarray:
    """A COCO-style RLE ``{"size": [h, w], "counts": str | list[int]}`` -> uint8 (h, w) mask of 0/1.

    Runs alternate 0s and 1s starting with 0s and run down the columns (column-major order), as
    ``pycocotools.mask.decode`` reads them. ``counts`` may be the compressed string or the plain
    list of run lengths. Raises DataError if the runs do not add up to h * w.
    """
    try:
        height, width = (int(v) for v in segmentation["size"])
        raw_counts = segmentation["counts"]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"segmentation {str(segmentation)[:80]!r} is not an RLE mapping with 'size' and 'counts'") from None
    counts = raw_counts if isinstance(raw_counts, list) else rle_counts_from_string(raw_counts)
    runs = np.asarray(counts, dtype=np.int64)
    if runs.size and (runs.min() < 0 or runs.sum() != height * width):
        raise DataError(f"RLE runs add up to {int(runs.sum())} pixels, expected {height}x{width} = {height * width}")
    values = np.arange(runs.size, dtype=np.int64) % 2
    flat = np.repeat(values.astype(np.uint8), runs)
    if flat.size != height * width:
        raise DataError(f"RLE covers {flat.size} pixels, expected {height}x{width} = {height * width}")
    return flat.reshape(width, height).T


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Inverse of :func:`decode_rle` with compressed counts (what the Detail JSON stores)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_string_from_counts(runs)}


def context_label_map(height: int, width: int, annotations: Iterable[tuple[int, Mapping[str, Any]]]) -> np.ndarray:
    """The Context label map of one image: uint8 (height, width), values 0..59.

    ``annotations`` are (Detail category id, RLE segmentation) in the JSON's order. Like the
    Detail API's ``getMask`` the canvas starts at 0 and each annotation paints its category id
    over the pixels of its mask, later over earlier. The painted ids are then mapped to their
    rank in :data:`CONTEXT_CATEGORY_IDS`; an id outside that list (a category the 59-class
    benchmark does not score; MMSegmentation's converter would stop on it) becomes 0, so a pixel
    whose last annotation is such a category is background.
    """
    canvas = np.zeros((height, width), dtype=np.int64)
    for category_id, segmentation in annotations:
        mask = decode_rle(segmentation)
        if mask.shape != (height, width):
            raise DataError(f"an annotation of category {category_id} has an RLE of size "
                            f"{mask.shape[0]}x{mask.shape[1]} (h x w) on an image of {height}x{width}")
        canvas[mask.astype(bool)] = int(category_id)
    return map_context_ids(canvas)


def map_context_ids(canvas: np.ndarray) -> np.ndarray:
    """Detail category ids -> Context labels 0..59 (rank in the list; other ids -> 0)."""
    ids = np.asarray(CONTEXT_CATEGORY_IDS)
    index = np.clip(np.searchsorted(ids, canvas), 0, len(ids) - 1)
    return np.where(ids[index] == canvas, index, 0).astype(np.uint8)


# --------------------------------------------------------------------------- COCO-Stuff / COCO-Object

# Raw stuffthingmaps values that never occur (category ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83
# and 91 are not used by COCO, and mmseg's coco_stuff164k converter's clsID_to_trID skips them).
COCO_UNUSED: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_USED: tuple[int, ...] = tuple(v for v in range(182) if v not in COCO_UNUSED)
COCO_NUM_THINGS = 80
COCO_UNLABELLED = 255


def _coco_luts() -> tuple[np.ndarray, np.ndarray]:
    stuff = np.full(256, 255, dtype=np.uint8)              # unused and unknown values -> ignore
    stuff[list(COCO_USED)] = np.arange(len(COCO_USED))
    obj = np.zeros(256, dtype=np.uint8)                    # stuff, 255 and unknown -> background
    things = [v for v in COCO_USED if v < 90]
    obj[things] = np.arange(1, len(things) + 1)
    return stuff, obj


_COCO_STUFF_LUT, _COCO_OBJECT_LUT = _coco_luts()


def coco_stuff_train_ids(raw: np.ndarray) -> np.ndarray:
    """Raw stuffthingmap (uint8) -> COCO-Stuff train ids 0..170, 255 kept as ignore (as mmseg's)."""
    return _COCO_STUFF_LUT[_uint8_map(raw)]


def coco_object_ids(raw: np.ndarray) -> np.ndarray:
    """Raw stuffthingmap (uint8) -> COCO-Object labels: things 1..80, everything else 0 (as TCL's)."""
    return _COCO_OBJECT_LUT[_uint8_map(raw)]


def unexpected_coco_values(raw: np.ndarray) -> list[int]:
    """Values in a raw map that are neither one of the 171 used values nor 255 (never published)."""
    allowed = np.zeros(256, dtype=bool)
    allowed[list(COCO_USED)] = True
    allowed[COCO_UNLABELLED] = True
    present = np.flatnonzero(np.bincount(_uint8_map(raw).ravel(), minlength=256))
    return [int(v) for v in present if not allowed[v]]


def _uint8_map(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 2:
        raise DataError(f"expected an 8-bit single-channel label map, found dtype {array.dtype} and shape {array.shape}")
    return array


# --------------------------------------------------------------------------- Cityscapes

# The Cityscapes label table (cityscapesscripts/helpers/labels.py): (name, id, trainId). A
# trainId of 255 is ignored in evaluation; id -1 (license plate) is never drawn.
CITYSCAPES_LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18), ("license plate", -1, -1),
)
_CITYSCAPES_BY_NAME = {name: (label_id, train_id) for name, label_id, train_id in CITYSCAPES_LABELS}
CITYSCAPES_IGNORE = 255


def cityscapes_label_of(name: str) -> tuple[int, int]:
    """(id, trainId) of a polygon label; 'cargroup'-style names fall back to their base label."""
    if name not in _CITYSCAPES_BY_NAME and name.endswith("group"):
        name = name[: -len("group")]
    if name not in _CITYSCAPES_BY_NAME:
        raise DataError(f"Cityscapes label '{name}' is not in the Cityscapes label table")
    return _CITYSCAPES_BY_NAME[name]


# json2labelImg's encodings: which number of a label, in cityscapes_label_of's (id, trainId), is drawn.
CITYSCAPES_ENCODINGS = {"ids": 0, "trainIds": 1}


def cityscapes_polygons_to_label_map(annotation: Mapping[str, Any], encoding: str) -> np.ndarray:
    """A parsed ``*_gtFine_polygons.json`` -> uint8 (imgHeight, imgWidth) map, as cityscapesscripts'
    ``json2labelImg(..., encoding)`` draws it (``encoding``: "ids" or "trainIds").

    An L image filled with 'unlabeled''s number in that encoding (id 0, trainId 255); objects drawn in
    file order with ``ImageDraw.polygon(points, fill=number)``; deleted objects and labels with a
    negative id (license plate) skipped; void labels such as 'out of roi' or 'ego vehicle' drawn
    with their number (trainId 255) over what lies beneath.
    """
    if encoding not in CITYSCAPES_ENCODINGS:
        raise ValueError(f"encoding {encoding!r} is not one of {sorted(CITYSCAPES_ENCODINGS)}")
    pick = CITYSCAPES_ENCODINGS[encoding]
    try:
        width, height = int(annotation["imgWidth"]), int(annotation["imgHeight"])
        objects = list(annotation["objects"])
    except (KeyError, TypeError, ValueError):
        raise DataError("not a Cityscapes polygon file: expected imgWidth, imgHeight and objects") from None
    image = Image.new("L", (width, height), cityscapes_label_of("unlabeled")[pick])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        if obj.get("deleted"):
            continue
        label = cityscapes_label_of(str(obj["label"]))
        if label[0] < 0:
            continue
        points = [(p[0], p[1]) for p in obj["polygon"]]
        try:
            draw.polygon(points, fill=label[pick])
        except (TypeError, ValueError) as exc:
            raise DataError(f"cannot draw the polygon of a '{obj['label']}' object ({exc})") from None
    return np.array(image)


def cityscapes_train_ids_from_polygons(annotation: Mapping[str, Any]) -> np.ndarray:
    """A parsed ``*_gtFine_polygons.json`` -> uint8 train ids (0..18, 255), as ``json2labelImg(..., 'trainIds')``."""
    return cityscapes_polygons_to_label_map(annotation, "trainIds")


def cityscapes_label_ids_from_polygons(annotation: Mapping[str, Any]) -> np.ndarray:
    """A parsed ``*_gtFine_polygons.json`` -> uint8 label ids (0..33), as ``json2labelImg(..., 'ids')``
    (what ``*_gtFine_labelIds.png`` holds; background 'unlabeled' = 0)."""
    return cityscapes_polygons_to_label_map(annotation, "ids")


def _cityscapes_id_lut() -> np.ndarray:
    lut = np.full(256, CITYSCAPES_IGNORE, dtype=np.uint8)
    for _, label_id, train_id in CITYSCAPES_LABELS:
        if label_id >= 0:
            lut[label_id] = train_id
    return lut


_CITYSCAPES_ID_LUT = _cityscapes_id_lut()


def cityscapes_train_ids_from_label_ids(label_ids: np.ndarray) -> np.ndarray:
    """``*_gtFine_labelIds.png`` values (0..33) -> train ids; ids outside the table -> 255.

    Differs from the polygon rendering along some object edges (cityscapesScripts#29), which is
    why ``prepare`` prefers the polygons and records which one it used.
    """
    return _CITYSCAPES_ID_LUT[_uint8_map(label_ids)]
