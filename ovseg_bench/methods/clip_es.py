"""CLIP-ES: GradCAM of CLIP with class-aware attention refinement (Lin, Chen, Xu, Zhang, Lu, Yang,
Wang, "CLIP is Also an Efficient Segmenter", CVPR 2023; linyq2117/CLIP-ES@3893f81).

A training-free CAM row of the label-conditioned track: the image-level labels choose which
classes get a CAM, and the softmax that GradCAM differentiates runs over exactly those classes
plus the background words. Per image, as ``perform`` in
linyq2117/CLIP-ES@3893f81:generate_cams_voc12.py (and generate_cams_coco14.py) computes it:

0. **Text**: "a clean origami {}." with CLIP-ES's synonym strings and background words (config),
   encoded through CLIP-ES's text path (every block with ``need_weights=True``:
   :func:`encode_text`), per name normalised, averaged, normalised (``zeroshot_classifier``).
1. **Input**: one scale, no flip; each side rounded *up* to a multiple of 16 (``np.ceil``), PIL
   bicubic, ``ToTensor`` and CLIP's unit-scale mean/std (``img_ms_and_flip``, ``_transform_resize``).
2. **Tokens**: the 14x14 position table resized bilinearly to the grid on every call, CLS row
   kept, and returned as an fp16 Parameter, so rounded to fp16 even on the CPU
   (clip/model.py ``upsample_pos_emb``; config ``pos_embed_fp16``).
3. **Blocks 0..L-2** once without gradients, keeping each block's head-averaged attention
   (clip/model.py ``Transformer.forward``: ``need_weights=True``). A 77-token sequence (76
   patches) runs all L blocks there, the text tower's test, and the last block again after it:
   reproduced (``reproduce_77_token_quirk``).
4. **Score**: the last block, ``ln_post``, the *mean of the patch tokens*, ``proj``, L2-normalised,
   times ``exp(logit_scale)`` against the L2-normalised texts of [present classes in label order,
   every background word]; softmax (clip/model.py ``forward_last_layer``).
5. **GradCAM** (pytorch_grad_cam/base_cam.py, grad_cam.py): activations and gradients at the output
   of the last block's ``ln_1`` (CLS dropped, ``reshape_transform``); the weights are the spatial
   mean of the gradients of the target class's softmax probability; sum over channels; ReLU;
   min-max with eps 1e-7, applied twice (``compute_cam_per_layer`` then
   ``aggregate_multi_layers``), in numpy float32 on the CPU as the reference does.
6. **CAA**: the first class's pass gives the last block's attention; CLS row and column dropped
   (no renormalising); mean of the last 8 blocks (all of them if the model has fewer); column- then
   row-normalisation three times; (T + T^T) / 2; T <- T @ T; columns times the box mask; refined
   = T @ cam. On the CPU in float32, as the reference moves it there.
7. **Box mask** (utils.py ``scoremap2bbox``): ``(cam * 255).astype(uint8)``, threshold
   ``int(0.4 * max)`` (COCO 0.7), strict ``>``, ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``,
   every contour's bounding box with its ends clipped to size - 1 and used as an exclusive slice
   end (a box touching the border loses its last row/column); no contour: an all-zero mask, so an
   all-zero CAM.
8. **Output**: min-max (eps 1e-7), ``cv2.resize`` (bilinear) to the image size, stored as float16
   (``attn_highres``); returned here as :class:`~ovseg_bench.datasets.cams.Cams` in CLIP-ES's
   format (float32 copies of the float16 values).

**Background** (eval_cam.py): (1 - max over the present classes)^k in float16, ties to background,
k in {1, 2} tried and the best kept (tuned on the evaluated split). Since the maps are in [0, 1],
background wins exactly where max <= t_k, the largest float16 value m with fp16((1 - m)^k) >= m
(:func:`power_threshold`: t_1 = 0.5, t_2 = 0.382080078125), so the track's constant-plane rule of
:func:`~ovseg_bench.datasets.cams.pseudo_mask` on float16 maps gives CLIP-ES's labels exactly:
``curve`` returns the t_k of ``bg_powers`` and the fixed one of ``bg_power``.

**Parity**: on the CPU in fp32, with fp16-valued weights (as OpenAI's are; ``clip.load`` rounds to
them), the maps equal those of CLIP-ES's own ``perform`` bit for bit (checked on tiny random
weights, six images of 100x140 to 500x375, 4-6 classes each).

**Precision**: CLIP-ES ran its model in fp16 on CUDA (LayerNorm in fp32), which moves about 5 % of
ViT-B/16 labels; on the CPU ``clip.load`` gives fp32 apart from the fp16 position table. This
adapter runs fp32 (the CPU reference) whatever the device; the run's ``--precision`` is recorded
by the engine, and the label-conditioned scorer does not autocast ``cams``. The engine loops
under ``torch.inference_mode()``; ``cams`` leaves it (``inference_mode(False)``, ``enable_grad``)
and works on fresh tensors, so GradCAM has its gradients.

Not reproduced: the dense-CRF post-processing (eval_cam_with_crf.py; no ``clip_es_crf`` row
yet); COCO's image labels come from the card (GT) rather than CLIP-ES's list columns.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..datasets.cams import Cams
from ..errors import ConfigError
from ..imaging import Normalisation
from ..resources import configs_dir
from ..yamlconf import load_dataclass
from .base import CamMethod, DatasetInfo, MethodInputs, WeightsOptions, register_config_variants
from .clip_dense import _check_block, _check_visual
from .clip_model import load_clip
from .prompts import TextCache, load_templates, text_cache_identity

# torchvision's ToTensor + Normalize with CLIP's statistics (generate_cams_voc12.py _transform_resize).
CLIP_UNIT = Normalisation("clip_unit", (0.48145466, 0.4578275, 0.40821073),
                          (0.26862954, 0.26130258, 0.27577711), unit=True)
TEXT_CONTEXT = 77  # clip/model.py Transformer.forward: `x.shape[0] == 77` picks the text tower's path


@dataclasses.dataclass(frozen=True)
class ClassSet:
    """The text side of one dataset family: CLIP-ES's names in the card's label order (background
    excluded), its background words, and the box threshold of its generation script."""

    names: tuple[str, ...]
    background_words: tuple[str, ...]
    box_threshold: float


@dataclasses.dataclass(frozen=True)
class ClipEsConfig:
    """``configs/methods/clip_es.yaml``; every default is CLIP-ES's (see that file for sources)."""

    name: str
    paper: str
    variant_of: str | None = None
    native_protocol: str | None = None
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    templates: str = "clip_es_origami"
    patch_size: int = 16
    pos_embed_fp16: bool = True
    reproduce_77_token_quirk: bool = True
    caa_layers: int = 8
    normalisation_rounds: int = 3
    matrix_powers: int = 1
    min_max_eps: float = 1e-7
    bg_powers: tuple[float, ...] = (1.0, 2.0)
    bg_power: float = 2.0
    crf: bool = False   # eval_cam_with_crf.py: the dense CRF on [(1 - max)^1, CAMs] (clip_es_crf)
    datasets: dict[str, str] = dataclasses.field(default_factory=dict)
    class_sets: dict[str, ClassSet] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"method '{self.name}'"
        if self.bg_power not in self.bg_powers:
            raise ConfigError(f"{where}: bg_power {self.bg_power} is not one of bg_powers {list(self.bg_powers)}")
        if any(k <= 0 for k in self.bg_powers) or len(set(self.bg_powers)) != len(self.bg_powers):
            raise ConfigError(f"{where}: bg_powers must be distinct positive numbers, got {list(self.bg_powers)}")
        unknown = sorted(set(self.datasets.values()) - set(self.class_sets))
        if unknown:
            raise ConfigError(f"{where}: datasets name class set(s) {unknown}; defined: {sorted(self.class_sets)}")
        for field in ("patch_size", "caa_layers", "normalisation_rounds"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{where}: {field} must be at least 1, got {getattr(self, field)}")


def load_clip_es_config(name: str, path: Path | None = None) -> ClipEsConfig:
    return load_dataclass(ClipEsConfig, path or configs_dir() / "methods" / f"{name}.yaml")


# ----------------------------------------------------------------------------- pieces (each tested alone)

def resize_input(image: np.ndarray, patch: int = 16) -> np.ndarray:
    """[H,W,3] uint8 RGB -> [H',W',3] uint8, each side rounded up to a multiple of ``patch``, PIL
    bicubic (torchvision's ``Resize((h, w), BICUBIC)`` on a PIL image; the same size is a copy)."""
    height, width = image.shape[:2]
    size = (int(np.ceil(width / patch) * patch), int(np.ceil(height / patch) * patch))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def upsample_pos_embed(pos: Tensor, grid: tuple[int, int], *, fp16: bool = True) -> Tensor:
    """[1+n*n, D] table -> [1+h*w, D]: bilinear (align_corners=False) on every call, CLS row
    kept, then rounded to fp16 as CLIP-ES's ``upsample_pos_emb`` does (``fp16``)."""
    n = int(round((pos.shape[0] - 1) ** 0.5))
    if n * n != pos.shape[0] - 1:
        raise ConfigError(f"position table has {pos.shape[0] - 1} patch rows, not a square grid")
    table = pos[1:].permute(1, 0).reshape(1, pos.shape[1], n, n)
    table = F.interpolate(table, size=grid, mode="bilinear", align_corners=False)
    table = torch.cat([pos[:1], table.reshape(pos.shape[1], -1).permute(1, 0)], dim=0)
    return table.half() if fp16 else table


def embed(visual: nn.Module, images: Tensor, *, fp16_table: bool = True) -> tuple[Tensor, tuple[int, int]]:
    """[1,3,H,W] normalised -> ([1,1+h*w,D] input of block 0, (h, w)), as clip/model.py
    ``VisionTransformer.forward`` (conv1, CLS, the resized table cast to the tokens' dtype, ln_pre)."""
    patches = visual.conv1(images)
    grid = (patches.shape[-2], patches.shape[-1])
    x = patches.reshape(patches.shape[0], patches.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1)
    x = x + upsample_pos_embed(visual.positional_embedding, grid, fp16=fp16_table).to(x.dtype)
    return visual.ln_pre(x), grid


def _attend(block: nn.Module, q: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``block.attn(q, q, q, need_weights=True)`` on batch-first tokens -> (output, [B,T,T] head mean)."""
    mask = None if mask is None else mask.to(q.dtype)
    if getattr(block.attn, "batch_first", False):
        return block.attn(q, q, q, need_weights=True, attn_mask=mask)
    seq = q.transpose(0, 1)
    out, weights = block.attn(seq, seq, seq, need_weights=True, attn_mask=mask)
    return out.transpose(0, 1), weights


def block_with_attention(block: nn.Module, x: Tensor, normed: Tensor | None = None, *,
                         mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One residual block with its head-averaged attention (CLIP-ES's ``ResidualAttentionBlock``:
    ``need_weights=True`` always, so the explicit attention path, text tower included).

    ``normed`` is ``ln_1(x)`` when the caller needs that tensor itself (GradCAM's layer)."""
    normed = block.ln_1(x) if normed is None else normed
    out, weights = _attend(block, normed, mask)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x))), weights


