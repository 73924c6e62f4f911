"""Data of the label-conditioned track: cards, listing, image-level labels, COCO 2014 GT, Dataset.

The track scores class activation maps (CAMs) and pseudo masks that a weakly-supervised
method computes *given the image-level labels* of training images (WeakTr, SemPLeS, CLIP-ES).
Its cards are :class:`LabelConditionedCard`; they differ from the semantic cards in where the
labels come from and in having no resize protocol (CAMs are made at the image's own size).

What the references do, and where (each settled by reading the code at the commit given):

- Lists. VOC2012 ``train`` (1,464 ids) and ``train_aug`` (10,582 ids, sorted) are the same
  bytes in hustvl/WeakTr@3457ad3d052a2f65320671cd9fc801b5c9dcb5c6:voc12/{train_id,train_aug_id}.txt,
  linyq2117/CLIP-ES@3893f817be359c5ee1dbf8111cad381a532c7acc:voc12/{train,train_aug}.txt and
  SemPLeS (kuongan/SemPLeS@378af5b2ea4e160d2f1b9c202059a009dd2c392e:voc12/). COCO 2014 uses the
  82,081 train / 40,137 val images of CLIP-ES:coco14/{train,val}.txt (sorted by file name; each
  line is the file stem followed by 0-based 80-class labels); WeakTr:coco/{train,val}_id.txt hold
  the same images as 12-digit ids in another order.
- GT. Both score VOC train and train_aug against ``SegmentationClassAug``
  (WeakTr:evaluation.py ``__main__`` sets ``gt_dir`` for any "voc12" list; CLIP-ES:README.md
  ``--gt_root .../SegmentationClassAug``), read with ``np.array(Image.open(...))``.
- Image labels. WeakTr and SemPLeS read ``voc12/cls_labels.npy`` (a pickled dict: image id ->
  20-dim multi-hot, for the 12,031 ids of train_aug + val; datasets.py
  ``load_image_label_list_from_npy``); its provenance is not in the repository. CLIP-ES reads the
  VOC ``Annotations`` XML: every ``<object>``'s own ``<name>``, ``difficult`` and ``truncated``
  ones included, deduplicated in first-appearance order (generate_cams_voc12.py ``perform``;
  utils.py ``parse_xml_to_dict``), and COCO labels from its list's label columns
  (generate_cams_coco14.py). This module derives labels from the VOC XML as CLIP-ES does, or
  from the GT itself.
- COCO semantic GT from the instances JSON: SemPLeS:data/parse_coco.py (``COCOSegmentation``
  ``_gen_seg_mask``) writes WeakTr's ``voc_format/class_labels`` layout; the rule is restated at
  :func:`coco_semantic_mask`. CLIP-ES's 81-class PNGs are a download whose converter is not in
  its repository.
"""
from __future__ import annotations

import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..atomic import atomic_path, atomic_write
from ..imaging import decode_image, decode_label
from ..errors import ConfigError, DataError
from ..resources import cards_dir
from ..yamlconf import load_dataclass
from .cards import _read_lines
from .listing import data_root_hint, read_split_file

TRACK = "label-conditioned"
LABEL_SOURCES = ("gt", "xml")   # where image-level labels may come from
_NAME = re.compile(r"[a-z][a-z0-9_]*")

# The 80 COCO category ids that instances_{train,val}2014.json use, ascending: 1..90 without the
# ten ids the COCO paper lists but never annotated (WeakTr:evaluation.py ``categories_coco``
# names all 91 labels, its ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 being those unused ones).
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_THING_IDS = tuple(i for i in range(1, 91) if i not in COCO_UNUSED_IDS)
COCO_SPACES = ("81", "91")      # contiguous background + 80 things / raw category ids (WeakTr, SemPLeS)
COCO_IGNORE = 255               # SemPLeS:data/parse_coco.py ``IGNORE_INDEX``


