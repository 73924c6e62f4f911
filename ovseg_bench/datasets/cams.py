"""Saved class activation maps (CAMs) for ``--method predictions`` on the label-conditioned track.

Two on-disk formats, one ``<image id>.npy`` per image, both an ``np.save`` of a pickled dict
(a 0-d object array), which the references read with ``np.load(path, allow_pickle=True).item()``:

- **WeakTr / SemPLeS**: ``{class index: float32 [H, W]}``, one entry per present class in
  ascending index order, each min-max normalised (hustvl/WeakTr@3457ad3d052a2f65320671cd9fc801b5c9dcb5c6
  :engine.py ``generate_attention_maps_ms``). The index is 0-based over the foreground classes:
  VOC 0..19; COCO 0..89 = category id - 1 (``nb_classes`` 90, datasets.py ``build_dataset``).
  The evaluation stacks the maps in dict order with label ``index + 1`` (evaluation.py
  ``do_python_eval``).
- **CLIP-ES**: ``{"keys": int64 [K], "attn_highres": float16 [K, H, W]}``, keys 0-based over the
  foreground classes (VOC 20, COCO 80) in XML first-appearance / list order, background not
  included; the evaluation's label is ``keys + 1`` with 0 prepended for background
  (linyq2117/CLIP-ES@3893f817be359c5ee1dbf8111cad381a532c7acc:generate_cams_voc12.py ``perform``,
  eval_cam.py ``run_eval_cam``).

Unpickling runs code that a file names, so the files are read with the project's allow-list
unpickler and exactly the globals a dict of numpy arrays needs (:data:`NUMPY_GLOBALS`).

Pseudo mask (:func:`pseudo_mask`): a constant plane ``t`` (in the file's dtype, as ``np.pad``
makes it) goes before the present classes' CAMs; the argmax over that stack is the label, ties
going to the first entry (background, then file order), as ``np.argmax`` does. WeakTr takes a
float32 softmax over the stack first (monotone, but it rounds values within about one float32
ulp of the maximum to equal probabilities, so such a pixel goes to background); CLIP-ES's
threshold branch takes the argmax of the float16 stack directly.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..safe_pickle import latin1_bytes, safe_load
from .label_conditioned import COCO_THING_IDS

FORMATS = ("weaktr", "clip-es")
CLIP_ES_MAPS = "attn_highres"                     # eval_cam.py's default --cam_type
CLIP_ES_KEYS = {"keys", "attn_highres", "highres", "strided_cam"}  # the last two: commented-out outputs


@dataclasses.dataclass(frozen=True, eq=False)
class Cams:
    """The CAMs of one image.

    Attributes:
        classes: label ids (harness label space, 0 = background, so never 0) in the file's order,
            which decides ties between classes.
        maps: float32 [K, H, W], ``maps[k]`` the CAM of ``classes[k]``; exact copies of float16
            files' values.
        source: which reference's format and pseudo-mask rule (:data:`FORMATS`).
        file_dtype: the maps' dtype in the file; the threshold plane is rounded to it first.
    """

    classes: tuple[int, ...]
    maps: np.ndarray
    source: str = "weaktr"
    file_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.source not in FORMATS:
            raise DataError(f"CAM format '{self.source}' is not one of {FORMATS}")
        if self.maps.dtype != np.float32 or self.maps.ndim != 3 or self.maps.shape[0] != len(self.classes):
            raise DataError(f"CAMs must be float32 [K, H, W] with K = {len(self.classes)} classes, "
                            f"got {self.maps.dtype} {list(self.maps.shape)}")


# ------------------------------------------------------------------------------ safe reading


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals an ``np.save``d dict of numeric arrays names, under numpy 1 and numpy 2 spellings:
    the array rebuild function, ``ndarray``, ``dtype`` (called with a type code such as 'f4'),
    and, in protocol 2 files, ``_codecs.encode`` for bytes literals."""
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, whatever module holds it
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): latin1_bytes,
    }


NUMPY_GLOBALS = tuple(_numpy_globals())  # the allow-list's names, for messages and tests


