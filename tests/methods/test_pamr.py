"""PAMR against a straightforward per-pixel loop implementation (float64) of 1-stage-wseg's PAMR."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg_bench.errors import ConfigError, DataError
from ovseg_bench.methods.pamr import PAMR, SCLIP_PAMR, TCL_PAMR


def bilinear_align_corners(mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[C, h, w] -> [C, out_h, out_w], bilinear with align_corners=True, by explicit loops."""
    c, h, w = mask.shape
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
            top = (1 - fx) * mask[:, y0, x0] + fx * mask[:, y0, x1]
            bottom = (1 - fx) * mask[:, y1, x0] + fx * mask[:, y1, x1]
            out[:, i, j] = (1 - fy) * top + fy * bottom
    return out


def reference_pamr(image: np.ndarray, mask: np.ndarray, num_iter: int, dilations) -> np.ndarray:
    """image [K, H, W], mask [C, h, w] -> [C, H, W]; out-of-image reads clamp to the border."""
    k, H, W = image.shape
    mask = bilinear_align_corners(mask.astype(np.float64), H, W)
    image = image.astype(np.float64)

    def at(a: np.ndarray, y: int, x: int) -> np.ndarray:
        return a[:, min(max(y, 0), H - 1), min(max(x, 0), W - 1)]

    window = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    neighbours = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                  if (dy, dx) != (0, 0)]
    weights = np.zeros((len(neighbours), H, W))
    for y in range(H):
        for x in range(W):
            samples = np.stack([at(image, y + oy, x + ox) for oy, ox in window], axis=1)
            std = samples.std(axis=1, ddof=1)
            scale = 1e-8 + 0.1 * std
            logits = np.array([np.mean(-np.abs(image[:, y, x] - at(image, y + oy, x + ox)) / scale)
                               for oy, ox in neighbours])
            e = np.exp(logits - logits.max())
            weights[:, y, x] = e / e.sum()
    for _ in range(num_iter):
        new = np.zeros_like(mask)
        for y in range(H):
            for x in range(W):
                for j, (oy, ox) in enumerate(neighbours):
                    new[:, y, x] += weights[j, y, x] * at(mask, y + oy, x + ox)
        mask = new
    return mask


def random_inputs(seed: int, b: int, h: int, w: int, c: int, mh: int, mw: int):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, h, w, generator=g)
    mask = torch.randn(b, c, mh, mw, generator=g)
    return image, mask


@pytest.mark.parametrize("dilations", [(1, 2), (8, 16), TCL_PAMR["dilations"]])
@pytest.mark.parametrize("mask_size", [(9, 11), (3, 4)])
def test_matches_loop_reference(dilations, mask_size):
    image, mask = random_inputs(0, 1, 9, 11, 2, *mask_size)
    got = PAMR(num_iter=10, dilations=dilations)(image, mask)
    expected = reference_pamr(image[0].numpy(), mask[0].numpy(), 10, dilations)
    assert got.shape == (1, 2, 9, 11) and got.dtype == torch.float32
    # float32 over 10 iterations of up to 48-term sums: a few ulps of drift.
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dilations", [(1, 2), (8, 16), TCL_PAMR["dilations"]])
def test_algorithm_exact_in_float64(dilations):
    """The same steps run in float64 agree with the loops to rounding: no algorithmic slack."""
    image, mask = random_inputs(6, 1, 9, 11, 2, 3, 4)
    pamr = PAMR(num_iter=10, dilations=dilations)
    resized = torch.nn.functional.interpolate(mask.double(), size=(9, 11), mode="bilinear",
                                              align_corners=True)
    got = pamr._propagate(resized, pamr.affinity(image.double()))
    expected = reference_pamr(image[0].numpy(), mask[0].numpy(), 10, dilations)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_constant_channel_and_single_iteration():
    """std = 0 in one channel (division by 1e-8 of zero differences) is handled like the reference."""
    image, mask = random_inputs(1, 1, 6, 7, 3, 6, 7)
    image[:, 1] = 0.5
    got = PAMR(num_iter=1, dilations=(1, 3))(image, mask)
    expected = reference_pamr(image[0].numpy(), mask[0].numpy(), 1, (1, 3))
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_batch_equals_single_calls():
    image, mask = random_inputs(2, 2, 12, 10, 4, 3, 3)
    pamr = PAMR(**SCLIP_PAMR)
    batched = pamr(image, mask)
    singles = torch.cat([pamr(image[i:i + 1], mask[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, singles, rtol=1e-6, atol=1e-7)


def test_low_resolution_mask_shape_and_no_grad():
    image, mask = random_inputs(3, 2, 20, 24, 5, 5, 6)
    mask.requires_grad_(True)
    out = PAMR(**TCL_PAMR)(image, mask)
    assert out.shape == (2, 5, 20, 24) and out.dtype == torch.float32
    assert not out.requires_grad


def test_class_chunking_is_exact(monkeypatch):
    import ovseg_bench.methods.pamr as pamr_module

    image, mask = random_inputs(4, 1, 8, 9, 7, 8, 9)
    whole = PAMR(num_iter=3, dilations=(1, 2))(image, mask)
    monkeypatch.setattr(pamr_module, "_MAX_GATHER_ELEMENTS", 1)   # one class at a time
    chunked = PAMR(num_iter=3, dilations=(1, 2))(image, mask)
    assert torch.equal(whole, chunked)


def test_zero_iterations_is_the_resize():
    image, mask = random_inputs(5, 1, 9, 11, 2, 3, 4)
    out = PAMR(num_iter=0, dilations=(1,))(image, mask)
    np.testing.assert_allclose(out[0].numpy(), bilinear_align_corners(mask[0].double().numpy(), 9, 11),
                               rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        PAMR(dilations=())
    with pytest.raises(ConfigError):
        PAMR(dilations=(0, 2))
    with pytest.raises(ConfigError):
        PAMR(num_iter=-1)
    pamr = PAMR()
    with pytest.raises(DataError):
        pamr(torch.zeros(3, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(DataError):
        pamr(torch.zeros(1, 3, 4, 4), torch.zeros(2, 2, 4, 4))
    with pytest.raises(DataError):
        pamr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("dilations", [(8, 16), TCL_PAMR["dilations"]])
@pytest.mark.parametrize("shape", [(1, 19, 37, 53), (2, 3, 64, 48)])
def test_propagation_equals_the_references_stack_product_and_sum_to_the_bit(dilations, shape):
    """The buffered, in-place propagation against 1-stage-wseg's expression, written out here."""
    pamr = PAMR(num_iter=3, dilations=dilations)
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.randn(*shape, generator=g)
    weights = torch.softmax(torch.randn(shape[0], 1, len(pamr._neighbours), *shape[-2:], generator=g), dim=2)
    expected, pad = mask, max(dilations)
    for _ in range(3):
        padded = torch.nn.functional.pad(expected, [pad] * 4, mode="replicate")
        h, w = shape[-2:]
        shifted = torch.stack([padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]
                               for dy, dx in pamr._neighbours], dim=2)
        expected = (shifted * weights).sum(dim=2)
    assert torch.equal(pamr._propagate(mask, weights), expected)
