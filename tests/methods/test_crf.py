"""The dense CRF against a brute-force mean-field implementation (float64) of its formula, and the
CRF image against torchvision's own ``to_pil_image``.

The formula, read from pydensecrf2 1.1's sources (densecrf.cpp ``DenseCRF::inference``,
pairwise.cpp ``DenseKernel``, labelcompatibility.cpp ``PottsCompatibility``, densecrf.pyx), for
unary U = -log(max(p, 1e-5)) and kernels k(i, j) = exp(-|f_i - f_j|^2 / 2) on the features
f = (x / sxy, y / sxy) and f = (x / sxy, y / sxy, c0 / srgb, c1 / srgb, c2 / srgb):

    Q <- softmax(-U);  repeat: Q_i(l) <- softmax_l(-U_i(l) + sum_kernels w n_i sum_j k(i, j) n_j Q_j(l))

with n_i = (sum_j k(i, j))^-1/2 (NORMALIZE_SYMMETRIC, the binding's default). Both sums include
j = i: the permutohedral lattice filters a pixel's own value too. Potts' ``out = -w Q`` enters as
``tmp1 -= out``, a reward w for agreeing labels; it equals the textbook penalty w for every other
label, which differs only by a per-pixel constant that the softmax removes.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import sys

import numpy as np
import pytest
import torch

from ovseg_bench.errors import ConfigError, DataError
from ovseg_bench.imaging import IMAGENET_UNIT
from ovseg_bench.methods import crf
from ovseg_bench.methods.crf import CrfParams, crf_labels, dense_crf, require_crf, unnormalised_bgr

MEAN, STD = IMAGENET_UNIT.mean, IMAGENET_UNIT.std
H, W = 5, 6



def _kernel(features: np.ndarray) -> np.ndarray:
    """[N, d] -> [N, N] exp(-|f_i - f_j|^2 / 2), every pair including i = j."""
    return np.exp(-0.5 * ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1))


def mean_field(probs: np.ndarray, image: np.ndarray, params: CrfParams) -> np.ndarray:
    """[C, H, W] probabilities, [H, W, 3] uint8 -> [C, H, W] Q, by the formula in the module docstring."""
    c, h, w = probs.shape
    ys, xs = np.mgrid[0:h, 0:w]
    pos = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    colour = image.reshape(-1, 3).astype(np.float64)
    terms = [(_kernel(pos / params.gaussian_sxy), params.gaussian_compat),
             (_kernel(np.concatenate([pos / params.bilateral_sxy, colour / params.bilateral_srgb], 1)),
              params.bilateral_compat)]
    unary = -np.log(np.clip(probs.reshape(c, -1).astype(np.float64), 1e-5, 1.0))

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=0))
        return e / e.sum(axis=0)

    q = softmax(-unary)
    for _ in range(params.iterations):
        energy = -unary
        for k, compat in terms:
            norm = 1.0 / np.sqrt(k.sum(axis=1))
            energy = energy + compat * norm * ((q * norm) @ k.T)
        q = softmax(energy)
    return q.reshape(c, h, w)


def regions_image(noise: bool) -> np.ndarray:
    """[5, 6, 3] uint8: a blue left half, a green top right, a grey bottom right (BGR order)."""
    image = np.zeros((H, W, 3), np.int64)
    image[:, :3] = (200, 30, 30)
    image[:, 3:] = (40, 180, 20)
    image[3:, 3:] = (230, 230, 230)
    if noise:  # +-2 levels, deterministic: within one colour width (3) of the region's colour
        y, x, ch = np.mgrid[0:H, 0:W, 0:3]
        image += (7 * x + 3 * y + 5 * ch) % 5 - 2
    return image.astype(np.uint8)


def region_probs() -> np.ndarray:
    """[3, 5, 6] float32: each region favours its class (0.6), pixel (1, 1) favours class 2 instead."""
    probs = np.full((3, H, W), 0.2, np.float32)
    probs[0, :, :3] = 0.6
    probs[1, :3, 3:] = 0.6
    probs[2, 3:, 3:] = 0.6
    probs[:, 1, 1] = (0.3, 0.2, 0.5)
    return probs


def wavy_probs() -> np.ndarray:
    """[3, 5, 6] float32 softmax of deterministic, uneven logits with a bias per region."""
    c, y, x = np.mgrid[0:3, 0:H, 0:W]
    logits = 1.2 * np.sin(1.7 * c + 0.9 * y * y + 2.3 * x + 0.4 * c * x * y)
    logits[0, :, :3] += 0.8
    logits[1, :3, 3:] += 0.8
    logits[2, 3:, 3:] += 0.8
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


# Where the permutohedral lattice is exact: a Gaussian width of 0.05 px leaves every pixel alone
# with itself (neighbours are 20 widths away, k = e^-200), and a bilateral width of 10^4 px on a
# piecewise-constant image makes that kernel 1 within a region and e^-400 across regions. The only
# residue is float32 arithmetic and the lattice's interpolation over spatial offsets of <= 5e-4
# widths: measured <= 7e-6, so 1e-4. A 1% change of either Potts weight moves Q by >= 1.5e-3, one
# mean-field step fewer by >= 0.3.
EXACT = CrfParams(gaussian_sxy=0.05, bilateral_sxy=1e4)
EXACT_ATOL = 1e-4


@pytest.mark.parametrize("iterations", [1, 2, 10])
def test_dense_crf_is_the_mean_field_update_where_the_lattice_is_exact(iterations):
    params = dataclasses.replace(EXACT, iterations=iterations)
    probs, image = region_probs(), regions_image(noise=False)
    q = dense_crf(probs, image, params=params)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q, mean_field(probs, image, params), rtol=0, atol=EXACT_ATOL)
    # The pairwise terms flip the odd pixel to its region's class, from the first step on.
    assert probs[:, 1, 1].argmax() == 2 and q[:, 1, 1].argmax() == 0


def test_exact_tolerance_sees_a_one_percent_change_of_either_weight():
    params = dataclasses.replace(EXACT, iterations=1)
    probs, image = region_probs(), regions_image(noise=False)
    q = dense_crf(probs, image, params=params)
    for changed in (dataclasses.replace(params, bilateral_compat=4.04),
                    dataclasses.replace(params, gaussian_compat=3.03)):
        assert np.abs(q - mean_field(probs, image, changed)).max() > 10 * EXACT_ATOL


# With the default (STEGO) widths the lattice approximates each Gaussian (splat to the d + 1
# enclosing lattice vertices, a [1 2 1] blur along each of d + 1 axes, slice: permutohedral.cpp
# seqCompute), and not even symmetrically. Probing one column of the normalised 1-px Gaussian
# kernel on this grid (one step, a single pixel of another class) showed entries off by up to
# 0.035. A message error e per kernel moves the energy by at most (3 + 4) e = 0.25 and Q by a
# quarter of that (the softmax's largest slope): 0.06 after one step, so 0.08. Measured here:
# 0.071 after one step, 0.007 after ten (Q saturates). Without the bilateral or Gaussian term the
# formula is >= 0.15 away, so the tolerance still tells the terms apart.
DEFAULT_ATOL = 0.08


@pytest.mark.parametrize("iterations", [1, 10])
def test_dense_crf_with_stego_parameters_follows_the_formula_within_lattice_error(iterations):
    params = CrfParams(iterations=iterations)
    probs, image = wavy_probs(), regions_image(noise=True)
    q = dense_crf(probs, image, params=params)
    expected = mean_field(probs, image, params)
    np.testing.assert_allclose(q, expected, rtol=0, atol=DEFAULT_ATOL)
    # Labels must agree wherever the formula's top two classes are further apart than the error.
    top2 = np.sort(expected, axis=0)[-2:]
    confident = top2[1] - top2[0] > 2 * DEFAULT_ATOL
    assert confident.sum() >= (30 if iterations == 10 else 20)
    np.testing.assert_array_equal(q.argmax(0)[confident], expected.argmax(0)[confident])
    flipped = confident & (q.argmax(0) != probs.argmax(0))
    assert flipped.sum() >= 5  # the pairwise terms change labels, not just probabilities
    for dropped in ("bilateral_compat", "gaussian_compat"):
        without = mean_field(probs, image, dataclasses.replace(params, **{dropped: 0.0}))
        assert np.abs(q - without).max() > DEFAULT_ATOL


def test_crf_params_are_stego_constants():
    assert CrfParams() == CrfParams(iterations=10, gaussian_sxy=1, gaussian_compat=3,
                                    bilateral_sxy=67, bilateral_srgb=3, bilateral_compat=4)


def _normalised(rgb01: list[list[float]]) -> torch.Tensor:
    """Unit-scale RGB pixels of one row -> [3, 1, N] normalised float32, torchvision's way."""
    x = torch.tensor(rgb01, dtype=torch.float32).T[:, None, :]
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_unnormalised_bgr_truncates_and_reverses_channels():
    # x = 0 un-normalises to the mean: 255 * (0.485, 0.456, 0.406) = (123.675, 116.28, 103.53),
    # truncated to (123, 116, 103); rounding would give 124 and 104. x = 1: mean + std, times 255
    # = (182.07, 173.4, 160.905) -> (182, 173, 160), rounding 161.
    x = torch.zeros(3, 1, 2)
    x[:, 0, 1] = 1.0
    bgr = unnormalised_bgr(x, mean=MEAN, std=STD)
    assert bgr.dtype == np.uint8 and bgr.shape == (1, 2, 3) and bgr.flags.c_contiguous
    np.testing.assert_array_equal(bgr[0], [[103, 116, 123], [160, 173, 182]])
    # Pure red, green, blue land in the last, middle and first BGR channel.
    primaries = unnormalised_bgr(_normalised([[1, 0, 0], [0, 1, 0], [0, 0, 1]]), mean=MEAN, std=STD)[0]
    assert (primaries[:, ::-1] >= 254).tolist() == np.eye(3, dtype=bool).tolist()


