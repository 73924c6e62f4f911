"""The referring track's data: RefCOCO, RefCOCO+ and RefCOCOg in the refer toolkit's layout.

Layout under the data root, as the refer toolkit and LAVT lay it out (the data root plays the
part of refer's ``data_root`` / LAVT's ``./refer/data``):

- ``<dataset>/refs(<split_by>).p`` and ``<dataset>/instances.json`` (lichengunc/refer
  @e3bbaa30d2ca41cf0e5c0d3819d7e4ed9fd38fff:data/README.md);
- COCO train2014 images in ``images/mscoco/images/train2014/<file_name>``, the folder
  ``REFER.__init__`` reads (refer.py, ``IMAGE_DIR``); LAVT's README
  (yz93/LAVT-RIS@1da0af9f21b637c0cae9ea1363d2dd9b40e19628:README.md, "Datasets") says to
  extract ``train2014.zip`` into ``./refer/data/images/mscoco/images``. ``file_name`` comes from
  ``instances.json``'s ``images`` (the refs' own ``file_name`` is not an image file: refer's
  data/README says to ignore it).

``refs(<split_by>).p`` is a Python 2 pickle; ``ovseg-bench data prepare`` reads it once with the
allow-list unpickler (:func:`convert_refs`) and everything else reads the JSON it writes.

Samples (one per sentence) and GT follow the references' data loader, which is the same file in
GLCF (Seonghoon-Yu/Zero-shot-RIS@75ff6ed85e1c99e4ae01be5d7f15e78e690823c0:data/dataset_refer_bert.py)
and LAVT (yz93/LAVT-RIS@1da0af9:data/dataset_refer_bert.py), over the refer API (their
refer/refer.py):

- refs are taken in the pickle's order, filtered by ``REFER.getRefIds(split=...)``: ``val`` by
  equality, ``testA``/``testB`` by the split's last letter being in the ref's ``split``
  (``testAB`` counts for both), ``test`` by ``"test"`` being in it; within a ref, its
  ``sentences`` in order (both evaluation loops run over the sentences of each ref). The text is
  the sentence's ``raw`` field, as both tokenise it.
- GT (``gt_rule: sum_eq_1``): ``REFER.getMask`` decodes every polygon part of the annotation
  with ``pycocotools.mask.frPyObjects(segmentation, height, width)`` at the size
  ``instances.json`` gives, sums the parts, and the loader keeps the pixels where the sum is
  exactly 1 (``annot[ref_mask == 1] = 1``): where parts overlap, the pixel is background.
  ``union`` keeps every covered pixel (what ``pycocotools`` ``annToMask`` gives after merging).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as coco_mask
from torch.utils.data import Dataset

from ..atomic import atomic_write, sha256_file
from ..imaging import decode_image
from ..errors import ConfigError, DataError
from ..safe_pickle import safe_load
from ..yamlconf import load_dataclass

TRACK = "referring"
SPLIT_BYS = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd",)}
SPLITS = {"unc": ("val", "testA", "testB"), "umd": ("val", "test")}
GT_RULES = ("sum_eq_1", "union")
# Where refer.py (REFER.__init__) and LAVT's README put the COCO train2014 images.
COCO_IMAGES = "images/mscoco/images/train2014"
REFS_FORMAT = "ovseg-bench/refs/1"
INSTANCES_FILE = "instances.json"


# --------------------------------------------------------------------------- card


@dataclasses.dataclass(frozen=True)
class ReferringCard:
    """One split of a referring dataset (the card type of the ``referring`` track).

    ``root`` (the dataset folder, holding the refs and ``instances.json``) and ``images`` (the
    COCO train2014 folder) are relative to the data root. ``num_samples`` counts sentences,
    ``num_images`` distinct images of the split. ``gt_rule`` is how polygon parts become the GT
    mask (module docstring).
    """

    name: str
    title: str
    track: str
    dataset: str
    split_by: str
    split: str
    root: str
    images: str
    num_samples: int
    num_images: int
    gt_rule: str = "sum_eq_1"
    card_version: int = 1
    notes: str = ""

    def __post_init__(self) -> None:
        where = f"referring card '{self.name}'"
        if self.track != TRACK:
            raise ConfigError(f"{where}: track is '{self.track}'; a referring card has track '{TRACK}'")
        if self.dataset not in SPLIT_BYS:
            raise ConfigError(f"{where}: dataset '{self.dataset}' is not one of {sorted(SPLIT_BYS)}")
        if self.split_by not in SPLIT_BYS[self.dataset]:
            raise ConfigError(f"{where}: split_by '{self.split_by}' is not one of {SPLIT_BYS[self.dataset]} "
                              f"for {self.dataset}")
        if self.split not in SPLITS[self.split_by]:
            raise ConfigError(f"{where}: split '{self.split}' is not one of {SPLITS[self.split_by]} "
                              f"for split_by '{self.split_by}'")
        if self.gt_rule not in GT_RULES:
            raise ConfigError(f"{where}: gt_rule '{self.gt_rule}' is not one of {GT_RULES}")
        for field in ("num_samples", "num_images", "card_version"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: {field} must be a whole number >= 0, found {value!r}")

    def root_in(self, data_root: Path) -> Path:
        return Path(data_root) / self.root

    def images_in(self, data_root: Path) -> Path:
        return Path(data_root) / self.images

    def refs_pickle(self, data_root: Path) -> Path:
        return refs_pickle_path(Path(data_root), self.dataset, self.split_by)

    def refs_json(self, data_root: Path) -> Path:
        return refs_json_path(Path(data_root), self.dataset, self.split_by)

    def instances_path(self, data_root: Path) -> Path:
        return self.root_in(data_root) / INSTANCES_FILE


def load_referring_card(path: Path) -> ReferringCard:
    """The card in YAML file ``path``; its ``name`` must be the file's stem (ConfigError)."""
    card = load_dataclass(ReferringCard, Path(path))
    if card.name != Path(path).stem:
        raise ConfigError(f"{path}: card name '{card.name}' differs from its file name '{Path(path).stem}'")
    return card


