"""Mask proposals: a recorded file of per-image candidate masks, and Segment Anything to make one.

GLCF (Yu, Seo, Son, "Zero-shot Referring Image Segmentation with Global-Local Context
Features", CVPR 2023; Seonghoon-Yu/Zero-shot-RIS@75ff6ed85e1c99e4ae01be5d7f15e78e690823c0:
Our_method_with_free_solo.py) scores every mask proposal of an image (FreeSOLO's ``pred_masks``)
against each referring expression and keeps the argmax. The proposals are an input of the method,
not weights: they come from a file, so any generator (FreeSOLO exported, SAM computed here) plugs
in, and the file's sha256, source and settings are recorded in the results.

File format (one JSON object; COCO compressed RLE, as pycocotools encodes it)::

    {"format": "ovseg-bench/proposals/1",          # optional; other values are refused
     "source": "sam",                               # what made the proposals
     "params": {...},                               # its settings (a mapping, may be empty)
     "images": {"391895": [{"rle": {"size": [h, w], "counts": "..."}, "score": 0.97}, ...], ...},
     ...}                                           # any other top-level keys: kept and recorded

- Image ids are text: the refer datasets' COCO image id in decimal (``"391895"``), a semantic
  card's split-file entry.
- Each image's list keeps the source's own order, never re-sorted: GLCF's ``torch.argmax`` takes
  the first of equal scores, so the order decides ties. An empty list is valid (zero proposals;
  GLCF then skips that image's expressions, ``if len(pred_masks) == 0: continue``). An image
  absent from ``images`` is an error: the file must cover every image of the split.
- ``size`` is the decoded image's [height, width]; ``counts`` is the RLE string (pycocotools'
  ``encode`` gives bytes: stored decoded as ASCII). Entries may carry other keys (ignored).

The schema is checked when the file is opened (without decoding masks); sizes and RLE runs
when an image's masks are decoded. pycocotools does not refuse a counts string whose runs fall
short of h * w (the rest of its output buffer is left uninitialised), so the runs are summed
here first.

Segment Anything (Kirillov et al., ICCV 2023; facebookresearch/segment-anything, PyPI
``segment-anything`` 1.0) is the optional ``sam`` extra, imported only when proposals are made.
Its automatic mask generator runs with the settings of ``configs/proposals/sam.yaml`` (SAM's own
``SamAutomaticMaskGenerator.__init__`` defaults) and ``output_mode="coco_rle"``; the score kept
is SAM's ``predicted_iou``, the list SAM's output order. The network is built from the package's
modules with ``build_sam.py``'s arguments and loaded with :func:`~.checkpoints.load_strict`
(SAM's own builder loads with an unchecked ``torch.load``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from pycocotools import mask as coco_mask

from ..atomic import atomic_write, sha256_file
from ..errors import ConfigError, DataError, WeightsError
from ..registry import unknown_name_message
from ..resources import configs_dir
from ..yamlconf import load_dataclass
from .checkpoints import fetch_checkpoint, load_strict, read_checkpoint

PROPOSALS_FORMAT = "ovseg-bench/proposals/1"
_KNOWN_KEYS = ("format", "source", "params", "images")
_MAKE = "make it with `ovseg-bench proposals` or ovseg_bench.methods.proposals.write_proposals"
_SAM_MISSING = ("SAM mask proposals need the 'sam' extra: pip install 'ovseg-bench[sam]' "
                "(segment-anything, Meta's Segment Anything package)")


# ----------------------------------------------------------------------------- RLE
def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool [H, W] mask: ``{"size": [H, W], "counts": str}``.

    pycocotools runs over the pixels in column-major order, so the mask goes in Fortran order.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.bool_:
        raise DataError(f"encode_mask takes a bool [H, W] array, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_runs_total(counts: str) -> int | None:
    """Sum of the runs a COCO RLE counts string encodes; None when it is not one.

    The string format of pycocotools' ``rleToString``: each count is a little-endian group of
    6-bit characters (``chr(v + 48)``; bit 0x20 continues the group, bit 0x10 of the last one
    is the sign), and counts from the third on are stored as the difference to the count two
    places before. Negative runs make it invalid too.
    """
    if not counts.isascii():
        return None
    raw = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if raw.size == 0 or raw.min() < 0 or raw.max() > 63 or raw[-1] & 0x20:
        return None
    last = (raw & 0x20) == 0                       # each group ends at a character without 0x20
    group = np.concatenate(([0], np.cumsum(last)[:-1]))
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    shift = 5 * (np.arange(raw.size) - starts[group])
    if shift.max() > 55:
        return None
    values = np.zeros(int(group[-1]) + 1, dtype=np.int64)
    np.add.at(values, group, (raw & 0x1F) << shift)
    negative = (raw[last] & 0x10) != 0
    values[negative] -= np.left_shift(1, shift[last][negative] + 5)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])            # run j = stored j + run j - 2, for j >= 3:
    runs[2::2] = np.cumsum(values[2::2])            # two chains, from index 1 and from index 2
    return None if (runs < 0).any() else int(runs.sum())


def _decode(rles: list[dict[str, Any]], shape: tuple[int, int]) -> torch.Tensor:
    """bool [N, H, W] from RLEs already checked to be of ``shape``."""
    if not rles:
        return torch.zeros((0, *shape), dtype=torch.bool)
    coded = [{"size": list(shape), "counts": r["counts"].encode("ascii")} for r in rles]
    stacked = coco_mask.decode(coded)                # [H, W, N] uint8
    return torch.from_numpy(np.ascontiguousarray(stacked.transpose(2, 0, 1))).bool()


# ----------------------------------------------------------------------------- schema
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one proposal entry (without decoding it), or None."""
    if not isinstance(entry, dict):
        return f"must be a mapping with 'rle' and 'score', found {type(entry).__name__}"
    shape = '{"rle": {"size": [h, w], "counts": str}, "score": float}'
    for key in ("rle", "score"):
        if key not in entry:
            return f"has no '{key}' (each proposal is {shape})"
    rle = entry["rle"]
    if not isinstance(rle, dict):
        return f"has an 'rle' that is not a mapping (each proposal is {shape}), found {type(rle).__name__}"
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               and v > 0 for v in size)):
        return f"has an RLE whose size is not [height, width] (two whole numbers > 0): {size!r}"
    if not isinstance(rle.get("counts"), str):
        return (f"has an RLE whose counts is not a string (COCO compressed RLE), found "
                f"{type(rle.get('counts')).__name__}")
    score = entry["score"]
    if not _number(score) or not math.isfinite(score):
        return f"has a score that is not a finite number: {score!r}"
    return None