def test_unnormalised_bgr_equals_recos_to_pil_image_path():
    import torchvision.transforms.functional as VF

    rng = np.random.default_rng(0)
    rgb = torch.from_numpy(rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8))
    rgb[0, :, 0, :] = torch.arange(256, dtype=torch.uint8).view(16, 16)[:3]  # every level once
    x = IMAGENET_UNIT.apply(rgb)[0]
    unnorm = x.clone()
    for channel, m, s in zip(unnorm, MEAN, STD):  # ReCo's UnNormalize (from STEGO's utils.py)
        channel.mul_(s).add_(m)
    expected = np.ascontiguousarray(np.array(VF.to_pil_image(unnorm))[:, :, ::-1])
    np.testing.assert_array_equal(unnormalised_bgr(x, mean=MEAN, std=STD), expected)


def test_unnormalised_bgr_refuses_what_it_cannot_represent():
    with pytest.raises(DataError, match="outside"):
        unnormalised_bgr(torch.full((3, 2, 2), 10.0), mean=MEAN, std=STD)
    with pytest.raises(ConfigError, match="unit-scale"):
        unnormalised_bgr(torch.zeros(3, 2, 2), mean=(123.675, 116.28, 103.53), std=STD)
    with pytest.raises(DataError, match=r"\[3, H, W\]"):
        unnormalised_bgr(torch.zeros(1, 2, 2), mean=MEAN, std=STD)


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    for call in (require_crf, lambda: dense_crf(region_probs(), regions_image(noise=False))):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "'crf' extra" in message
        assert "pip install 'ovseg-bench[crf]'" in message and "pydensecrf2" in message


