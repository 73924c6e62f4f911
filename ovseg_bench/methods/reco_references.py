"""ReCo's reference embeddings, built from an image archive: ``ovseg-bench reco build-references``.

Paper: Shin, Xie, Albanie, "ReCo: Retrieve and Co-segment for Zero-shot Transfer", NeurIPS 2022.
Reference: github.com/NoelShin/reco@5c5e1bc (networks/reco.py ``ReCo.__init__``, ``_cosegment``,
``_get_text_attention``, ``_get_context_weights``, ``_get_reference_image_feature``;
datasets/imagenet1k.py; utils/extract_image_embeddings.py; utils/extract_text_embeddings.py).

Per class:

1. **Retrieve**: rank the archive by cosine between its retrieval-CLIP image embeddings (bicubic
   resize and centre crop to the model's input size, CLIP statistics, L2-normalised) and the
   class's 85-template text query; keep the top ``k`` (50).
2. **Co-segment** the ``k`` images, each resized (bilinear, short side) and centre-cropped to 224
   with ImageNet statistics, on DeiT-S/16-SIN features F [k, C, 14, 14]. Patch weights start at 1,
   times the language-guided weights sigmoid(10 cos(DenseCLIP map, text)) resized bilinearly
   from 7x7 to 14x14, times prod over the context references r of 1 - sigmoid(cos(F, r)).
3. **Seeds**: the cosine matrix of all k*196 normalised patch features, column j multiplied by
   its weight; per image block the max over the block's columns, averaged over the blocks; in
   each image the patch with the largest average (first on ties) is the seed.
4. The reference is the normalised mean of the *raw* seed features.

Context references (tree, sky, building, road, person) are built first, in that order, each
eliminated by those built before it; a class that is itself a context reuses its reference, and
"vegetation" reuses "tree".

Quirk kept on purpose (``seed_slicing: reco``): ReCo slices image n's column block as
``[n*hw : n*hw + (n+1)*hw]`` (networks/reco.py:172-176), so for n >= 1 the "max over image n"
spans images n..2n. ReCo's published reference files were built this way; ``seed_slicing:
fixed`` uses ``[n*hw : (n+1)*hw]`` and is recorded in the output's record.

Retrieval ties are broken by archive order (a stable sort); ReCo's ``argsort`` is not stable,
so its order among exactly equal cosines is arbitrary.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import atomic_path, atomic_write, sha256_file
from ..errors import ConfigError, DataError
from ..safe_pickle import safe_load_tensors

ARCHIVE_SUFFIXES = (".jpg", ".jpeg", ".png")
SEED_SLICINGS = ("reco", "fixed")
RECORD_FORMAT = "ovseg-bench/reco-references"
RECORD_VERSION = 1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# OpenAI CLIP's statistics, as ReCo's archive embedding uses them (utils/extract_image_embeddings.py:124).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ReferenceSettings:
    """How references are built; ReCo's defaults (configs/reco_*.yaml, networks/reco.py:11-25)."""

    k: int = 50
    seed_slicing: str = "reco"
    text_attention: bool = True
    context_elimination: bool = True
    context_categories: tuple[str, ...] = ("tree", "sky", "building", "road", "person")
    context_aliases: tuple[tuple[str, str], ...] = (("vegetation", "tree"),)  # networks/reco.py:235-237
    crop_size: int = 224                   # datasets/imagenet1k.py (size=224)
    text_temperature: float = 10.0         # networks/reco.py:105

    def __post_init__(self) -> None:
        if self.seed_slicing not in SEED_SLICINGS:
            raise ConfigError(f"seed_slicing '{self.seed_slicing}' is not one of {SEED_SLICINGS}")
        if self.k < 1:
            raise ConfigError(f"--k must be a positive number of images, found {self.k}")


# ----------------------------------------------------------------------------- the archive
def scan_archive(root: Path) -> dict[str, Path]:
    """{file name: path} of every image under ``root`` (recursive, sorted by relative path).

    Images are keyed by file name, as ReCo's embedding pickle is (ImageNet's names are unique);
    two images of one name are refused since the published embeddings could not tell them apart.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: the archive folder does not exist; pass --archive DIR, a folder of images "
                        "(e.g. ImageNet-1k train)")
    found: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in ARCHIVE_SUFFIXES and p.is_file()):
        if path.name in found:
            raise DataError(f"{root}: two archive images are named '{path.name}' ({found[path.name]} and {path}); "
                            "images are keyed by file name, so rename one")
        found[path.name] = path
    if not found:
        raise DataError(f"{root}: no image ({', '.join(ARCHIVE_SUFFIXES)}) under the archive folder")
    return found


def archive_digest(root: Path, files: dict[str, Path]) -> str:
    """sha256 over the archive's relative paths and sizes (cheap on 1.2M files; content is not read)."""
    digest = hashlib.sha256()
    for path in files.values():
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def retrieval_transform(size: int) -> Callable[[Any], Tensor]:
    """ReCo's archive-embedding transform: bicubic resize of the short side, centre crop, RGB,
    ToTensor, CLIP statistics, in that order (utils/extract_image_embeddings.py:119-125)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def open_image(path: Path) -> Any:
    """A PIL image as ReCo opens archive images: no EXIF transpose (datasets/imagenet1k.py:140)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: archive image is not readable ({exc}); remove or replace it") from None
    return image