def _check_document(data: Any, where: str) -> None:
    """Refuse a loaded document that is not the proposals format (module docstring), one line each."""
    fix = f"expected the proposals format of ovseg_bench/methods/proposals.py; {_MAKE}"
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object with 'source', 'params' and 'images', found "
                        f"{type(data).__name__}; {fix}")
    if "format" in data and data["format"] != PROPOSALS_FORMAT:
        raise DataError(f"{where}: format {data['format']!r} is not {PROPOSALS_FORMAT!r}, the one this version "
                        f"reads; {_MAKE}")
    if not isinstance(data.get("source"), str) or not data["source"]:
        found = "nothing" if "source" not in data else repr(data["source"])
        raise DataError(f"{where}: 'source' must be a text naming what made the proposals (e.g. \"sam\"), found "
                        f"{found}; {fix}")
    if not isinstance(data.get("params", None), dict):
        raise DataError(f"{where}: 'params' must be a mapping of the source's settings (may be empty), found "
                        f"{'nothing' if 'params' not in data else type(data['params']).__name__}; {fix}")
    images = data.get("images")
    if not isinstance(images, dict):
        raise DataError(f"{where}: 'images' must map image ids to lists of proposals, found "
                        f"{'nothing' if 'images' not in data else type(images).__name__}; {fix}")
    for image_id, entries in images.items():
        if not isinstance(entries, list):
            raise DataError(f"{where}: images['{image_id}'] must be a list of proposals (empty for none), found "
                            f"{type(entries).__name__}; {fix}")
        for k, entry in enumerate(entries):
            problem = _entry_problem(entry)
            if problem is not None:
                raise DataError(f"{where}: images['{image_id}'][{k}] {problem}; {fix}")


