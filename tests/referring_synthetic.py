"""A tiny refer tree in the exact on-disk formats of RefCOCO (unc) and RefCOCOg (umd).

Spelled out here independently of the cards and of ovseg_bench.datasets.refer:

- ``<root>/<dataset>/refs(<split_by>).p``: a protocol-2 pickle of a list of ref dicts, keys as
  lichengunc/refer's data/README.md lists them (ref_id, ann_id, category_id, file_name,
  image_id, split, sent_ids, sentences: [{raw, sent, sent_id, tokens}]). The released files
  were written by Python 2's cPickle, whose ``str`` is bytes: :class:`Py2Str` values are written
  with the SHORT_BINSTRING / BINSTRING opcodes Python 2 uses, Python 3 ``str`` values as
  BINUNICODE (Python 2 ``unicode``).
- ``<root>/<dataset>/instances.json``: COCO format (images, annotations, categories); polygon
  segmentations as lists of parts, some parts overlapping (so sum == 1 and union differ), and
  one annotation as an uncompressed RLE.
- ``<root>/images/mscoco/images/train2014/COCO_train2014_<12 digits>.jpg``.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGES = Path("images/mscoco/images/train2014")


class Py2Str(str):
    """A text pickled as Python 2 ``str`` (bytes opcodes), decoded by latin1 on loading."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj: Py2Str) -> None:
        data = str(obj).encode("latin1")
        if self.proto == 0:  # Python 2's text protocol: STRING with the repr of the bytes
            self.write(pickle.STRING + repr(data)[1:].encode("ascii") + b"\n")
        elif len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def py2_pickle(obj: Any, protocol: int = 2) -> bytes:
    """Protocol 0 or 2 bytes of ``obj`` with :class:`Py2Str` as Python 2 ``str``."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


@dataclass(frozen=True)
class SynthImage:
    image_id: int
    height: int
    width: int

    @property
    def file_name(self) -> str:
        return f"COCO_train2014_{self.image_id:012d}.jpg"


# (image_id, height, width): landscape and portrait, not square.
IMAGES_REFCOCO = (SynthImage(581857, 40, 56), SynthImage(9, 48, 36), SynthImage(262145, 32, 32))
IMAGES_REFCOCOG = (SynthImage(1000, 36, 44), SynthImage(2000, 30, 40))

# Two overlapping squares (overlap 4x4 at rows/cols 8..11) and a third part inside the first.
OVERLAPPING = [[4.0, 4.0, 12.0, 4.0, 12.0, 12.0, 4.0, 12.0],
               [8.0, 8.0, 20.0, 8.0, 20.0, 20.0, 8.0, 20.0],
               [5.0, 5.0, 7.0, 5.0, 7.0, 7.0, 5.0, 7.0]]
SINGLE = [[2.0, 3.0, 25.0, 3.0, 25.0, 20.0, 2.0, 20.0]]
TRIANGLE = [[1.0, 1.0, 30.0, 2.0, 10.0, 28.0]]


def _uncompressed_rle(height: int, width: int) -> dict[str, Any]:
    """COCO uncompressed RLE (list counts, column-major runs from 0s) of a box rows 5..14, cols 3..9."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[5:15, 3:10] = 1
    flat = mask.T.reshape(-1)
    runs, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            runs.append(run)
            value, run = int(pixel), 1
    runs.append(run)
    return {"size": [height, width], "counts": runs}


def _sentence(sent_id: int, raw: str, py2: bool = True) -> dict[str, Any]:
    text = Py2Str(raw) if py2 else raw
    tokens = [Py2Str(t) for t in raw.lower().split()]
    return {Py2Str("tokens"): tokens, Py2Str("raw"): text, Py2Str("sent_id"): sent_id,
            Py2Str("sent"): Py2Str(raw.lower())}


def _ref(ref_id: int, ann_id: int, image: SynthImage, split: str, sentences: list[dict[str, Any]],
         category_id: int = 1) -> dict[str, Any]:
    return {Py2Str("sent_ids"): [s[Py2Str("sent_id")] for s in sentences],
            Py2Str("file_name"): Py2Str(f"COCO_train2014_{image.image_id:012d}_{ann_id}.jpg"),
            Py2Str("ann_id"): ann_id, Py2Str("ref_id"): ref_id, Py2Str("image_id"): image.image_id,
            Py2Str("split"): Py2Str(split), Py2Str("sentences"): sentences, Py2Str("category_id"): category_id}