def archive_crops(paths: Sequence[Path], size: int) -> Tensor:
    """[n,3,size,size] co-segmentation inputs: RGB, bilinear resize of the short side, centre crop,
    x/255, ImageNet statistics (datasets/imagenet1k.py:136-149)."""
    from torchvision.transforms import functional as TF

    crops = []
    for path in paths:
        image = TF.center_crop(TF.resize(open_image(path).convert("RGB"), size), size)
        crops.append(TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(crops)


class EmbeddingCache:
    """Archive embeddings on disk, written every few batches and resumed after an interruption.

    The file holds the identity it was computed for (retrieval weights, input size, archive
    root); another identity is refused rather than mixed in.
    """

    def __init__(self, path: Path, identity: dict[str, Any]):
        self.path, self.identity = Path(path), identity
        self.names: list[str] = []
        self.rows: list[Tensor] = []
        if self.path.is_file():
            self._resume()

    def _resume(self) -> None:
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which and how to start over
            raise DataError(f"{self.path}: not a readable archive-embedding cache ({type(exc).__name__}); "
                            "delete it to start over") from None
        if saved.get("identity") != json.loads(json.dumps(self.identity, default=str)):
            raise DataError(f"{self.path}: this cache was computed for {saved.get('identity')}, not for "
                            f"{self.identity}; pass another --cache or delete it")
        self.names, self.rows = list(saved["names"]), [saved["embeddings"]]

    def done(self) -> set[str]:
        return set(self.names)

    def add(self, names: list[str], embeddings: Tensor) -> None:
        self.names += names
        self.rows.append(embeddings.float().cpu())

    def embeddings(self) -> Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0)

    def save(self) -> None:
        self.rows = [self.embeddings()]  # one block from here on: later saves do not re-join every batch
        payload = {"identity": json.loads(json.dumps(self.identity, default=str)), "names": self.names,
                   "embeddings": self.rows[0]}
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)


@torch.no_grad()
def embed_archive(model: Any, files: dict[str, Path], cache: EmbeddingCache, *, size: int,
                  device: torch.device, batch_size: int = 32, save_interval_s: float = 300.0,
                  quiet: bool = False) -> tuple[list[str], Tensor]:
    """Every archive image's L2-normalised retrieval embedding, in archive order, resuming ``cache``.

    Each save rewrites the whole cache file, so saves are spaced by time (``save_interval_s``)
    rather than by batch: on ImageNet's 1.28M images a save every few batches would rewrite
    gigabytes thousands of times. What was computed is also saved when the loop stops early
    (an error or Ctrl-C), so a rerun resumes from there.
    """
    import time

    from tqdm import tqdm

    transform = retrieval_transform(size)
    todo = [name for name in files if name not in cache.done()]
    bar = tqdm(total=len(files), initial=len(files) - len(todo), desc="archive embeddings", unit="img",
               disable=quiet, dynamic_ncols=True)
    last_save, unsaved = time.monotonic(), False
    try:
        for start in range(0, len(todo), batch_size):
            names = todo[start:start + batch_size]
            images = torch.stack([transform(open_image(files[name])) for name in names]).to(device)
            embedding = model.encode_image(images).float()
            cache.add(names, embedding / torch.linalg.norm(embedding, ord=2, dim=1, keepdim=True))
            unsaved = True
            bar.update(len(names))
            if time.monotonic() - last_save >= save_interval_s:
                cache.save()
                last_save, unsaved = time.monotonic(), False
    finally:
        bar.close()
        if unsaved:
            cache.save()
    order = {name: i for i, name in enumerate(cache.names)}
    embeddings = cache.embeddings()
    names = [name for name in files if name in order]
    return names, embeddings[[order[name] for name in names]]