def prefix_blocks(visual: nn.Module, x: Tensor, *, quirk: bool = True) -> tuple[Tensor, list[Tensor]]:
    """Blocks 0..L-2 without gradients (all L blocks for a 77-token sequence when ``quirk``), and
    each one's [B,T,T] attention."""
    blocks = visual.transformer.resblocks
    count = len(blocks) if quirk and x.shape[1] == TEXT_CONTEXT else len(blocks) - 1
    weights = []
    with torch.no_grad():
        for block in blocks[:count]:
            x, attn = block_with_attention(block, x)
            weights.append(attn)
    return x, weights


@torch.no_grad()
def encode_text(model: nn.Module, tokens: Tensor) -> Tensor:
    """[B,77] tokens -> [B,E] text features through CLIP-ES's text path (clip/model.py ``encode_text``:
    every block with ``need_weights=True`` and the causal mask; EOT = argmax token). open_clip's
    own ``encode_text`` takes the fused attention path, about 2e-7 away, which moves 1 float16 ulp
    of about 5 % of CAM values."""
    if not all(hasattr(model, n) for n in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        raise ConfigError(f"{type(model).__name__} has no plain CLIP text tower; CLIP-ES needs one")
    x = model.token_embedding(tokens) + model.positional_embedding
    for block in model.transformer.resblocks:
        x, _ = block_with_attention(block, x, mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x @ model.text_projection


def zeroshot_classifier(model: nn.Module, tokenizer: Any, names: list[str], templates: tuple[str, ...],
                        device: torch.device) -> Tensor:
    """[len(names), E] float32 (generate_cams_voc12.py ``zeroshot_classifier``): per name, every
    template's features L2-normalised, averaged, L2-normalised."""
    rows = []
    for name in names:
        feats = encode_text(model, tokenizer([t.format(name) for t in templates]).to(device))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows).float()


def last_block_probabilities(model: nn.Module, x: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The last block with gradients at its ``ln_1`` output (clip/model.py ``forward_last_layer``).

    Returns (``ln_1`` output [1,T,D] that requires grad, softmax [1,Q] over ``text`` rows, the
    block's [1,T,T] attention)."""
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    normed = block.ln_1(x).detach().requires_grad_(True)
    y, attn = block_with_attention(block, x, normed)
    feats = visual.ln_post(y)
    feats = torch.mean(feats[:, 1:, :], dim=1) @ visual.proj
    feats = feats / feats.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    logits = model.logit_scale.exp() * feats @ text.t()
    return normed, logits.softmax(dim=-1), attn


def _to_maps(tokens: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """[1,T,D] -> numpy [1,D,h,w] view without CLS (pytorch_grad_cam ``reshape_transform``)."""
    result = tokens[:, 1:, :].reshape(tokens.size(0), grid[0], grid[1], tokens.size(2))
    # float(): under --precision bf16 the activations are bfloat16, which numpy cannot hold.
    return result.transpose(2, 3).transpose(1, 2).detach().cpu().float().numpy()


def scale_cam(cams: np.ndarray, eps: float = 1e-7, size: tuple[int, int] | None = None) -> np.ndarray:
    """pytorch_grad_cam ``scale_cam_image``: per map (x - min) / (eps + max), then ``cv2.resize``
    to ``size`` = (width, height) if given; float32."""
    out = []
    for cam in cams:
        cam = cam - np.min(cam)
        cam = cam / (eps + np.max(cam))
        out.append(cam if size is None else cv2.resize(cam, size))
    return np.float32(out)


def gradcam(activations: np.ndarray, grads: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """[1,D,h,w] activations and gradients -> [h,w] float32 CAM in [0, 1] (GradCAM: channel weights
    = spatial mean of the gradients; ReLU; min-max; the one-layer aggregate's ReLU, mean, min-max)."""
    weights = np.mean(grads, axis=(2, 3))
    cam = (weights[:, :, None, None] * activations).sum(axis=1)
    cam = scale_cam(np.maximum(cam, 0).astype(np.float32), eps)[:, None, :]
    cam = np.mean(np.maximum(cam, 0), axis=1)
    return scale_cam(cam, eps)[0]


def transition_matrix(attn: Tensor, *, rounds: int = 3, powers: int = 1) -> Tensor:
    """[N,N] mean attention -> CAA's transition: ``rounds`` of column- then row-normalisation,
    (T + T^T) / 2, then T <- T @ T ``powers`` times."""
    trans = attn
    for _ in range(rounds):
        trans = trans / torch.sum(trans, dim=0, keepdim=True)
        trans = trans / torch.sum(trans, dim=1, keepdim=True)
    trans = (trans + trans.transpose(1, 0)) / 2
    for _ in range(powers):
        trans = torch.matmul(trans, trans)
    return trans


def box_mask(cam: np.ndarray, threshold: float) -> Tensor:
    """[h,w] float32 CAM in [0, 1] -> [1, h*w] float32 0/1 mask of the contours' boxes (utils.py
    ``scoremap2bbox`` with ``multi_contour_eval=True``, then ``perform``'s exclusive slices)."""
    height, width = cam.shape
    image = np.expand_dims((cam * 255).astype(np.uint8), 2)
    _, binary = cv2.threshold(src=image, thresh=int(threshold * np.max(image)), maxval=255, type=cv2.THRESH_BINARY)
    contours = cv2.findContours(image=binary, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
    mask = torch.zeros((height, width))
    for contour in contours:  # no contour: scoremap2bbox's [0, 0, 0, 0] box, an empty slice
        x, y, w, h = cv2.boundingRect(contour)
        mask[y:min(y + h, height - 1), x:min(x + w, width - 1)] = 1
    return mask.view(1, height * width)


def refine(trans: Tensor, mask: Tensor, cam: np.ndarray) -> np.ndarray:
    """CAA: (T with columns times ``mask``) @ cam -> [h,w] float32."""
    refined = torch.matmul(trans * mask, torch.FloatTensor(cam).view(-1, 1))
    return refined.reshape(cam.shape).cpu().float().numpy()


def power_threshold(k: float) -> float:
    """The largest float16 m in [0, 1] with fp16((1 - m)^k) >= m (eval_cam.py's background rule in
    float16): for maps in [0, 1], background wins under that rule exactly where max <= it."""
    values = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)  # every float16 in [0, 1], ascending
    wins = np.power(np.float16(1) - values, k) >= values
    last = int(np.nonzero(wins)[0].max())
    if not wins[:last + 1].all():  # never for k > 0; checked because exactness rests on it
        raise ConfigError(f"bg power {k}: the float16 background rule is not a threshold")
    return float(values[last])


# ----------------------------------------------------------------------------- adapter

class ClipEs(CamMethod):
    """CLIP-ES CAMs (GradCAM + CAA) of the present classes on an open_clip ViT."""

    normalisation = CLIP_UNIT

    def __init__(self, config: ClipEsConfig, weights: WeightsOptions, device: torch.device, *,
                 inputs: MethodInputs | None = None):
        self.config, self.device = config, torch.device(device)
        loaded = load_clip(weights.model or config.model, weights.pretrained or config.pretrained, self.device)
        self.model, self.record = loaded.model, loaded.record
        _check_visual(self.model.visual)
        for block in self.model.visual.transformer.resblocks:
            _check_block(block)
        self.tokenizer, self.templates = loaded.tokenizer, load_templates(config.templates)
        self.cache = TextCache()
        self._texts: dict[str, tuple[Tensor, Tensor]] = {}  # dataset -> (class rows, background rows)

    def weights(self) -> dict[str, Any]:
        return dict(self.record)

    def check_datasets(self, datasets: tuple[str, ...]) -> None:
        for dataset in datasets:
            self.class_set(dataset)

    def class_set(self, dataset: str) -> ClassSet:
        if dataset not in self.config.datasets:
            raise ConfigError(f"method '{self.config.name}' has no class names for dataset '{dataset}'; it serves "
                              f"{sorted(self.config.datasets)} (add the card under `datasets` in its config)")
        return self.config.class_sets[self.config.datasets[dataset]]

    def settings(self, dataset: str) -> dict[str, Any]:
        settings = dataclasses.asdict(self.config)
        for key in ("model", "pretrained", "variant_of", "native_protocol", "paper", "datasets", "class_sets"):
            settings.pop(key)
        settings["class_set"] = dataclasses.asdict(self.class_set(dataset))
        settings["bg_rule"] = "(1 - max)^k in float16, scored as its float16 threshold"
        settings["bg_thresholds"] = {str(k): power_threshold(k) for k in self.config.bg_powers}
        return settings

    def refine_pseudo_masks(self, masks: np.ndarray, cams: Any, image_path: Path | None,
                            image: np.ndarray) -> np.ndarray:
        """With ``crf``, every grid point's mask is the CRF's labels (the CRF path has no threshold)."""
        if not self.config.crf or not len(cams.classes) or image_path is None:
            return masks
        labels = clip_es_crf_labels(cams, image_path).astype(masks.dtype)
        return np.broadcast_to(labels, masks.shape).copy()

    def curve(self, dataset: str) -> tuple[tuple[float, ...], float]:
        """(the float16 thresholds equivalent to ``bg_powers``, ascending; that of ``bg_power``)."""
        return tuple(sorted(power_threshold(k) for k in self.config.bg_powers)), power_threshold(self.config.bg_power)

    def _text_rows(self, info: DatasetInfo) -> tuple[Tensor, Tensor]:
        if info.name not in self._texts:
            classes = self.class_set(info.name)
            if len(classes.names) != info.num_classes - 1:
                raise ConfigError(f"method '{self.config.name}': {len(classes.names)} class names for dataset "
                                  f"'{info.name}', which has {info.num_classes - 1} foreground classes")
            self._texts[info.name] = (self._encode(list(classes.names)), self._encode(list(classes.background_words)))
        return self._texts[info.name]

    def _encode(self, names: list[str]) -> Tensor:
        # Keyed apart from ClipTextEncoder's entries: another text path gives other last bits.
        identity = {**text_cache_identity(self.record), "text_path": "clip_es_need_weights"}
        compute = lambda: zeroshot_classifier(self.model, self.tokenizer, names, self.templates, self.device)  # noqa: E731
        return self.cache.get_or_compute(identity, self.templates, "normalised", names, compute).to(self.device)

    def cams(self, image: np.ndarray, labels: tuple[int, ...], info: DatasetInfo, *, image_id: str,
             image_path: Path | None = None) -> Cams:
        """[H,W,3] uint8 RGB and the present label ids (1..N-1, in the track's order) -> CLIP-ES CAMs:
        float32 [K,H,W] copies of the float16 ``attn_highres`` maps, source ``clip-es``. With
        ``image_path`` the file is decoded as CLIP-ES does (Pillow, EXIF not applied)."""
        from ..imaging import decode_pil_rgb

        if image_path is not None:
            image = decode_pil_rgb(image_path)
        height, width = image.shape[:2]
        if not labels:  # CLIP-ES skips such images; the track scores them as all background
            return Cams((), np.zeros((0, height, width), np.float32), "clip-es", "float16")
        fg, bg = self._text_rows(info)
        with torch.inference_mode(False), torch.enable_grad():
            text = torch.cat([fg[[label - 1 for label in labels]], bg]).clone()
            maps = self._class_maps(image, text, len(labels), self.class_set(info.name).box_threshold)
        return Cams(tuple(labels), maps, "clip-es", "float16")

    def _class_maps(self, image: np.ndarray, text: Tensor, count: int, box_threshold: float) -> np.ndarray:
        """The K refined CAMs at the image's size, float16 values held in float32."""
        cfg, height, width = self.config, image.shape[0], image.shape[1]
        pixels = torch.from_numpy(resize_input(image, cfg.patch_size).copy()).permute(2, 0, 1)[None]
        x, grid = embed(self.model.visual, CLIP_UNIT.apply(pixels.to(self.device)), fp16_table=cfg.pos_embed_fp16)
        x, attention = prefix_blocks(self.model.visual, x, quirk=cfg.reproduce_77_token_quirk)
        normed, probs, last_attn = last_block_probabilities(self.model, x, text)
        stacked = torch.stack([a[:, 1:, 1:] for a in [*attention, last_attn]], dim=0)[-cfg.caa_layers:]
        mean_attn = torch.mean(stacked, dim=0)[0].cpu().detach().float()
        trans = transition_matrix(mean_attn, rounds=cfg.normalisation_rounds, powers=cfg.matrix_powers)
        activations, out = _to_maps(normed, grid), []
        for k in range(count):
            (grads,) = torch.autograd.grad(probs[:, k].sum(), normed, retain_graph=k + 1 < count)
            cam = gradcam(activations, _to_maps(grads, grid), cfg.min_max_eps)
            refined = refine(trans, box_mask(cam, box_threshold), cam)
            out.append(scale_cam(refined[None], cfg.min_max_eps, (width, height))[0])
        return np.stack(out).astype(np.float16).astype(np.float32)


CLIP_ES_CRF_MEAN_BGR = (104.008, 116.669, 122.675)  # eval_cam_with_crf.py mean_bgr


def clip_es_crf_labels(cams: Any, image_path: Path) -> np.ndarray:
    """[H,W] label ids of CLIP-ES's CRF path (linyq2117/CLIP-ES@3893f81:eval_cam_with_crf.py):
    scores [(1 - max)^1, CAMs] in float16, not normalised, through STEGO's CRF (Gaussian 1/3,
    bilateral 67/3/4, 10 steps) on the cv2 BGR image minus (104.008, 116.669, 122.675) cast to
    uint8 (negative values wrap, as numpy's cast does there); argmax, then the keys' label ids."""
    from .crf import CrfParams, softmax_unary_crf

    maps = cams.maps.astype(np.float16)  # the exact float16 values CLIP-ES stored
    scores = np.concatenate([np.power(1 - maps.max(axis=0, keepdims=True), 1), maps], axis=0)
    image = cv2.imread(str(image_path), cv2.IMREAD_COLOR).astype(np.float32)
    image -= np.array(CLIP_ES_CRF_MEAN_BGR, dtype=np.float32)
    image = image.transpose(2, 0, 1).astype(np.uint8).transpose(1, 2, 0)
    q = softmax_unary_crf(scores, image, params=CrfParams())
    keys = np.array([0, *cams.classes], dtype=np.int64)
    return keys[np.argmax(q, axis=0)]


register_config_variants(ClipEs, ("clip_es", "clip_es_crf"), load_clip_es_config)