# --------------------------------------------------------------------------- refs pickle -> JSON


def refs_pickle_path(data_root: Path, dataset: str, split_by: str) -> Path:
    return Path(data_root) / dataset / f"refs({split_by}).p"


def refs_json_path(data_root: Path, dataset: str, split_by: str) -> Path:
    return Path(data_root) / dataset / f"refs({split_by}).json"


def _check_pair(dataset: str, split_by: str) -> None:
    if dataset not in SPLIT_BYS:
        raise ConfigError(f"unknown referring dataset '{dataset}'; choose one of {sorted(SPLIT_BYS)}")
    if split_by not in SPLIT_BYS[dataset]:
        raise ConfigError(f"{dataset} is evaluated with split_by {SPLIT_BYS[dataset]}, not '{split_by}'")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _slim_sentence(sent: Any, where: str) -> dict[str, Any]:
    """The sentence fields the harness reads: sent_id, raw (what GLCF/LAVT tokenise), sent, tokens."""
    if not isinstance(sent, dict) or not _is_int(sent.get("sent_id")) or not isinstance(sent.get("raw"), str):
        raise DataError(f"{where}: a sentence is not a mapping with an integer 'sent_id' and a text 'raw'")
    slim: dict[str, Any] = {"sent_id": sent["sent_id"], "raw": sent["raw"]}
    if isinstance(sent.get("sent"), str):
        slim["sent"] = sent["sent"]
    tokens = sent.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        slim["tokens"] = tokens
    return slim


def _slim_ref(ref: Any, where: str) -> dict[str, Any]:
    """One ref reduced to ref_id, ann_id, image_id, category_id, split and its sentences."""
    keys = ("ref_id", "ann_id", "image_id", "category_id")
    if not isinstance(ref, dict) or not all(_is_int(ref.get(k)) for k in keys):
        raise DataError(f"{where}: not a ref mapping with integer {', '.join(keys)}")
    if not isinstance(ref.get("split"), str) or not isinstance(ref.get("sentences"), list):
        raise DataError(f"{where}: a ref needs a text 'split' and a list of 'sentences'")
    slim = {k: ref[k] for k in keys}
    slim["split"] = ref["split"]
    slim["sentences"] = [_slim_sentence(s, where) for s in ref["sentences"]]
    return slim