def read_npy_dict(path: Path) -> dict[Any, Any]:
    """The dict inside an ``np.save``d 0-d object array, unpickled with an allow-list.

    Raises DataError naming the file when it is not such an .npy, and
    :class:`~ovseg_bench.safe_pickle.UnsafePickleError` (a DataError) when the pickle names any
    global outside :data:`NUMPY_GLOBALS`; nothing from the file runs then.
    """

    try:
        with open(path, "rb") as stream:
            _read_object_header(stream, path)
            value = safe_load(stream, allowed=_numpy_globals())
    except OSError as exc:
        raise DataError(f"{path}: cannot read the CAM file ({exc.strerror or exc})") from None
    if not (isinstance(value, np.ndarray) and value.dtype == object and value.shape == ()):
        raise DataError(f"{path}: the pickle holds {type(value).__name__}, not a 0-d object array")
    item = value.item()
    if not isinstance(item, dict):
        raise DataError(f"{path}: the saved object is a {type(item).__name__}, not a dict of CAMs")
    return item


def _read_object_header(stream: BinaryIO, path: Path) -> None:
    """Check an .npy header for a 0-d object array, leaving ``stream`` at the pickle."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = readers[version](stream)
    except ValueError as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    if dtype != object or shape != ():
        raise DataError(f"{path}: holds a {dtype} array of shape {list(shape)}, not a saved dict of CAMs "
                        "(WeakTr's {class index: map} or CLIP-ES's {'keys', 'attn_highres'})")


# ----------------------------------------------------------------------------------- loading


def load_cams(path: Path, num_classes: int, *, key_labels: Sequence[int] | None = None) -> Cams:
    """Read one image's CAMs in WeakTr's or CLIP-ES's format (told apart by the dict's keys).

    Args:
        path: the ``<image id>.npy`` file.
        num_classes: N of the dataset, background (label 0) included.
        key_labels: label id of each 0-based class key in the file; default ``key + 1`` (VOC in
            both formats, COCO in CLIP-ES's). WeakTr's COCO files index category id - 1: pass
            :func:`weaktr_coco_key_labels` for them on the 81-class cards.

    Raises DataError naming the file for anything malformed: unknown dict keys, non-integer
    class keys, maps that are not finite float [H, W] of one size, or labels outside 1..N-1.
    """
    content = read_npy_dict(path)
    if content and all(isinstance(k, int) and not isinstance(k, bool) for k in content):
        keys, maps, source = _weaktr_content(content, path)
    elif "keys" in content and CLIP_ES_MAPS in content and set(content) <= CLIP_ES_KEYS:
        keys, maps, source = _clip_es_content(content, path)
    elif not content:
        keys, maps, source = [], np.zeros((0, 0, 0), np.float32), "weaktr"
    else:
        raise DataError(f"{path}: dict keys {sorted(map(repr, content))[:6]} are neither WeakTr's class indices "
                        f"nor CLIP-ES's {sorted(CLIP_ES_KEYS)}")
    _check_maps(maps, path)
    labels = _labels_of_keys(keys, num_classes, key_labels, path)
    return Cams(labels, maps.astype(np.float32), source, maps.dtype.name if maps.size else "float32")


def _weaktr_content(content: dict[int, Any], path: Path) -> tuple[list[int], np.ndarray, str]:
    values = list(content.values())
    if not all(isinstance(v, np.ndarray) and v.ndim == 2 for v in values):
        raise DataError(f"{path}: every WeakTr CAM must be an [H, W] array")
    if len({v.shape for v in values}) != 1 or len({v.dtype for v in values}) != 1:
        raise DataError(f"{path}: the CAMs differ in size or dtype ({sorted({str(v.shape) for v in values})})")
    # np.array over the dict's values, in dict order, as WeakTr's evaluation stacks them.
    return list(content), np.stack(values), "weaktr"


def _clip_es_content(content: dict[str, Any], path: Path) -> tuple[list[int], np.ndarray, str]:
    keys, maps = content["keys"], content[CLIP_ES_MAPS]
    if not (isinstance(keys, np.ndarray) and keys.ndim == 1 and keys.dtype.kind in "iu"):
        raise DataError(f"{path}: 'keys' must be a 1-D integer array")
    if not (isinstance(maps, np.ndarray) and maps.ndim == 3 and maps.shape[0] == keys.shape[0]):
        raise DataError(f"{path}: '{CLIP_ES_MAPS}' must be [K, H, W] with K = {keys.shape[0]} keys, "
                        f"got {list(getattr(maps, 'shape', []))}")
    return [int(k) for k in keys], maps, "clip-es"


def _check_maps(maps: np.ndarray, path: Path) -> None:
    if maps.dtype.kind != "f" or maps.dtype.itemsize > 8:
        raise DataError(f"{path}: CAMs must be floating point, got {maps.dtype}")
    if maps.size and not np.isfinite(maps).all():
        raise DataError(f"{path}: CAMs hold NaN or infinite values")


def _labels_of_keys(keys: Sequence[int], num_classes: int, key_labels: Sequence[int] | None,
                    path: Path) -> tuple[int, ...]:
    labels = []
    for key in keys:
        inside = key_labels is None or 0 <= key < len(key_labels)
        label = (key + 1 if key_labels is None else key_labels[key]) if inside else -1
        if not 1 <= label < num_classes:
            raise DataError(f"{path}: class key {key} gives label {label}, outside 1..{num_classes - 1} "
                            f"(0-based foreground keys; WeakTr's COCO files need weaktr_coco_key_labels())")
        labels.append(int(label))
    if len(set(labels)) != len(labels):
        raise DataError(f"{path}: class keys {list(keys)} name a class twice")
    return tuple(labels)


def weaktr_coco_key_labels() -> tuple[int, ...]:
    """WeakTr's 90 COCO keys -> labels of the 81-class cards: key k is category id k + 1, whose
    label is 1 + its rank among the 80 thing ids; the ten unused ids give -1 (refused)."""
    label_of_id = {cat: rank + 1 for rank, cat in enumerate(COCO_THING_IDS)}
    return tuple(label_of_id.get(key + 1, -1) for key in range(90))


# ------------------------------------------------------------------------------ pseudo masks


def pseudo_mask(cams: Cams, threshold: float, shape: tuple[int, int]) -> np.ndarray:
    """[H, W] uint8 labels: argmax over [threshold plane, CAMs of the present classes].

    The plane is ``threshold`` rounded to the file's dtype (``np.pad`` fills in the array's
    dtype: float32 for WeakTr, float16 for CLIP-ES) and then held in float32, which is exact.
    WeakTr's rule takes ``F.softmax(..., dim=0)`` in float32 on the CPU before the argmax
    (WeakTr@3457ad3:evaluation.py ``do_python_eval``); CLIP-ES's threshold branch does not
    (CLIP-ES@3893f81:eval_cam.py). ``np.argmax`` picks the first maximum, so ties go to
    background, then to the earlier class in file order. No class: all background.

    Raises DataError when the CAMs are not ``shape`` (H, W), the GT's size.
    """
    height, width = int(shape[0]), int(shape[1])
    if not cams.classes:
        return np.zeros((height, width), dtype=np.uint8)
    if cams.maps.shape[1:] != (height, width):
        raise DataError(f"CAMs are {cams.maps.shape[2]}x{cams.maps.shape[1]} but the GT is {width}x{height} "
                        "(width x height); CAMs must be saved at the image's own size")
    plane = np.float32(np.dtype(cams.file_dtype).type(threshold))
    scores = np.concatenate([np.full((1, height, width), plane, dtype=np.float32), cams.maps])
    if cams.source == "weaktr":
        scores = F.softmax(torch.from_numpy(scores), dim=0).numpy()
    lookup = np.array((0, *cams.classes), dtype=np.uint8)
    return lookup[np.argmax(scores, axis=0)]


def pseudo_masks(cams: Cams, thresholds: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """[T, H, W] uint8: :func:`pseudo_mask` at each threshold, in grid order (what
    :meth:`ThresholdCurveCounts.update <ovseg_bench.engine.curve_counts.ThresholdCurveCounts.update>` takes)."""
    return np.stack([pseudo_mask(cams, t, shape) for t in thresholds])


def save_cams(path: Path, cams: Cams) -> None:
    """Write ``cams`` in its own format, as its reference saves them (``np.save`` of a dict), so
    that ``--method predictions`` reads back exactly these values: WeakTr's {label - 1: float32
    [H, W]} in label order, or CLIP-ES's {"keys": label - 1, "attn_highres": float16 [K, H, W]}.
    Written atomically."""
    from ..atomic import atomic_path

    if cams.source == "clip-es":
        content: Any = {"keys": np.array([c - 1 for c in cams.classes], dtype=np.int64),
                        CLIP_ES_MAPS: cams.maps.astype(np.float16)}
    else:
        content = {int(c) - 1: np.ascontiguousarray(m, dtype=np.float32) for c, m in zip(cams.classes, cams.maps)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            np.save(stream, np.array(content, dtype=object), allow_pickle=True)
