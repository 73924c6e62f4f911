"""Fully-connected CRF post-processing (Krähenbühl & Koltun, NeurIPS 2011), shared by adapters.

Reference: NoelShin/reco@5c5e1bc:utils/crf.py, called from eval.py as
``batched_crf(pool, img, torch.log_softmax(scores, dim=1)).argmax(1)``; its constants are
mhamilton723/STEGO@eb4d6b5:src/crf.py's. For one image, with scores [C, h, w] and the normalised
image [3, H, W]:

1. log_softmax over classes (on the scores' device), then on the CPU a bilinear resize to H x W
   (``align_corners=False``), then softmax: the unary probabilities.
2. The image is un-normalised and turned into uint8 BGR the way torchvision's ``to_pil_image``
   does it, by truncation (see :func:`unnormalised_bgr`).
3. pydensecrf: unary ``-log(max(p, 1e-5))``; a Gaussian kernel on position and a bilateral kernel
   on position and colour, both with Potts compatibility and pydensecrf's default symmetric
   normalisation; ``iterations`` mean-field steps; labels are the argmax of Q (ties: first class).

pydensecrf (PyPI ``pydensecrf2``) is the optional ``crf`` extra, imported only when a CRF runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

_MISSING = ("the dense CRF needs the 'crf' extra: pip install 'ovseg-bench[crf]' "
            "(pydensecrf2, builds from source with a C++ compiler)")


@dataclasses.dataclass(frozen=True)
class CrfParams:
    """Mean-field steps and the two kernels' widths and Potts weights."""

    # mhamilton723/STEGO@eb4d6b5:src/crf.py (MAX_ITER, POS_XY_STD, POS_W, Bi_XY_STD, Bi_RGB_STD,
    # Bi_W), copied unchanged in NoelShin/reco@5c5e1bc:utils/crf.py.
    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0


# WeakTr's pseudo-mask CRFs (hustvl/WeakTr@3457ad3:tool/imutils.py crf_inference_label for VOC,
# crf_inference_label_coco for COCO; unary_from_labels with gt_prob 0.7, 10 iterations).
WEAKTR_VOC = CrfParams(iterations=10, gaussian_sxy=4.0, gaussian_compat=3.0, bilateral_sxy=83.0,
                       bilateral_srgb=5.0, bilateral_compat=3.0)
WEAKTR_COCO = CrfParams(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=50.0,
                        bilateral_srgb=5.0, bilateral_compat=10.0)
CRF_PRESETS = {"stego": CrfParams(), "weaktr_voc": WEAKTR_VOC, "weaktr_coco": WEAKTR_COCO}