def _kept_json(path: Path, dataset: str, split_by: str, pickle_path: Path) -> str | None:
    """Why an existing converted JSON can be kept, or None when it must be (re)written.

    It is kept when it parses, has our format, dataset and split_by, holds as many refs as it
    says, and came from the pickle now on disk (sha256), or the pickle is gone.
    """
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
        complete = (head.get("format") == REFS_FORMAT and head.get("dataset") == dataset
                    and head.get("split_by") == split_by and len(head["refs"]) == head["num_refs"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not complete:
        return None
    if not pickle_path.is_file():
        return f"kept {path} ({head['num_refs']} refs; {pickle_path.name} is not there to compare with)"
    if head.get("source", {}).get("sha256") != sha256_file(pickle_path):
        return None
    return f"kept {path}: already converted from this {pickle_path.name} ({head['num_refs']} refs)"


def convert_refs(data_root: Path, dataset: str, split_by: str, *,
                 report: Callable[[str], None] | None = None) -> Path:
    """Convert ``<data_root>/<dataset>/refs(<split_by>).p`` to ``refs(<split_by>).json`` beside it.

    The pickle is read once with :func:`ovseg_bench.safe_pickle.safe_load` (no globals). The JSON
    keeps, per ref in the pickle's order: ref_id, ann_id, image_id, category_id, split and the
    sentences (sent_id, raw, sent, tokens) in their order; it is written atomically with the
    pickle's sha256. Idempotent: a complete JSON converted from the same pickle (or whose
    pickle is gone) is kept and ``report`` says so; otherwise it is (re)written.

    Returns the JSON's path. Raises ConfigError for an unknown dataset/split_by pair, DataError
    for a missing, unsafe or malformed pickle.
    """
    _check_pair(dataset, split_by)
    pickle_path = refs_pickle_path(data_root, dataset, split_by)
    json_path = refs_json_path(data_root, dataset, split_by)
    say = report or (lambda _: None)
    if json_path.is_file() and (kept := _kept_json(json_path, dataset, split_by, pickle_path)):
        say(kept)
        return json_path
    if not pickle_path.is_file():
        raise DataError(f"{pickle_path} not found; put the refer toolkit's {dataset} annotations "
                        f"(refs({split_by}).p and {INSTANCES_FILE}, from {dataset}.zip, see "
                        f"github.com/lichengunc/refer) in {pickle_path.parent}")
    refs = safe_load(pickle_path)
    if not isinstance(refs, list):
        raise DataError(f"{pickle_path}: expected a list of refs, found {type(refs).__name__}")
    slim = [_slim_ref(ref, f"{pickle_path}: ref #{i}") for i, ref in enumerate(refs)]
    document = {"format": REFS_FORMAT, "dataset": dataset, "split_by": split_by,
                "source": {"file": pickle_path.name, "sha256": sha256_file(pickle_path)},
                "num_refs": len(slim), "refs": slim}
    atomic_write(json_path, json.dumps(document, ensure_ascii=False, separators=(",", ":")))
    say(f"wrote {json_path} ({len(slim)} refs from {pickle_path.name})")
    return json_path


# --------------------------------------------------------------------------- instances index


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    file_name: str
    height: int
    width: int


class InstancesIndex:
    """What the harness needs from a dataset's ``instances.json``: images and segmentations.

    Built once per listing and kept to the images and annotations of one split, so DataLoader
    workers inherit a small object rather than the whole file.
    """

    def __init__(self, images: dict[int, ImageInfo], annotations: dict[int, tuple[int, Any]], source: Path):
        self.images, self.annotations, self.source = images, annotations, Path(source)

    @classmethod
    def load(cls, path: Path, *, image_ids: set[int] | None = None,
             ann_ids: set[int] | None = None) -> InstancesIndex:
        """Parse ``path``; keep only ``image_ids`` / ``ann_ids`` when given. DataError if unreadable."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            images = {int(im["id"]): ImageInfo(str(im["file_name"]), int(im["height"]), int(im["width"]))
                      for im in data["images"] if image_ids is None or im["id"] in image_ids}
            anns = {int(a["id"]): (int(a["image_id"]), a["segmentation"])
                    for a in data["annotations"] if ann_ids is None or a["id"] in ann_ids}
        except FileNotFoundError:
            raise DataError(f"{path} not found; it comes with the refer toolkit's annotations "
                            "(see github.com/lichengunc/refer, data/README.md)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a readable COCO instances file ({type(exc).__name__}: {exc})") from None
        return cls(images, anns, Path(path))

    def image(self, image_id: int) -> ImageInfo:
        if image_id not in self.images:
            raise DataError(f"{self.source}: no image with id {image_id}; is it the instances.json of this dataset?")
        return self.images[image_id]

    def annotation(self, ann_id: int) -> tuple[int, Any]:
        """(image_id, segmentation) of annotation ``ann_id``."""
        if ann_id not in self.annotations:
            raise DataError(f"{self.source}: no annotation with id {ann_id}; is it the instances.json of this dataset?")
        return self.annotations[ann_id]


# --------------------------------------------------------------------------- GT masks


def _polygon_parts(segmentation: list, height: int, width: int, where: str) -> np.ndarray:
    """uint8 [H, W, K]: one decoded mask per polygon part, as ``REFER.getMask`` decodes them."""
    if not segmentation or not all(isinstance(p, list) and len(p) >= 4 and len(p) % 2 == 0 for p in segmentation):
        raise DataError(f"{where}: polygon segmentation must be a non-empty list of [x1, y1, x2, y2, ...] lists")
    if len(segmentation[0]) == 4:
        # pycocotools reads a list whose first item has 4 numbers as boxes, not polygons
        # (frPyObjects), so refer's getMask cannot decode it as a polygon either.
        raise DataError(f"{where}: the first polygon has only 2 points; pycocotools would read it as a box")
    try:
        # One call over the whole list, as getMask makes it (refer.py, REFER.getMask).
        rles = coco_mask.frPyObjects(segmentation, height, width)
        return coco_mask.decode(rles)
    except Exception as exc:  # pycocotools raises TypeError/ValueError on malformed input
        raise DataError(f"{where}: pycocotools cannot rasterise the polygons ({exc})") from None


def _rle_part(segmentation: dict, height: int, width: int, where: str) -> np.ndarray:
    """uint8 [H, W, 1] from a compressed (string counts) or uncompressed (list counts) RLE."""
    size = segmentation.get("size")
    if not isinstance(size, list) or [int(v) for v in size] != [height, width]:
        raise DataError(f"{where}: RLE size {size} differs from the image size [{height}, {width}] (GT size mismatch)")
    counts = segmentation.get("counts")
    try:
        if isinstance(counts, list):  # uncompressed: pycocotools compresses it first
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        return coco_mask.decode(rle)[:, :, None]
    except Exception as exc:
        raise DataError(f"{where}: pycocotools cannot decode the RLE ({exc})") from None


def gt_mask(index: InstancesIndex, ann_id: int, height: int, width: int, rule: str = "sum_eq_1") -> np.ndarray:
    """The GT mask of annotation ``ann_id`` at ``height`` x ``width``: bool [H, W].

    Args:
        index: the dataset's :class:`InstancesIndex`.
        ann_id: the ref's ``ann_id``.
        height, width: the image size from ``instances.json`` (what getMask rasterises at).
        rule: ``"sum_eq_1"`` keeps pixels covered by exactly one polygon part (GLCF/LAVT:
            ``getMask`` sums the parts, the loader keeps ``sum == 1``); ``"union"`` keeps pixels
            covered by any part. An RLE is one part, so both rules agree on it.

    getMask casts the sum to uint8 before the comparison, so it would also keep a pixel under
    257 parts; the exact count is compared here (no real annotation has 256 overlapping parts).
    Raises DataError for an unknown annotation or a malformed / mis-sized segmentation.
    """
    if rule not in GT_RULES:
        raise ConfigError(f"GT rule '{rule}' is not one of {GT_RULES}")
    _, segmentation = index.annotation(ann_id)
    where = f"{index.source}: annotation {ann_id}"
    if isinstance(segmentation, list):
        parts = _polygon_parts(segmentation, height, width, where)
    elif isinstance(segmentation, dict):
        parts = _rle_part(segmentation, height, width, where)
    else:
        raise DataError(f"{where}: segmentation is neither polygons nor RLE")
    coverage = parts.sum(axis=2, dtype=np.int64)
    return coverage == 1 if rule == "sum_eq_1" else coverage > 0


# --------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class ReferringRef:
    """One referring sample: a sentence of a ref."""

    sample_id: str     # f"{ref_id}_{sent_id}": unique, the id results and predictions use
    ref_id: int
    sent_id: int
    image_id: int
    image_path: Path
    text: str          # the sentence's raw text, as GLCF and LAVT feed it
    ann_id: int


def in_split(ref_split: str, split: str) -> bool:
    """Whether a ref whose ``split`` field is ``ref_split`` belongs to ``split``, as
    ``REFER.getRefIds(split=...)`` decides (lichengunc/refer@e3bbaa3:refer.py)."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split   # testAB belongs to both testA and testB
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def _read_refs_json(card: ReferringCard, data_root: Path) -> list[dict[str, Any]]:
    path = card.refs_json(data_root)
    prepare = f"run `ovseg-bench data prepare {card.dataset}` (it converts {card.refs_pickle(data_root).name})"
    if not path.is_file():
        raise DataError(f"{card.name}: {path} not found; {prepare}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        ok = (document.get("format") == REFS_FORMAT and document.get("dataset") == card.dataset
              and document.get("split_by") == card.split_by and isinstance(document.get("refs"), list))
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DataError(f"{card.name}: {path} is not a refs file converted for {card.dataset} "
                        f"(split_by {card.split_by}) by this version; {prepare}")
    return document["refs"]


def _refs_of_split(refs: list[dict[str, Any]], index: InstancesIndex, card: ReferringCard,
                   data_root: Path) -> list[ReferringRef]:
    images_dir = card.images_in(data_root)
    out: list[ReferringRef] = []
    for ref in refs:
        ann_image, _ = index.annotation(ref["ann_id"])
        if ann_image != ref["image_id"]:
            raise DataError(f"{index.source}: annotation {ref['ann_id']} belongs to image {ann_image}, but ref "
                            f"{ref['ref_id']} names image {ref['image_id']}; the refs and instances.json do not match")
        path = images_dir / index.image(ref["image_id"]).file_name
        out += [ReferringRef(f"{ref['ref_id']}_{s['sent_id']}", ref["ref_id"], s["sent_id"], ref["image_id"],
                             path, s["raw"], ref["ann_id"]) for s in ref["sentences"]]
    return out


def read_referring(card: ReferringCard, data_root: Path) -> tuple[list[ReferringRef], InstancesIndex]:
    """The samples of ``card``'s split in reference order, and the instances index for their GT.

    Reads only the converted ``refs(<split_by>).json`` (DataError telling to run ``ovseg-bench
    data prepare <dataset>`` when missing) and ``instances.json`` once. Order: refs in the
    pickle's order, filtered by :func:`in_split`; each ref's sentences in order (module docstring).
    """
    refs = [r for r in _read_refs_json(card, data_root) if in_split(r["split"], card.split)]
    index = InstancesIndex.load(card.instances_path(data_root), image_ids={r["image_id"] for r in refs},
                                ann_ids={r["ann_id"] for r in refs})
    samples = _refs_of_split(refs, index, card, data_root)
    seen: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen:
            raise DataError(f"{card.refs_json(data_root)}: sample id {sample.sample_id} occurs twice in {card.name}")
        seen.add(sample.sample_id)
    return samples, index


def list_referring(card: ReferringCard, data_root: Path) -> list[ReferringRef]:
    """One :class:`ReferringRef` per sentence of ``card``'s split, in reference order."""
    return read_referring(card, data_root)[0]


def missing_images(refs: Sequence[ReferringRef]) -> list[Path]:
    """Image files the samples name that do not exist: each once, in listing order."""
    checked: dict[Path, bool] = {}
    for ref in refs:
        if ref.image_path not in checked:
            checked[ref.image_path] = ref.image_path.is_file()
    return [path for path, present in checked.items() if not present]


def check_images(card: ReferringCard, data_root: Path, *, show: int = 5) -> int:
    """Verify every image of ``card``'s split exists; return how many distinct images it has.

    Raises DataError naming the first ``show`` missing files and where COCO train2014 belongs.
    """
    refs = list_referring(card, data_root)
    gone = missing_images(refs)
    total = len({r.image_path for r in refs})
    if gone:
        first = ", ".join(p.name for p in gone[:show]) + (", ..." if len(gone) > show else "")
        raise DataError(f"{card.name}: {len(gone)} of {total} images missing in {card.images_in(data_root)} "
                        f"(first: {first}); the COCO train2014 images go there: extract train2014.zip into "
                        f"{card.images_in(data_root).parent}, as the refer toolkit and LAVT lay them out")
    return total


# --------------------------------------------------------------------------- reader


@dataclasses.dataclass
class ReferringSample:
    """One decoded referring sample, as a DataLoader worker returns it."""

    index: int                  # position in the listing
    ref: ReferringRef
    image: np.ndarray | None    # [H, W, 3] uint8 RGB at the original size
    gt: np.ndarray | None       # [H, W] bool, same size as the image
    error: str | None = None
    skippable: bool = False     # an unreadable image: --on-error skip may drop it

    @property
    def image_id(self) -> str:
        """The item id the runner records for this sample (the sample id, not COCO's image id)."""
        return self.ref.sample_id


def _decode_rgb(path: Path, apply_exif: bool) -> np.ndarray | None:
    """HxWx3 uint8 RGB via the harness's cv2 decoder; None when undecodable."""
    if apply_exif:
        bgr = decode_image(path)
    else:  # the references decode with PIL, which ignores EXIF orientation
        data = np.fromfile(str(path), dtype=np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    return None if bgr is None else np.ascontiguousarray(bgr[:, :, ::-1])


class ReferringDataset(Dataset):
    """The referring track's reader over a listing: decode and rasterise in DataLoader workers.

    Problems are returned in ``ReferringSample.error`` rather than raised in a worker (as
    :mod:`ovseg_bench.datasets.loader` does): a missing or undecodable image (skippable), an
    image whose size differs from ``instances.json``'s, or a malformed annotation.

    ``apply_exif``: decode as the harness does (cv2, EXIF orientation applied), the default; the
    references decode with PIL without applying EXIF, and COCO's polygons are drawn on the stored
    pixels, so ``False`` reproduces them on images carrying an orientation tag.
    """

    def __init__(self, card: ReferringCard, refs: Sequence[ReferringRef], index: InstancesIndex, *,
                 apply_exif: bool = True):
        self.card, self.refs, self.index, self.apply_exif = card, list(refs), index, apply_exif

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> ReferringSample:
        ref = self.refs[index]
        rgb = _decode_rgb(ref.image_path, self.apply_exif) if ref.image_path.is_file() else None
        if rgb is None:
            state = "is not a decodable image" if ref.image_path.is_file() else "is missing"
            return ReferringSample(index, ref, None, None, f"{ref.image_path}: image {state}", skippable=True)
        info = self.index.image(ref.image_id)
        if rgb.shape[:2] != (info.height, info.width):
            return ReferringSample(index, ref, None, None, (
                f"{ref.image_path}: image is {rgb.shape[1]}x{rgb.shape[0]} (width x height, EXIF "
                f"{'applied' if self.apply_exif else 'ignored'}) but {self.index.source.name} says "
                f"{info.width}x{info.height}; its GT would not fit (GT size mismatch)"))
        try:
            gt = gt_mask(self.index, ref.ann_id, info.height, info.width, self.card.gt_rule)
        except DataError as exc:
            return ReferringSample(index, ref, None, None, str(exc))
        return ReferringSample(index, ref, rgb, gt)