def refcoco_refs() -> list[dict[str, Any]]:
    """RefCOCO-like refs in file order: val, testA, train, testB, val, testB (the file is not sorted by split)."""
    a, b, c = IMAGES_REFCOCO
    return [
        _ref(10, 101, a, "val", [_sentence(100, "man on the LEFT"), _sentence(101, "caf\xe9 guy")]),
        _ref(11, 102, a, "testA", [_sentence(110, "woman in red"), _sentence(111, "na\u00efve person", py2=False),
                                  _sentence(112, "person at back")]),
        _ref(12, 103, b, "train", [_sentence(120, "train only")]),
        _ref(13, 104, b, "testB", [_sentence(130, "the dog")], category_id=18),
        _ref(5, 105, c, "val", [_sentence(50, "blob on the right")], category_id=3),
        _ref(14, 106, c, "testB", [_sentence(140, "the other blob"), _sentence(141, "blob")], category_id=3),
    ]


def refcocog_refs() -> list[dict[str, Any]]:
    a, b = IMAGES_REFCOCOG
    return [
        _ref(70, 201, a, "test", [_sentence(700, "A long description of the thing on the left.")]),
        _ref(71, 202, b, "val", [_sentence(710, "The animal standing near the fence."),
                                 _sentence(711, "brown horse")]),
        _ref(72, 203, a, "train", [_sentence(720, "not evaluated")]),
    ]


def _annotation(ann_id: int, image: SynthImage, segmentation: Any, category_id: int = 1) -> dict[str, Any]:
    return {"segmentation": segmentation, "area": 1.0, "iscrowd": 0, "image_id": image.image_id,
            "bbox": [0.0, 0.0, 1.0, 1.0], "category_id": category_id, "id": ann_id}


def refcoco_annotations() -> list[dict[str, Any]]:
    a, b, c = IMAGES_REFCOCO
    return [_annotation(101, a, OVERLAPPING), _annotation(102, a, SINGLE), _annotation(103, b, TRIANGLE),
            _annotation(104, b, _uncompressed_rle(b.height, b.width), 18),
            _annotation(105, c, [OVERLAPPING[0], OVERLAPPING[1]], 3), _annotation(106, c, SINGLE, 3),
            _annotation(107, c, TRIANGLE, 3)]  # 107: an annotation no ref points at


def refcocog_annotations() -> list[dict[str, Any]]:
    a, b = IMAGES_REFCOCOG
    return [_annotation(201, a, OVERLAPPING), _annotation(202, b, SINGLE), _annotation(203, a, TRIANGLE)]


def _write_instances(folder: Path, images: tuple[SynthImage, ...], annotations: list[dict[str, Any]]) -> None:
    document = {
        "images": [{"license": 1, "file_name": im.file_name, "coco_url": "", "height": im.height,
                    "width": im.width, "date_captured": "", "flickr_url": "", "id": im.image_id} for im in images],
        "annotations": annotations,
        "categories": [{"supercategory": "person", "id": 1, "name": "person"},
                       {"supercategory": "animal", "id": 18, "name": "dog"},
                       {"supercategory": "vehicle", "id": 3, "name": "car"}],
    }
    (folder / "instances.json").write_text(json.dumps(document), encoding="utf-8")


def _write_jpegs(root: Path, images: tuple[SynthImage, ...], seed: int) -> None:
    folder = root / IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for im in images:
        pixels = rng.integers(0, 256, size=(im.height, im.width, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / im.file_name, quality=95)


def write_refer_tree(root: Path) -> Path:
    """Write the refcoco (unc) and refcocog (umd) trees under ``root``; returns ``root``."""
    # refcoco as protocol 2; refcocog as protocol 0, Python 2's cPickle.dump default.
    for dataset, split_by, refs, images, anns, protocol in (
            ("refcoco", "unc", refcoco_refs(), IMAGES_REFCOCO, refcoco_annotations(), 2),
            ("refcocog", "umd", refcocog_refs(), IMAGES_REFCOCOG, refcocog_annotations(), 0)):
        folder = root / dataset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"refs({split_by}).p").write_bytes(py2_pickle(refs, protocol))
        _write_instances(folder, images, anns)
        _write_jpegs(root, images, seed=len(dataset))
    return root