def test_dense_crf_refuses_mismatched_inputs():
    with pytest.raises(DataError, match="float32"):
        dense_crf(region_probs().astype(np.float64), regions_image(noise=False))
    with pytest.raises(DataError, match=r"\[5, 6, 3\] uint8"):
        dense_crf(region_probs(), regions_image(noise=False)[:, :5])


def _scores_and_image() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is region_probs, and the normalised image whose CRF image is regions_image."""
    scores = torch.from_numpy(np.log(region_probs()))
    rgb = torch.from_numpy(regions_image(noise=False)[:, :, ::-1].copy()).permute(2, 0, 1)
    return scores, IMAGENET_UNIT.apply(rgb[None])[0]


def test_crf_labels_end_to_end():
    scores, image = _scores_and_image()
    bgr = unnormalised_bgr(image, mean=MEAN, std=STD)
    labels = crf_labels(scores, image, mean=MEAN, std=STD, params=EXACT)
    assert labels.dtype == torch.int64 and labels.shape == (H, W) and labels.device == scores.device
    q = mean_field(torch.softmax(torch.log_softmax(scores, 0), 0).numpy(), bgr, EXACT)
    np.testing.assert_array_equal(labels.numpy(), q.argmax(0))
    assert labels[1, 1] == 0  # flipped from the unary's class 2


def test_crf_labels_ties_take_the_first_class():
    scores, image = _scores_and_image()
    # Two identical class rows stay bit-identical through the CRF: the argmax must pick the first.
    tied = torch.cat([scores[:1], scores[:1], scores[1:]])
    labels = crf_labels(tied, image, mean=MEAN, std=STD, params=EXACT)
    assert (labels == 1).sum() == 0 and (labels == 0).any()
    q = dense_crf(torch.softmax(tied, 0).numpy(), unnormalised_bgr(image, mean=MEAN, std=STD), params=EXACT)
    assert np.array_equal(q[0], q[1])


def _spy_on_dense_crf(monkeypatch) -> list:
    """Replace crf.dense_crf by a recorder of its arguments that returns the probabilities as Q."""
    calls = []

    def record(probs, image_bgr, *, params=CrfParams()):
        calls.append((probs, image_bgr, params))
        return probs
    monkeypatch.setattr(crf, "dense_crf", record)
    return calls


def test_crf_labels_feed_recos_unary_and_image_to_the_crf(monkeypatch):
    calls = _spy_on_dense_crf(monkeypatch)
    scores, image = _scores_and_image()
    scores = scores * 3.0  # not yet log-probabilities: the log_softmax must happen
    params = CrfParams(iterations=3)
    crf_labels(scores, image, mean=MEAN, std=STD, params=params)
    (probs, bgr, passed), = calls
    assert probs.dtype == np.float32 and passed == params
    np.testing.assert_array_equal(probs, torch.softmax(torch.log_softmax(scores, 0), 0).numpy())
    np.testing.assert_array_equal(bgr, unnormalised_bgr(image, mean=MEAN, std=STD))


def test_crf_labels_resize_log_probabilities_of_low_resolution_scores(monkeypatch):
    calls = _spy_on_dense_crf(monkeypatch)
    scores, image = _scores_and_image()
    low = 3.0 * torch.nn.functional.interpolate(scores[None], size=(3, 3), mode="bilinear")[0]
    labels = crf_labels(low, image, mean=MEAN, std=STD)
    assert labels.shape == (H, W) and labels.dtype == torch.int64
    # ReCo resizes the log-probabilities (eval.py's log_softmax, then utils/crf.py's interpolate).
    resized = torch.nn.functional.interpolate(torch.log_softmax(low, 0)[None], size=(H, W), mode="bilinear",
                                              align_corners=False)[0]
    np.testing.assert_array_equal(calls[0][0], torch.softmax(resized, 0).numpy())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crf_labels_return_on_the_scores_device():
    scores, image = _scores_and_image()
    labels = crf_labels(scores.cuda(), image.cuda(), mean=MEAN, std=STD, params=EXACT)
    assert labels.device == scores.cuda().device
    np.testing.assert_array_equal(labels.cpu().numpy(),
                                  crf_labels(scores, image, mean=MEAN, std=STD, params=EXACT).numpy())


def test_pydensecrf_is_imported_only_inside_a_function():
    tree = ast.parse(inspect.getsource(crf))
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top_level for alias in node.names]
    names += [node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)]
    assert not [name for name in names if "pydensecrf" in name]


def test_label_crf_equals_the_softmax_crf_on_unary_from_labels_probabilities():
    from ovseg_bench.methods.crf import WEAKTR_VOC, label_crf

    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[:, W // 2:] = 200                  # two flat halves
    labels = np.zeros((H, W), dtype=np.int64)
    labels[:, W // 2:] = 1
    labels[2, 1] = labels[1, W - 2] = 2      # isolated labels the pairwise terms should remove
    # pydensecrf's unary_from_labels with gt_prob 0.7 and no unsure label: p = 0.7 at the label,
    # 0.3 / (n - 1) elsewhere, unary -log(p): the same energy dense_crf builds from these probabilities.
    probs = np.full((3, H, W), 0.3 / 2, dtype=np.float32)
    np.put_along_axis(probs, labels[None], 0.7, axis=0)
    want = dense_crf(probs, image, params=WEAKTR_VOC).argmax(axis=0)
    got = label_crf(labels, 3, image, params=WEAKTR_VOC)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert not np.array_equal(got, labels)  # the pairwise terms changed labels: the CRF ran