@dataclasses.dataclass(frozen=True)
class LabelConditionedCard:
    """A split of the label-conditioned track (one YAML file in ``datasets/``).

    Paths: ``root`` is relative to the data root; ``img_dir``, ``ann_dir``, ``xml_dir`` and
    ``split_file`` are relative to ``root``. ``classnames`` maps a naming scheme to a class-name
    file relative to the cards folder; ``mmseg`` (the canonical names) is required. Label ids are
    the GT's values: 0 = background when ``background_class``, ``ignore_index`` unscored.
    ``labels_from`` lists the allowed sources of the image-level labels, the card's default first.
    """

    name: str
    title: str
    track: str
    split: str
    root: str
    img_dir: str
    ann_dir: str
    img_suffix: str
    gt_suffix: str
    split_file: str
    num_images: int
    classnames: dict[str, str]
    labels_from: tuple[str, ...]
    background_class: bool = True
    ignore_index: int = 255
    xml_dir: str | None = None
    card_version: int = 1
    notes: str = ""

    def __post_init__(self) -> None:
        where = f"label-conditioned card '{self.name}'"
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"{where}: the name must be lowercase snake_case (letters, digits, _)")
        if self.track != TRACK:
            raise ConfigError(f"{where}: track is '{self.track}'; this card type is for '{TRACK}' only")
        if self.num_images < 1 or not 0 <= self.ignore_index <= 255 or self.card_version < 1:
            raise ConfigError(f"{where}: num_images and card_version must be >= 1 and ignore_index in 0..255")
        if "mmseg" not in self.classnames:
            raise ConfigError(f"{where}: classnames needs the canonical 'mmseg' list; it has {sorted(self.classnames)}")
        _check_label_sources(self, where)

    def root_in(self, data_root: Path) -> Path:
        """The split's root folder under ``data_root``."""
        return Path(data_root) / self.root

    def classnames_file(self, scheme: str = "mmseg") -> Path:
        if scheme not in self.classnames:
            raise ConfigError(f"dataset '{self.name}' has no class-name list for naming scheme '{scheme}'; "
                              f"it has {sorted(self.classnames)}")
        return cards_dir() / self.classnames[scheme]

    def class_names(self) -> tuple[str, ...]:
        """Canonical names in label order (label k = line k): the keys of per-class results."""
        return tuple(_read_lines(self.classnames_file("mmseg")))

    @property
    def num_classes(self) -> int:
        return len(self.class_names())


def _check_label_sources(card: LabelConditionedCard, where: str) -> None:
    sources = card.labels_from
    if not sources or len(set(sources)) != len(sources) or not set(sources) <= set(LABEL_SOURCES):
        raise ConfigError(f"{where}: labels_from must list distinct sources from {LABEL_SOURCES}, got {list(sources)}")
    if "xml" in sources and not card.xml_dir:
        raise ConfigError(f"{where}: labels_from includes 'xml' but the card has no xml_dir")


def load_label_conditioned_card(name: str) -> LabelConditionedCard:
    """The shipped card ``datasets/<name>.yaml`` as a :class:`LabelConditionedCard`.

    Raises ConfigError naming the file when it is missing, malformed or of another track.
    """
    return _load_card(name.strip().lower())


@lru_cache(maxsize=None)
def _load_card(name: str) -> LabelConditionedCard:
    path = cards_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no dataset card {path}")
    card = load_dataclass(LabelConditionedCard, path)
    if card.name != name:
        raise ConfigError(f"{path}: card name '{card.name}' differs from its file name '{name}'")
    return card


# ----------------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class LabelledRef:
    """One image of a split: where its image, GT and (for VOC) annotation XML should be."""

    image_id: str
    image_path: Path
    gt_path: Path
    xml_path: Path | None


def list_label_conditioned(card: LabelConditionedCard, data_root: Path) -> list[LabelledRef]:
    """Every image of ``card``'s split, in split-file order.

    The id is a line's first whitespace-separated field, so CLIP-ES's COCO lists (id followed by
    label columns) work as split files; its eval_cam.py keeps that field too. Raises DataError
    naming the first missing piece of the layout. GT and XML files are checked at read time.
    """
    root = _require_layout(card, Path(data_root))
    ids = [line.split()[0] for line in read_split_file(root / card.split_file)]
    img_dir, ann_dir = root / card.img_dir, root / card.ann_dir
    xml_dir = root / card.xml_dir if card.xml_dir else None
    return [LabelledRef(i, img_dir / f"{i}{card.img_suffix}", ann_dir / f"{i}{card.gt_suffix}",
                        xml_dir / f"{i}.xml" if xml_dir else None) for i in ids]


def _require_layout(card: LabelConditionedCard, data_root: Path) -> Path:
    root = card.root_in(data_root)
    pieces = [("data root", data_root, Path.is_dir), ("dataset folder", root, Path.is_dir),
              ("image folder", root / card.img_dir, Path.is_dir), ("split file", root / card.split_file, Path.is_file)]
    for what, path, exists in pieces:
        if not exists(path):
            raise DataError(
                f"{card.name}: {what} {path} not found; {data_root_hint(data_root)}. '{card.name}' expects "
                f"images {card.root}/{card.img_dir}/<id>{card.img_suffix}, GT {card.root}/{card.ann_dir}/<id>"
                f"{card.gt_suffix} and the list {card.root}/{card.split_file} (see {cards_dir() / card.name}.yaml; "
                f"`ovseg-bench data prepare {card.name}` writes what can be derived)")
    return root