# ----------------------------------------------------------------------------- reading
class ProposalFile:
    """A proposals file, read once and checked (module docstring for the format).

    Raises DataError on opening for a missing file, a file that is not JSON, or any entry that
    does not follow the schema; :meth:`masks` raises DataError for an absent image, an RLE of
    another size than the image, or an RLE that does not decode.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{self.path}: proposal file not found; {_MAKE}") from None
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read the proposal file ({exc.strerror or exc})") from None
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            data = json.loads(raw)
        except UnicodeDecodeError:
            raise DataError(f"{self.path}: not a JSON proposal file (not UTF-8 text); {_MAKE}") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.path}: not a JSON proposal file ({exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}); {_MAKE}") from None
        _check_document(data, str(self.path))
        self.source: str = data["source"]
        self.params: dict[str, Any] = data["params"]
        self.extra: dict[str, Any] = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
        self._images: dict[str, list[dict[str, Any]]] = data["images"]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._images

    def __len__(self) -> int:
        return len(self._images)

    def image_ids(self) -> list[str]:
        """Every image id of the file, in file order."""
        return list(self._images)

    def num_proposals(self) -> int:
        return sum(len(entries) for entries in self._images.values())

    def record(self) -> dict[str, Any]:
        """What a result file records of these proposals: path, sha256, source, params, extra keys, counts."""
        return {"path": str(self.path), "sha256": self.sha256, "source": self.source, "params": self.params,
                "extra": self.extra, "num_images": len(self._images), "num_proposals": self.num_proposals()}

    def missing(self, image_ids: list[str]) -> list[str]:
        """The ids of ``image_ids`` the file has no entry for, in the given order."""
        return [i for i in image_ids if i not in self._images]

    def require(self, image_ids: list[str], *, dataset: str) -> None:
        """Refuse, before any image is scored, a file that does not cover every image of ``dataset``."""
        gone = self.missing([str(i) for i in image_ids])
        if gone:
            first = ", ".join(gone[:5]) + (", ..." if len(gone) > 5 else "")
            raise DataError(f"{self.path}: no proposals for {len(gone)} of {len(image_ids)} images of {dataset} "
                            f"(first: {first}); the file must cover every image of the split (an empty list means "
                            f"zero proposals); run `ovseg-bench proposals --dataset {dataset} --out {self.path}` "
                            "to add them")

    def entries(self, image_id: str) -> list[dict[str, Any]]:
        """The image's proposal entries as stored (checked, not decoded), in file order."""
        if image_id not in self._images:
            raise DataError(f"{self.path}: no proposals for image {image_id}; the file must cover every image of "
                            "the split (an empty list means zero proposals); make it again for this dataset")
        return self._images[image_id]

    def scores(self, image_id: str) -> list[float]:
        """The proposals' scores in file order."""
        return [float(entry["score"]) for entry in self.entries(image_id)]

    def masks(self, image_id: str, shape: tuple[int, int]) -> torch.Tensor:
        """bool [N, H, W] masks of ``image_id`` in file order, N = 0 for an empty list.

        ``shape`` is the decoded image's (H, W); every RLE must have that size.
        """
        entries = self.entries(image_id)
        shape = (int(shape[0]), int(shape[1]))
        rles = [entry["rle"] for entry in entries]
        for k, rle in enumerate(rles):
            where = f"{self.path}: images['{image_id}'][{k}]"
            if tuple(rle["size"]) != shape:
                raise DataError(f"{where} has RLE size {list(rle['size'])} but the image is {list(shape)} "
                                "(height, width); the proposals were made on other images; make them again on "
                                "this dataset's images")
            total = rle_runs_total(rle["counts"])
            if total != shape[0] * shape[1]:
                what = "is not a COCO RLE string" if total is None else f"covers {total} pixels"
                raise DataError(f"{where}: the RLE counts {what}, expected {shape[0]} x {shape[1]} = "
                                f"{shape[0] * shape[1]}; the file is damaged, make it again")
        try:
            return _decode(rles, shape)
        except Exception as exc:  # pycocotools raises ValueError/TypeError on input it cannot read
            raise DataError(f"{self.path}: image {image_id}: pycocotools cannot decode the RLEs ({exc}); the file "
                            "is damaged, make it again") from None