def _pydensecrf() -> tuple[Any, Any]:
    """pydensecrf's ``densecrf`` and ``utils`` modules, imported lazily: they are an optional extra."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError:
        raise ConfigError(_MISSING) from None
    return densecrf, utils


def require_crf() -> None:
    """Raise :class:`ConfigError` now, before any image is scored, when pydensecrf is missing."""
    _pydensecrf()


def _check_inputs(probs: np.ndarray, image_bgr: np.ndarray) -> None:
    if not isinstance(probs, np.ndarray) or probs.ndim != 3 or probs.dtype != np.float32:
        raise DataError(f"dense CRF probabilities must be a [C, H, W] float32 array, got "
                        f"{getattr(probs, 'shape', type(probs).__name__)} {getattr(probs, 'dtype', '')}")
    expected = (*probs.shape[1:], 3)
    if not isinstance(image_bgr, np.ndarray) or image_bgr.shape != expected or image_bgr.dtype != np.uint8:
        raise DataError(f"dense CRF image must be a {list(expected)} uint8 array (the probabilities' "
                        f"H x W), got {getattr(image_bgr, 'shape', type(image_bgr).__name__)} "
                        f"{getattr(image_bgr, 'dtype', '')}")


def dense_crf(probs: np.ndarray, image_bgr: np.ndarray, *, params: CrfParams = CrfParams()) -> np.ndarray:
    """Mean-field marginals Q of the fully-connected CRF.

    Args:
        probs: [C, H, W] float32 class probabilities (each pixel sums to 1).
        image_bgr: [H, W, 3] uint8 image for the bilateral kernel (ReCo passes BGR; the order does
            not change the result while the three colour widths are equal).
        params: kernel widths, Potts weights and number of mean-field steps.

    Returns:
        [C, H, W] float32 marginals; each pixel sums to 1.
    """
    _check_inputs(probs, image_bgr)
    return softmax_unary_crf(probs, image_bgr, params=params)


def softmax_unary_crf(probs: np.ndarray, image: np.ndarray, *, params: CrfParams) -> np.ndarray:
    """:func:`dense_crf` without the input checks: ``probs`` [C, H, W] in any float dtype (pydensecrf's
    ``unary_from_softmax`` clips and takes the log in that dtype, then casts to float32, as CLIP-ES
    feeds it float16 scores that do not sum to 1) and ``image`` [H, W, 3] uint8."""
    _, utils = _pydensecrf()
    # -log(max(p, 1e-5)), cast to float32: pydensecrf.utils.unary_from_softmax's default clip.
    return _marginals(utils.unary_from_softmax(probs), probs.shape, image, params)


def _marginals(unary: np.ndarray, shape: tuple[int, int, int], image: np.ndarray, params: CrfParams) -> np.ndarray:
    """[C, H, W] float32 mean-field marginals for a [C, H*W] unary: the Gaussian and bilateral Potts
    kernels of ``params`` on ``image`` ([H, W, 3] uint8), ``params.iterations`` steps."""
    densecrf, _ = _pydensecrf()
    c, h, w = shape
    crf = densecrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(c, h, w)


def unnormalised_bgr(image: torch.Tensor, *, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [3, H, W] float RGB -> [H, W, 3] uint8 BGR, exactly as ReCo builds the CRF image.

    ReCo (utils/crf.py) un-normalises channel by channel in float32 (``x * std + mean``, the
    unit-scale statistics of torchvision's ``Normalize``), then ``to_pil_image``, which multiplies
    by 255 and casts to uint8: a truncation, not a rounding (254.9 becomes 254), and then reverses
    the channels to BGR. So the decoded uint8 image cannot stand in: after ImageNet normalisation
    and this round trip, 62, 39 and 36 of the 256 levels of R, G and B come back one lower.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise DataError(f"CRF image must be a [3, H, W] tensor, got "
                        f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    if max(mean) > 1:
        raise ConfigError(f"CRF un-normalisation takes unit-scale statistics (images in [0, 1]), got "
                          f"mean {tuple(mean)}; use torchvision's (0.485, 0.456, 0.406)-style values")
    x = image.detach().to("cpu", torch.float32).clone()
    for channel, m, s in zip(x, mean, std):
        channel.mul_(s).add_(m)      # in place, per channel, with Python floats: ReCo's UnNormalize
    scaled = x.mul_(255)
    # The cast truncates towards zero; outside (-1, 256) it would wrap, so such input is refused.
    low, high = (scaled.min().item(), scaled.max().item()) if scaled.numel() else (0.0, 0.0)
    if not -1 < low <= high < 256:
        raise DataError(f"CRF image un-normalises outside [0, 1] (range {low / 255:.3f} to {high / 255:.3f}); "
                        f"pass the image normalised with these statistics")
    bgr = scaled.to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1]
    return np.ascontiguousarray(bgr)


def crf_labels(scores: torch.Tensor, image: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
               params: CrfParams = CrfParams()) -> torch.Tensor:
    """Dense-CRF label map of one image, as ReCo's evaluation computes it.

    Args:
        scores: [C, h, w] float class scores (logits or similarities), any device.
        image: [3, H, W] float image normalised with ``mean`` / ``std`` (unit scale).
        mean, std: the normalisation's per-channel statistics, RGB order.
        params: the CRF's parameters.

    Returns:
        [H, W] int64 labels on the scores' device; ties go to the lowest class index.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.dtype.is_floating_point:
        raise DataError(f"CRF scores must be a [C, H, W] floating-point tensor, got "
                        f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    bgr = unnormalised_bgr(image, mean=mean, std=std)
    # ReCo: log_softmax where the scores live, then the CPU resize and softmax of utils/crf.py.
    log_probs = torch.log_softmax(scores.detach().float(), dim=0).cpu()
    if log_probs.shape[1:] != bgr.shape[:2]:
        log_probs = F.interpolate(log_probs[None], size=bgr.shape[:2], mode="bilinear",
                                  align_corners=False)[0]
    probs = torch.softmax(log_probs, dim=0).numpy()
    q = torch.from_numpy(dense_crf(probs, bgr, params=params))
    # torch.argmax returns the first maximal index, like Eigen's maxCoeff in pydensecrf's map.
    return q.argmax(0).to(scores.device)


def label_crf(labels: np.ndarray, n_labels: int, image_rgb: np.ndarray, *, params: CrfParams,
              gt_prob: float = 0.7) -> np.ndarray:
    """[H,W] int64 labels after a CRF whose unary comes from hard labels (WeakTr's pseudo masks).

    Args:
        labels: [H, W] integer labels in 0..n_labels-1 (WeakTr: 0 background, k the k-th CAM of
            the image's file order).
        n_labels: the number of labels.
        image_rgb: [H, W, 3] uint8 RGB, as WeakTr passes PIL's array.
        params: kernels and steps (:data:`WEAKTR_VOC`, :data:`WEAKTR_COCO`).
        gt_prob: pydensecrf's ``unary_from_labels`` confidence; no label is "unsure".
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or image_rgb.shape != (*labels.shape, 3) or image_rgb.dtype != np.uint8:
        raise DataError(f"label CRF needs [H, W] labels and an [H, W, 3] uint8 image, got {labels.shape} and "
                        f"{image_rgb.shape} {image_rgb.dtype}")
    _, utils = _pydensecrf()
    unary = utils.unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
    q = _marginals(unary, (n_labels, *labels.shape), image_rgb, params)
    return np.argmax(q, axis=0).astype(np.int64)