# ----------------------------------------------------------------------------- image labels


def image_labels(gt: np.ndarray, num_classes: int, *, background_class: bool = True,
                 ignore_index: int = 255) -> tuple[int, ...]:
    """The classes present in a GT label map, ascending.

    Args:
        gt: [H, W] integer label map as on disk (values 0..num_classes-1 and ``ignore_index``).
        num_classes: N, background included when ``background_class``.

    Returns:
        Label ids as the GT holds them, without ``ignore_index`` and (when ``background_class``)
        without 0. Raises DataError for a value outside 0..N-1 that is not ``ignore_index``.
    """
    values = np.unique(np.asarray(gt))
    values = values[values != ignore_index]
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(f"GT values {bad[:10].tolist()} are outside 0..{num_classes - 1} (and {ignore_index} = ignore)")
    if background_class:
        values = values[values != 0]
    return tuple(int(v) for v in values)


def xml_labels(xml_path: Path, class_names: Sequence[str]) -> tuple[int, ...]:
    """Image-level labels from a VOC ``Annotations`` XML file, as CLIP-ES reads them.

    Every ``<annotation><object>``'s own ``<name>`` counts, ``difficult`` and ``truncated``
    objects included (``<part>`` names inside an object do not); each class once, in order of
    first appearance, which is the order of CLIP-ES's CAM keys
    (CLIP-ES@3893f81:generate_cams_voc12.py ``perform``). The label is the name's index in
    ``class_names`` (with background first, VOC's "aeroplane" is 1). Raises DataError naming the
    file when it is unreadable or names a class not in ``class_names``.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DataError(f"{xml_path}: cannot read the annotation XML ({exc})") from None
    labels: list[int] = []
    for obj in root.findall("object"):
        name = obj.findtext("name")
        if name not in class_names:
            raise DataError(f"{xml_path}: object name {name!r} is not one of the dataset's classes "
                            f"{list(class_names)}")
        if class_names.index(name) not in labels:
            labels.append(class_names.index(name))
    return tuple(labels)


# ------------------------------------------------------------------------- COCO 2014 GT


@dataclasses.dataclass(frozen=True)
class CocoRenderReport:
    """What :func:`render_coco2014_gt` did: images in the JSON, PNGs written, PNGs already there."""

    images: int
    written: int
    skipped: int


def read_instances(instances_json: Path) -> dict[str, Any]:
    """A COCO instances JSON (``images``, ``annotations``, ``categories``); DataError naming the file."""
    try:
        data = json.loads(Path(instances_json).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{instances_json}: cannot read the COCO instances JSON ({exc}); it is "
                        "annotations/instances_<split>2014.json from annotations_trainval2014.zip") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in keys):
        raise DataError(f"{instances_json}: not a COCO instances file (needs the lists {list(keys)})")
    return data


def coco_category_lut(categories: Sequence[Mapping[str, Any]], space: str = "81") -> dict[int, int]:
    """COCO category id -> GT value.

    ``"91"``: the id itself, for every category the JSON lists (SemPLeS:data/parse_coco.py
    ``CAT_LIST = [0] + getCatIds()``: labels 0..90, WeakTr's ``--num_classes 91``).
    ``"81"``: 1 + the id's rank among the 80 COCO 2014 thing ids (label order of
    ``classnames/mmseg/coco_object81.txt``, which is WeakTr's ``categories_coco`` without its ten
    unused ids); the JSON must list exactly those 80. Ids missing from the table become 255.
    Both spaces give the same per-class counts, so the same mIoU under mmseg's rule (classes with
    no union are left out of the mean).
    """
    ids = sorted(int(c["id"]) for c in categories)
    if space == "91":
        if any(not 1 <= i < COCO_IGNORE for i in ids):
            raise DataError(f"COCO category ids must lie in 1..254 for the 91-id space, got {ids[:5]}...")
        return {i: i for i in ids}
    if space != "81":
        raise ConfigError(f"COCO label space '{space}' is not one of {COCO_SPACES}")
    if tuple(ids) != COCO_THING_IDS:
        raise DataError(f"the JSON lists categories {ids[:8]}... but the 81-class space needs exactly the 80 "
                        "COCO 2014 thing ids; is this a COCO 2014 instances file?")
    return {cat: rank + 1 for rank, cat in enumerate(COCO_THING_IDS)}


def instance_mask(annotation: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """[H, W] bool mask of one COCO annotation, rasterised by pycocotools as SemPLeS does.

    Polygons go through ``frPyObjects`` + ``decode`` and are united (SemPLeS sums the [H, W, P]
    stack and keeps > 0). Polygons with fewer than 6 coordinates are dropped first: pycocotools
    rasterises them to no pixel when another polygon comes first, and refuses the list when one
    comes first (``frPyObjects`` takes a 4-number list for a box), so dropping them is the same
    wherever the reference runs. Uncompressed RLE (crowd regions) goes through ``frPyObjects``;
    compressed RLE (string counts), which SemPLeS's call would refuse, is decoded directly.
    """
    from pycocotools import mask as coco_mask  # only ``data prepare`` needs pycocotools

    seg = annotation.get("segmentation")
    try:
        if isinstance(seg, list):
            polygons = [p for p in seg if len(p) >= 6]
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            return coco_mask.decode(coco_mask.frPyObjects(polygons, height, width)).any(axis=2)
        if isinstance(seg, dict) and list(seg.get("size", [])) == [height, width]:
            counts = seg["counts"]
            rle = coco_mask.frPyObjects(seg, height, width) if isinstance(counts, list) else \
                {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            return coco_mask.decode(rle).astype(bool)
    except Exception as exc:  # pycocotools raises bare Exception / TypeError / ValueError
        raise DataError(f"COCO annotation {annotation.get('id')}: cannot rasterise its segmentation ({exc})") from None
    raise DataError(f"COCO annotation {annotation.get('id')}: segmentation is neither polygons nor an RLE of the "
                    f"image's size {height}x{width}")


def coco_semantic_mask(annotations: Sequence[Mapping[str, Any]], height: int, width: int,
                       lut: Mapping[int, int]) -> np.ndarray:
    """[H, W] uint8 semantic GT of one image from its annotations, SemPLeS's rule
    (SemPLeS@378af5b:data/parse_coco.py ``_gen_seg_mask``):

    - start from 0 (background) and take the annotations in the JSON's order for the image
      (``coco.getAnnIds(imgIds=id)`` keeps the ``annotations`` list order);
    - each instance paints only pixels that are still 0, so the **first** instance wins where
      instances overlap;
    - crowd annotations (``iscrowd`` 1, RLE) are painted like any other, with their category;
    - the value is ``lut[category_id]``, or 255 (ignore) for a category not in the table.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    for annotation in annotations:
        if not isinstance(annotation.get("category_id"), int):
            raise DataError(f"COCO annotation {annotation.get('id')}: no integer category_id")
        value = lut.get(annotation["category_id"], COCO_IGNORE)
        paint = instance_mask(annotation, height, width) & (mask == 0)
        mask[paint] = value
    return mask