# ----------------------------------------------------------------------------- writing
def proposals_document(source: str, params: Mapping[str, Any], images: Mapping[str, list[dict[str, Any]]],
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object of a proposals file, checked as :class:`ProposalFile` checks it."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_KNOWN_KEYS))
    if clash:
        raise DataError(f"extra keys {clash} would replace the format's own keys; name them otherwise")
    document = {"format": PROPOSALS_FORMAT, "source": source, "params": dict(params), **extra,
                "images": {str(k): list(v) for k, v in images.items()}}
    _check_document(document, "proposals to write")
    return document


def write_proposals(path: Path, source: str, params: Mapping[str, Any],
                    images: Mapping[str, list[dict[str, Any]]], extra: Mapping[str, Any] | None = None) -> None:
    """Write a proposals file atomically (format in the module docstring; ``images`` in their order).

    ``extra``: more top-level keys (e.g. the checkpoint and the runs that made the file).
    Raises DataError for entries :class:`ProposalFile` would refuse.
    """
    document = proposals_document(source, params, images, extra)
    atomic_write(Path(path), json.dumps(document, ensure_ascii=False, separators=(",", ":"),
                                        allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- Segment Anything
@dataclasses.dataclass(frozen=True)
class SamArchitecture:
    """The shape of a SAM network: the arguments of segment_anything/build_sam.py's ``_build_sam``.

    ``url`` is the published checkpoint (None for a shape without one, e.g. a test network).
    """

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    url: str | None = None

    def shape(self) -> dict[str, Any]:
        """The fields that decide the network (everything but the url), for records."""
        fields = dataclasses.asdict(self)
        fields.pop("url")
        fields["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return fields


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# build_sam.py's build_sam_vit_{b,l,h}; URLs from the README's "Model Checkpoints"
# (facebookresearch/segment-anything@13ea663474599864dfa715c8b3832b6d5b43f755:README.md).
SAM_ARCHITECTURES = {
    "vit_b": SamArchitecture("vit_b", 768, 12, 12, (2, 5, 8, 11), url=_SAM_URL + "sam_vit_b_01ec64.pth"),
    "vit_l": SamArchitecture("vit_l", 1024, 24, 16, (5, 11, 17, 23), url=_SAM_URL + "sam_vit_l_0b3195.pth"),
    "vit_h": SamArchitecture("vit_h", 1280, 32, 16, (7, 15, 23, 31), url=_SAM_URL + "sam_vit_h_4b8939.pth"),
}


@dataclasses.dataclass(frozen=True)
class SamSettings:
    """``SamAutomaticMaskGenerator`` arguments (segment_anything 1.0, automatic_mask_generator.py).

    Defaults are SAM's own; ``point_grids`` is not offered (``points_per_side`` makes the grid) and
    ``output_mode`` is always ``coco_rle``.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """``configs/proposals/sam.yaml``: the default model type and the generator settings."""

    model_type: str = "vit_h"
    generator: SamSettings = SamSettings()


def load_sam_config(path: Path | None = None) -> SamConfig:
    """The SAM proposal config in ``path`` (default: the shipped ``configs/proposals/sam.yaml``)."""
    return load_dataclass(SamConfig, Path(path) if path else configs_dir() / "proposals" / "sam.yaml")


def _segment_anything() -> Any:
    """The ``segment_anything`` package, imported lazily: it is an optional extra."""
    try:
        import segment_anything  # its __init__ imports segment_anything.modeling too
    except ImportError:
        raise ConfigError(_SAM_MISSING) from None
    return segment_anything


def require_sam() -> None:
    """Raise :class:`ConfigError` now, before any image is read, when segment-anything is missing."""
    _segment_anything()


def sam_architecture(model_type: str | SamArchitecture) -> SamArchitecture:
    """``vit_b`` / ``vit_l`` / ``vit_h`` (or a :class:`SamArchitecture` as it is); ConfigError otherwise."""
    if isinstance(model_type, SamArchitecture):
        return model_type
    if model_type not in SAM_ARCHITECTURES:
        raise ConfigError(unknown_name_message("SAM model type", str(model_type), list(SAM_ARCHITECTURES)))
    return SAM_ARCHITECTURES[model_type]


@dataclasses.dataclass(frozen=True)
class SamWeights:
    """A SAM checkpoint on disk for one architecture: where it is, its sha256, where it came from."""

    architecture: SamArchitecture
    path: Path
    sha256: str
    url: str | None  # None: a local file passed by the user

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "url": self.url}


def sam_weights(model_type: str | SamArchitecture, checkpoint: Path | None = None) -> SamWeights:
    """The checkpoint of ``model_type``: ``checkpoint`` when given, else its published URL, fetched
    once and pinned by sha256 on first use (:func:`~.checkpoints.fetch_checkpoint`)."""
    architecture = sam_architecture(model_type)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise WeightsError(f"--checkpoint {path}: file not found; pass the SAM {architecture.name} checkpoint "
                               f"({architecture.url or 'a state dict of this architecture'})")
        return SamWeights(architecture, path, sha256_file(path), None)
    if architecture.url is None:
        raise ConfigError(f"SAM architecture '{architecture.name}' has no published checkpoint; pass --checkpoint")
    path, digest = fetch_checkpoint(architecture.url, what=f"SAM {architecture.name} checkpoint")
    return SamWeights(architecture, path, digest, architecture.url)


def build_sam(architecture: SamArchitecture) -> torch.nn.Module:
    """A randomly initialised ``segment_anything.modeling.Sam`` of ``architecture``, in eval mode.

    The arguments ``build_sam.py``'s ``_build_sam`` passes (LayerNorm eps 1e-6, mlp ratio 4, qkv
    bias, relative positions, 3 multimask outputs, SAM's pixel mean and std), the sizes from
    ``architecture``.
    """
    modeling = _segment_anything().modeling
    a = architecture
    embedding = a.image_size // a.patch_size
    encoder = modeling.ImageEncoderViT(
        depth=a.encoder_depth, embed_dim=a.encoder_embed_dim, img_size=a.image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a.encoder_num_heads, patch_size=a.patch_size,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(a.encoder_global_attn_indexes),
        window_size=a.window_size, out_chans=a.prompt_embed_dim)
    prompt = modeling.PromptEncoder(embed_dim=a.prompt_embed_dim, image_embedding_size=(embedding, embedding),
                                    input_image_size=(a.image_size, a.image_size), mask_in_chans=a.mask_in_chans)
    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=a.prompt_embed_dim, iou_head_depth=a.iou_head_depth,
        iou_head_hidden_dim=a.iou_head_hidden_dim,
        transformer=modeling.TwoWayTransformer(depth=a.decoder_depth, embedding_dim=a.prompt_embed_dim,
                                               mlp_dim=a.decoder_mlp_dim, num_heads=a.decoder_num_heads))
    sam = modeling.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
                       pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def load_sam(weights: SamWeights, device: torch.device) -> torch.nn.Module:
    """SAM of ``weights.architecture`` with the checkpoint's tensors, checked strictly, on ``device``."""
    arch = weights.architecture
    hint = (f"pass the SAM {arch.name} checkpoint ({arch.url})" if arch.url
            else f"pass a state dict of the SAM architecture '{arch.name}'") + ", or the --model-type it was made for"
    state = read_checkpoint(weights.path, hint=hint)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{weights.path}: expected a state dict (name -> tensor), found {type(state).__name__}; "
                           f"{hint}")
    sam = build_sam(arch)
    load_strict(sam, state, source=str(weights.path), hint=hint)
    return sam.to(device).eval()


def sam_generator(model: torch.nn.Module, settings: SamSettings) -> Any:
    """``SamAutomaticMaskGenerator`` over ``model`` with ``settings`` and COCO RLE output."""
    segment_anything = _segment_anything()
    return segment_anything.SamAutomaticMaskGenerator(model, output_mode="coco_rle", **dataclasses.asdict(settings))


def build_sam_generator(model_type: str | SamArchitecture, checkpoint: Path | None, settings: SamSettings,
                        device: torch.device) -> tuple[Any, SamWeights]:
    """SAM's automatic mask generator, loaded strictly; returns (generator, the weights it loaded).

    Args:
        model_type: ``vit_b``, ``vit_l``, ``vit_h``, or a :class:`SamArchitecture` (e.g. a tiny test network).
        checkpoint: a local state dict; None fetches the model type's published checkpoint.
        settings: the generator's settings (:func:`load_sam_config`).
        device: where the network runs.
    """
    weights = sam_weights(model_type, checkpoint)
    return sam_generator(load_sam(weights, device), settings), weights


def sam_proposals(generator: Any, image_rgb: np.ndarray) -> list[dict[str, Any]]:
    """The proposals of one image in SAM's output order: ``[{"rle": {...}, "score": predicted_iou}]``.

    Args:
        generator: a ``SamAutomaticMaskGenerator`` (any output mode but uncompressed RLE).
        image_rgb: [H, W, 3] uint8 RGB at the image's decoded size; the RLEs have that size.
    """
    if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3 \
            or image_rgb.dtype != np.uint8:
        raise DataError(f"SAM takes an [H, W, 3] uint8 RGB image, got {getattr(image_rgb, 'dtype', '')} "
                        f"{list(getattr(image_rgb, 'shape', []))}")
    out = []
    for record in generator.generate(image_rgb):
        segmentation = record["segmentation"]
        if isinstance(segmentation, np.ndarray):
            rle = encode_mask(segmentation.astype(bool))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            counts = segmentation["counts"]
            rle = {"size": [int(v) for v in segmentation["size"]],
                   "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        else:
            raise ConfigError("SAM's generator returned uncompressed RLEs; build it with output_mode 'coco_rle' "
                              "or 'binary_mask'")
        out.append({"rle": rle, "score": float(record["predicted_iou"])})
    return out