def load_archive_embeddings(path: Path, files: dict[str, Path]) -> tuple[list[str], Tensor]:
    """ReCo's published ``filename_to_<model>_train_img_embedding.pkl`` ({file name: embedding}),
    read with the tensor allow-list unpickler; names without an image in the archive are refused."""
    found = safe_load_tensors(Path(path))
    if not isinstance(found, dict) or not found or not all(isinstance(v, Tensor) for v in found.values()):
        raise DataError(f"{path}: an archive-embedding file maps file names to embeddings; found "
                        f"{type(found).__name__}")
    missing = [name for name in found if name not in files]
    if missing:
        raise DataError(f"{path}: {len(missing)} embedded image(s) are not in the archive (first: {missing[:3]}); "
                        "pass the archive these embeddings were computed from")
    names = list(found)  # ReCo ranks in the pickle's order (datasets/imagenet1k.py:60-63)
    return names, torch.stack([found[name].float() for name in names])


def rank_archive(query: Tensor, embeddings: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` archive images closest to the text ``query`` (ties: archive order)."""
    scores = query.float() @ embeddings.float().t()
    return torch.argsort(scores, descending=True, stable=True)[:k].tolist()


# ----------------------------------------------------------------------------- co-segmentation
def language_weights(clip_map: Tensor, text: Tensor, size: tuple[int, int], temperature: float) -> Tensor:
    """[n,h,w] sigmoid(T cos(DenseCLIP map, text)), then resized bilinearly to ``size``
    (``_get_text_attention`` with a single text feature, networks/reco.py:101-116)."""
    clip_map = clip_map / clip_map.norm(dim=1, keepdim=True)
    weights = torch.sigmoid(temperature * torch.einsum("bchw,c->bhw", clip_map, text.to(clip_map.dtype)))
    return F.interpolate(weights[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def context_similarity(features: Tensor, contexts: Tensor) -> Tensor:
    """[n,m,h,w] sigmoid(cos(F, r)) for the m context references, both sides normalised, no temperature
    (``_get_context_weights``, networks/reco.py:128-141)."""
    return torch.sigmoid(torch.einsum("bchw,nc->bnhw", features / features.norm(dim=1, keepdim=True),
                                      contexts / contexts.norm(dim=1, keepdim=True)))


def patch_weights(features: Tensor, text_attention: Tensor | None, contexts: Tensor | None) -> Tensor:
    """[n,h,w]: 1, times the language weights, times each 1 - context similarity in turn
    (``_cosegment``, networks/reco.py:241-263; the multiplication order is kept)."""
    n, _, h, w = features.shape
    weights = torch.ones((n, h, w), device=features.device)
    if text_attention is not None:
        weights = weights * text_attention
    if contexts is not None and len(contexts):
        similarity = context_similarity(features, contexts)
        for j in range(similarity.shape[1]):
            weights *= 1 - similarity[:, j]
    return weights


def seed_indices(features: Tensor, weights: Tensor, slicing: str = "reco") -> list[int]:
    """Per image, the flat index (row-major over h, w) of its seed patch.

    ``features`` [n,C,h,w] raw, ``weights`` [n,h,w] in 0..1 multiplying the *columns* of the
    patch cosine matrix (networks/reco.py:155-187).
    """
    if slicing not in SEED_SLICINGS:
        raise ConfigError(f"seed_slicing '{slicing}' is not one of {SEED_SLICINGS}")
    n, c, h, w = features.shape
    hw = h * w
    flat = features.permute(1, 0, 2, 3).flatten(start_dim=1).t()
    flat = flat / flat.norm(dim=-1, keepdim=True)
    adjacency = (flat @ flat.t()) * weights.flatten()[None]
    grid = torch.zeros((len(adjacency), n), dtype=torch.float32, device=adjacency.device)
    for image in range(n):
        start = image * hw
        stop = start + (start + hw if slicing == "reco" else hw)  # the quirk: start + end, end = start + hw
        grid[:, image] = torch.max(adjacency[:, start:stop], dim=1).values
    average = grid.mean(dim=1)
    return [int(torch.argmax(average[image * hw:(image + 1) * hw]).item()) for image in range(n)]


def reference_from_seeds(features: Tensor, seeds: Sequence[int]) -> Tensor:
    """The normalised mean of each image's raw seed feature (``ref_type='avg'``, networks/reco.py:189-215)."""
    w = features.shape[-1]
    chosen = torch.stack([features[i, :, s // w, s % w] for i, s in enumerate(seeds)])
    mean = chosen.mean(dim=0)
    return mean / mean.norm(dim=0, keepdim=True)


@dataclasses.dataclass
class Cosegmenter:
    """The two co-segmentation networks and the settings: images -> one reference."""

    deit_features: Callable[[Tensor], Tensor]      # [n,3,H,W] -> [n,C,H/16,W/16]
    clip_features: Callable[[Tensor], Tensor]      # [n,3,H,W] -> [n,E,H/32,W/32]
    settings: ReferenceSettings

    @torch.no_grad()
    def reference(self, images: Tensor, text: Tensor, contexts: dict[str, Tensor]) -> Tensor:
        features = self.deit_features(images).float()
        attention = None
        if self.settings.text_attention:
            attention = language_weights(self.clip_features(images).float(), text, tuple(features.shape[-2:]),
                                         self.settings.text_temperature)
        context = torch.stack(list(contexts.values())) if self.settings.context_elimination and contexts else None
        weights = patch_weights(features, attention, context)
        return reference_from_seeds(features, seed_indices(features, weights, self.settings.seed_slicing))


def build_references(classes: Sequence[str], *, retrieve: Callable[[str], Tensor],
                     text: Callable[[str], Tensor], coseg: Cosegmenter) -> dict[str, Tensor]:
    """{class: reference} for ``classes``, contexts built first (networks/reco.py:56-90, 228-237)."""
    settings = coseg.settings
    contexts: dict[str, Tensor] = {}
    if settings.context_elimination:
        for name in settings.context_categories:
            contexts[name] = coseg.reference(retrieve(name), text(name), contexts)
    aliases = dict(settings.context_aliases)
    references: dict[str, Tensor] = {}
    for name in classes:
        if name in contexts:
            references[name] = contexts[name]
        elif aliases.get(name) in contexts:
            references[name] = contexts[aliases[name]]
        else:
            references[name] = coseg.reference(retrieve(name), text(name), contexts)
    return {name: value.float().cpu() for name, value in references.items()}


# ----------------------------------------------------------------------------- files
def record_path(references: Path) -> Path:
    """The JSON record written beside a built reference file."""
    return Path(str(references) + ".json")


def write_references(path: Path, references: dict[str, Tensor], record: dict[str, Any]) -> None:
    """The references in the published files' format (a pickled {class: tensor}, readable by
    ReCo's own ``pickle.load``) and the record beside them, each written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            pickle.dump({name: value.contiguous() for name, value in references.items()}, stream, protocol=4)
    atomic_write(record_path(path), json.dumps({**record, "references_sha256": sha256_file(path)}, indent=2,
                                               default=str) + "\n")


def read_record(path: Path) -> dict[str, Any] | None:
    """The build record of a reference file, or None for a file without one (a published pickle).

    A record whose digest does not match the file is refused: the file changed after it was built.
    """
    found = record_path(path)
    if not found.is_file():
        return None
    try:
        record = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{found}: not a readable build record ({exc}); delete it or rebuild the references") from None
    if record.get("format") != RECORD_FORMAT:
        raise DataError(f"{found}: not an ovseg-bench reference record (format {record.get('format')!r})")
    if record.get("references_sha256") != sha256_file(path):
        raise DataError(f"{found}: records another file than {path} (sha256 differs); rebuild the references "
                        "or delete the stale record")
    return record


def read_class_file(path: Path) -> list[str]:
    """Class names, one per line (blank lines skipped, names kept verbatim otherwise)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the class file ({exc.strerror}); pass --classes FILE with one "
                          "class name per line") from None
    names = [line for line in lines if line.strip()]
    if not names:
        raise ConfigError(f"{path}: no class names; the file lists one class name per line")
    return list(dict.fromkeys(names))


def union(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def fp16_text_copy(model: Any) -> Any:
    """A copy of an open_clip model whose text tower runs as OpenAI's fp16 CLIP does: Conv/Linear/
    attention weights in fp16, LayerNorm computed in fp32 and cast back. ReCo's retrieval model is
    ``build_model`` of OpenAI's CLIP, which converts to fp16 on every device
    (networks/clip_arch.py:452-513), so its text queries are fp16 embeddings. The image tower is
    not copied (ViT-L/14@336 alone is over a gigabyte): the copy's ``visual`` is a placeholder."""
    import open_clip
    from open_clip.transformer import LayerNorm, LayerNormFp32

    half = copy.deepcopy(model, memo={id(model.visual): torch.nn.Identity()})
    open_clip.convert_weights_to_lp(half, dtype=torch.float16)
    for module in half.modules():
        if type(module) in (LayerNorm, torch.nn.LayerNorm):
            module.__class__ = LayerNormFp32
    return half