def _annotations_by_image(annotations: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    """image id -> its annotations in JSON order (pycocotools' ``imgToAnns``)."""
    grouped: dict[int, list[Mapping[str, Any]]] = {}
    for annotation in annotations:
        grouped.setdefault(int(annotation["image_id"]), []).append(annotation)
    return grouped


def render_coco2014_gt(instances_json: Path | Mapping[str, Any], out_dir: Path, *, space: str = "81",
                       progress: Callable[[int, int], None] | None = None) -> CocoRenderReport:
    """Write ``out_dir/<file stem>.png`` (8-bit L, see :func:`coco_semantic_mask`) for every
    image of a COCO 2014 instances file; ``data prepare coco2014`` calls it.

    Args:
        instances_json: the JSON's path, or its contents from :func:`read_instances`.
        out_dir: the card's GT folder (``SegmentationClass``); names keep the file stem
            (``COCO_train2014_000000000009.png``) as CLIP-ES's GT does.
        space: ``"81"`` (the cards' classes) or ``"91"`` (raw ids, WeakTr's GT).
        progress: called with (done, total) after each image.

    Resumable and idempotent: an existing PNG is kept (it is not checked against ``space``);
    each file appears whole (atomic rename), so an interrupted run is continued by rerunning.
    """
    data = read_instances(instances_json) if isinstance(instances_json, (str, Path)) else instances_json
    lut = coco_category_lut(data["categories"], space)
    by_image = _annotations_by_image(data["annotations"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for done, image in enumerate(data["images"], 1):
        target = out_dir / f"{Path(image['file_name']).stem}.png"
        if target.is_file():
            skipped += 1
        else:
            mask = coco_semantic_mask(by_image.get(int(image["id"]), []), int(image["height"]), int(image["width"]), lut)
            with atomic_path(target) as tmp:
                Image.fromarray(mask).save(tmp, format="PNG")  # the temporary name has no .png suffix
            written += 1
        if progress is not None:
            progress(done, len(data["images"]))
    return CocoRenderReport(len(data["images"]), written, skipped)


def write_coco2014_split(instances_json: Path | Mapping[str, Any], out_file: Path) -> int:
    """Write the split list: file stems of the images with at least one annotation, sorted.

    The references' lists (CLIP-ES:coco14/{train,val}.txt, 82,081 / 40,137 images) leave out
    the images without annotations and are sorted by file name; that "at least one annotation,
    crowd included" is their rule is assumed, not read in their code (the cards' num_images and
    ``data check`` catch a different count). Returns the number of ids written (atomic write).
    """
    data = read_instances(instances_json) if isinstance(instances_json, (str, Path)) else instances_json
    annotated = {int(a["image_id"]) for a in data["annotations"]}
    stems = sorted(Path(i["file_name"]).stem for i in data["images"] if int(i["id"]) in annotated)
    atomic_write(Path(out_file), "".join(f"{s}\n" for s in stems))
    return len(stems)


# ---------------------------------------------------------------------------------- Dataset


@dataclasses.dataclass
class LabelledSample:
    """One decoded image of the label-conditioned track (what a DataLoader worker returns)."""

    index: int
    image_id: str
    image_path: Path                 # for methods that decode with PIL themselves (WeakTr, CLIP-ES do)
    image: np.ndarray | None         # [H, W, 3] uint8 RGB, decoded by cv2 (EXIF applied) as the harness does
    gt: np.ndarray | None            # [H, W] uint8 label map, values 0..N-1 and ignore_index
    labels: tuple[int, ...] = ()     # image-level labels (label ids; GT order ascending, XML first appearance)
    error: str | None = None
    skippable: bool = False          # an unreadable image: --on-error skip may drop it


class LabelConditionedDataset(Dataset):
    """Images, GT and image-level labels of a label-conditioned split, at the image's own size.

    Problems come back as data (``LabelledSample.error`` naming the file) rather than being
    raised in a worker, as in :mod:`ovseg_bench.datasets.loader`. ``labels_from`` must be one of
    the card's ``labels_from`` (default: the card's first).
    """

    def __init__(self, card: LabelConditionedCard, refs: Sequence[LabelledRef], *, labels_from: str | None = None):
        source = labels_from or card.labels_from[0]
        if source not in card.labels_from:
            raise ConfigError(f"dataset '{card.name}' takes image labels from {list(card.labels_from)}, not '{source}'")
        self.card, self.refs, self.labels_from = card, list(refs), source
        self.class_names = card.class_names()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> LabelledSample:
        ref = self.refs[index]
        bgr = decode_image(ref.image_path) if ref.image_path.is_file() else None
        if bgr is None:
            state = "is not a decodable image" if ref.image_path.is_file() else "is missing"
            return LabelledSample(index, ref.image_id, ref.image_path, None, None,
                                  error=f"{ref.image_path}: image {state}", skippable=True)
        try:
            gt = self._read_gt(ref.gt_path, bgr.shape[:2])
            labels = self._labels(ref, gt)
        except DataError as exc:
            return LabelledSample(index, ref.image_id, ref.image_path, None, None, error=str(exc))
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        return LabelledSample(index, ref.image_id, ref.image_path, rgb, gt, labels)

    def _read_gt(self, path: Path, image_shape: tuple[int, int]) -> np.ndarray:
        if not path.is_file():
            raise DataError(f"{path}: ground truth missing for image of the same name; check the data layout")
        try:
            gt = decode_label(path)
        except OSError as exc:
            raise DataError(f"{path}: ground truth is not a readable PNG ({exc})") from None
        if gt.ndim != 2 or gt.dtype != np.uint8:
            raise DataError(f"{path}: ground truth has shape {gt.shape} and dtype {gt.dtype}; expected an 8-bit "
                            "single-channel label map")
        if gt.shape != tuple(image_shape):
            raise DataError(f"{path}: ground truth is {gt.shape[1]}x{gt.shape[0]} but its image is "
                            f"{image_shape[1]}x{image_shape[0]} (width x height, after EXIF orientation)")
        try:
            image_labels(gt, self.card.num_classes, background_class=False, ignore_index=self.card.ignore_index)
        except DataError as exc:
            raise DataError(f"{path}: {exc} for dataset '{self.card.name}'") from None
        return gt

    def _labels(self, ref: LabelledRef, gt: np.ndarray) -> tuple[int, ...]:
        if self.labels_from == "xml":
            if ref.xml_path is None:
                raise DataError(f"dataset '{self.card.name}' has no annotation XML folder")
            return xml_labels(ref.xml_path, self.class_names)
        return image_labels(gt, self.card.num_classes, background_class=self.card.background_class,
                            ignore_index=self.card.ignore_index)
