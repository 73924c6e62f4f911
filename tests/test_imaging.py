"""Decoding, resizing, label reduction and normalisation against mmcv 2.1.0 / mmseg 1.2.2.

As mmcv 2.1.0 (mmcv/image/io.py, mmcv/image/geometric.py) and mmseg 1.2.2's loaders run them:
images decode exactly as ``cv2.imdecode`` (EXIF applied), labels as
``np.array(PIL.Image.open(...))``, sizes follow mmcv's ``rescale_size`` rounding and pixels
cv2's uint8 bilinear; ImageNet statistics are applied as mmcv's
``imnormalize`` (multiply by a float64 reciprocal) and CLIP statistics as mmseg 1.x's
``SegDataPreProcessor`` (float32 divide).
"""
from __future__ import annotations

import ast
import typing
from numbers import Number
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ovseg_bench.imaging import (
    CLIP,
    IMAGENET,
    IMAGENET_UNIT,
    NORMALISATIONS,
    decode_image,
    decode_label,
    reduce_zero_label,
    rescale_size,
    resize_image,
)

mmcv_image = pytest.importorskip("mmcv.image")
LONG = 2048


def mmcv_size(width: int, height: int, short: int) -> tuple[int, int]:
    return mmcv_image.rescale_size((width, height), (LONG, short), return_scale=False)


# --------------------------------------------------------------------------- rescale_size

# (w, h, S, expected (new_w, new_h)) fixed by hand from mmcv's rescale_size and the datasets' sizes.
KNOWN_SIZES = [
    (645, 480, 336, (451, 336)),     # mmcv divides first: 451; multiply-first gives 452
    (2048, 1024, 448, (896, 448)),   # Cityscapes at 448
    (2048, 1024, 336, (672, 336)),
    (500, 375, 448, (597, 448)),     # a typical VOC / COCO landscape
    (375, 500, 448, (448, 597)),     # the same, portrait
    (5, 2, 1, (3, 1)),               # w*f = 2.5 exactly: floor(x + 0.5) = 3, half-even would give 2
    (10000, 100, 448, (2048, 20)),   # 2048 cap binds: f = 0.2048
    (100, 10000, 448, (20, 2048)),
    (3000, 500, 448, (2048, 341)),   # aspect 6 > 2048/448: short side < S
    (1, 1, 448, (448, 448)),         # tiny images are upscaled
    (3, 7, 336, (336, 784)),
]


@pytest.mark.parametrize("width,height,short,expected", KNOWN_SIZES)
def test_rescale_size_known(width, height, short, expected):
    assert rescale_size(width, height, short, LONG) == expected
    assert mmcv_size(width, height, short) == expected


def _size_sweep() -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(1234)
    shorts = (224, 320, 336, 384, 448, 512, 640, 1024, 2048)
    cases = [(645, 480, 336), (480, 645, 336), (2048, 1024, 448), (1024, 2048, 448)]
    # every small size (tiny and upscaled) at a few scales
    cases += [(w, h, s) for w in range(1, 41) for h in range(1, 41) for s in (1, 7, 336, 448)]
    # typical dataset sizes, landscape and portrait
    for _ in range(4000):
        w, h = (int(v) for v in rng.integers(100, 2600, size=2))
        cases.append((w, h, int(rng.choice(shorts))))
    # huge images and extreme aspect ratios where the 2048 cap binds
    for _ in range(2000):
        long_ = int(rng.integers(1000, 30000))
        short_ = int(rng.integers(1, max(2, long_ // 3)))
        w, h = (long_, short_) if rng.random() < 0.5 else (short_, long_)
        cases.append((w, h, int(rng.choice(shorts))))
    # every width for the heights where one-division-first rounding matters
    cases += [(w, h, s) for w in range(300, 700) for h in (375, 480, 500) for s in (336, 448)]
    return cases


def test_rescale_size_matches_mmcv_sweep():
    cases = _size_sweep()
    mismatches = [(w, h, s, rescale_size(w, h, s, LONG), mmcv_size(w, h, s))
                  for w, h, s in cases if rescale_size(w, h, s, LONG) != mmcv_size(w, h, s)]
    assert not mismatches, mismatches[:10]
    # the sweep really contains sizes where the 2048 cap binds and where multiply-first differs
    capped = [(w, h, s) for w, h, s in cases if LONG / max(w, h) < s / min(w, h)]
    assert len(capped) > 100
    multiply_first = [(w, h, s) for w, h, s in cases
                      if int(w * s / min(w, h) + 0.5) != rescale_size(w, h, s, LONG)[0]
                      and LONG / max(w, h) >= s / min(w, h)]
    assert (645, 480, 336) in multiply_first


def test_rescale_size_order_of_scale_irrelevant():
    for w, h, s in [(645, 480, 336), (2048, 1024, 448), (10000, 100, 448), (17, 9, 3000)]:
        assert rescale_size(w, h, s, LONG) == rescale_size(w, h, LONG, s)
        assert rescale_size(w, h, s, LONG) == mmcv_image.rescale_size((w, h), (s, LONG))


# --------------------------------------------------------------------------- resize_image

RESIZE_CASES = [
    ((480, 645), 336),    # down-scale, the 645x480 size
    ((375, 500), 448),    # up-scale
    ((500, 375), 448),    # portrait up-scale
    ((1024, 2048), 448),  # Cityscapes down-scale by 2 (only the size is Cityscapes')
    ((17, 23), 336),      # tiny, large up-scale
    ((40, 900), 448),     # the 2048 cap binds: up-scale long side to 2048
    ((333, 1), 64),       # one-pixel-wide
]


@pytest.mark.parametrize("shape,short", RESIZE_CASES)
def test_resize_image_bit_identical_to_mmcv_imrescale(shape, short):
    rng = np.random.default_rng(shape[0] * 7919 + shape[1])
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ours = resize_image(image, short, LONG)
    ref = mmcv_image.imrescale(image, (LONG, short), interpolation="bilinear", backend="cv2")
    assert ours.dtype == np.uint8 and ref.dtype == np.uint8
    assert ours.shape == ref.shape
    assert ours.shape[:2] == rescale_size(shape[1], shape[0], short, LONG)[::-1]
    np.testing.assert_array_equal(ours, ref)


def test_resize_image_smooth_content_and_no_antialias():
    """Also on a smooth image (where antialiasing would show) and a 4x down-scale."""
    yy, xx = np.mgrid[0:1200, 0:1600]
    image = np.stack([(xx * 7) % 256, (yy * 3) % 256, ((xx + yy) // 5) % 256], -1).astype(np.uint8)
    ours = resize_image(image, 300, LONG)
    ref = mmcv_image.imrescale(image, (LONG, 300), interpolation="bilinear", backend="cv2")
    np.testing.assert_array_equal(ours, ref)
    antialiased = cv2.resize(image, ours.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert not np.array_equal(ours, antialiased)


# --------------------------------------------------------------------------- decode_image


def mmcv_decode(path: Path) -> np.ndarray | None:
    data = path.read_bytes()
    return mmcv_image.imfrombytes(data, flag="color", channel_order="bgr", backend="cv2")


def assert_same_decode(ours: np.ndarray | None, ref: np.ndarray | None) -> None:
    if ref is None:
        assert ours is None
        return
    assert ours is not None
    assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3
    np.testing.assert_array_equal(ours, ref)


def _gradient(height: int, width: int) -> np.ndarray:
    """An RGB image with a distinct top-left corner, so orientation is visible."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                    np.full_like(xx, 128)], -1).astype(np.uint8)
    rgb[: height // 5, : width // 5] = (255, 255, 255)
    return rgb


def test_decode_image_jpeg_and_png_equal_mmcv(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    smooth = _gradient(48, 64)[..., ::-1].copy()
    files = []
    for name, image in (("noise", noise), ("smooth", smooth)):
        for ext, params in ((".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]), (".png", [])):
            path = tmp_path / f"{name}{ext}"
            assert cv2.imwrite(str(path), image, params)
            files.append(path)
    Image.fromarray(smooth[..., ::-1]).save(tmp_path / "pil.jpg", quality=85)
    Image.fromarray(smooth[..., ::-1]).save(tmp_path / "pil.png")
    rgba = np.dstack([smooth[..., ::-1], rng.integers(0, 256, size=smooth.shape[:2], dtype=np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert cv2.imwrite(str(tmp_path / "deep.png"), (smooth.astype(np.uint16) * 257 + 3))
    files += [tmp_path / n for n in ("pil.jpg", "pil.png", "rgba.png", "deep.png")]
    for path in files:
        ours = decode_image(path)
        assert_same_decode(ours, mmcv_decode(path))
        assert ours.shape[:2] == smooth.shape[:2] or ours.shape[:2] == noise.shape[:2]
    # lossless files decode to exactly what was written (BGR order)
    np.testing.assert_array_equal(decode_image(tmp_path / "noise.png"), noise)
    np.testing.assert_array_equal(decode_image(tmp_path / "pil.png"), smooth)
    np.testing.assert_array_equal(decode_image(tmp_path / "rgba.png"), smooth)  # alpha dropped


def test_decode_image_applies_exif_orientation(tmp_path):
    rgb = _gradient(24, 40)  # H=24, W=40
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "o6.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(rgb).save(tmp_path / "o1.jpg", quality=95)
    with Image.open(tmp_path / "o6.jpg") as img:
        assert img.getexif().get(0x0112) == 6
        plain = np.array(img.convert("RGB"))
        transposed = np.array(ImageOps.exif_transpose(img).convert("RGB"))

    ours = decode_image(tmp_path / "o6.jpg")
    assert ours.shape == (40, 24, 3)            # post-EXIF shape: H and W swapped
    assert plain.shape == (24, 40, 3)           # PIL without exif_transpose does not rotate
    assert_same_decode(ours, mmcv_decode(tmp_path / "o6.jpg"))
    upright = decode_image(tmp_path / "o1.jpg")
    assert upright.shape == (24, 40, 3)
    np.testing.assert_array_equal(ours, np.rot90(upright, k=-1))  # clockwise
    # the white corner moved from top-left to top-right
    assert ours[0, -1].min() > 200
    assert max(ours[0, 0].min(), ours[-1, 0].min(), ours[-1, -1].min()) < 200
    # Pillow with exif_transpose agrees (ordinary YCbCr JPEG) up to decoder rounding
    assert np.abs(transposed[..., ::-1].astype(int) - ours.astype(int)).max() <= 1


def test_decode_image_grayscale_jpeg_gives_three_equal_channels(tmp_path):
    gray = _gradient(30, 50)[..., 0]
    path = tmp_path / "gray.jpg"
    assert cv2.imwrite(str(path), gray)
    with Image.open(path) as img:
        assert img.mode == "L"
    ours = decode_image(path)
    assert ours.shape == (30, 50, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours[..., 0], ours[..., 1]) and np.array_equal(ours[..., 1], ours[..., 2])
    assert_same_decode(ours, mmcv_decode(path))
    Image.fromarray(gray, mode="L").save(tmp_path / "gray_pil.jpg")
    assert_same_decode(decode_image(tmp_path / "gray_pil.jpg"), mmcv_decode(tmp_path / "gray_pil.jpg"))


def test_decode_image_undecodable_returns_none(tmp_path):
    rng = np.random.default_rng(5)
    good = tmp_path / "good.jpg"
    assert cv2.imwrite(str(good), rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    data = good.read_bytes()
    for cut in (2, 10, 100):  # cut inside the headers: nothing to decode
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(data[:cut])
        assert decode_image(path) is None
    # cut inside the entropy-coded data: whatever cv2 (and so mmcv) does, we do the same
    half = tmp_path / "half.jpg"
    half.write_bytes(data[: len(data) // 2])
    assert_same_decode(decode_image(half), mmcv_decode(half))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(rng.integers(0, 256, size=600, dtype=np.uint8).tobytes())
    assert decode_image(garbage) is None
    text = tmp_path / "text.png"
    text.write_text("not an image\n")
    assert decode_image(text) is None
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert decode_image(empty) is None


# --------------------------------------------------------------------------- decode_label


def test_decode_label_palette_png_gives_indices(tmp_path):
    rng = np.random.default_rng(3)
    indices = rng.choice(np.r_[0:21, 255], size=(20, 30)).astype(np.uint8)
    indices[0, :22] = np.r_[0:21, 255]
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1:21] = rng.integers(1, 256, size=(20, 3))
    palette[255] = (224, 224, 192)
    img = Image.fromarray(indices, mode="P")
    img.putpalette(palette.ravel().tolist())
    path = tmp_path / "voc.png"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "P"
    label = decode_label(path)
    assert label.dtype == np.uint8 and label.shape == (20, 30)
    np.testing.assert_array_equal(label, indices)
    # what cv2 would give instead: colours, not indices
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 3


def test_decode_label_l_png_unchanged(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "l.png"
    Image.fromarray(values, mode="L").save(path)
    label = decode_label(path)
    assert label.dtype == np.uint8 and label.shape == (16, 16)
    np.testing.assert_array_equal(label, values)


def test_decode_label_ignores_exif(tmp_path):
    values = np.tile(np.arange(40, dtype=np.uint8), (24, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "exif.png"
    Image.fromarray(values, mode="L").save(path, exif=exif.tobytes())
    np.testing.assert_array_equal(decode_label(path), values)


# --------------------------------------------------------------------------- reduce_zero_label


def mmseg_reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg 1.x LoadAnnotations: gt[gt == 0] = 255; gt = gt - 1; gt[gt == 254] = 255."""
    gt = label.copy()
    gt[gt == 0] = 255
    gt = gt - 1
    gt[gt == 254] = 255
    return gt


def test_reduce_zero_label_all_values():
    label = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ours = reduce_zero_label(label)
    assert ours.dtype == np.uint8 and ours.shape == label.shape
    np.testing.assert_array_equal(ours, mmseg_reduce_zero_label(label))
    flat = ours.ravel()
    assert flat[0] == 255 and flat[1] == 0 and flat[150] == 149 and flat[254] == 253 and flat[255] == 255
    np.testing.assert_array_equal(label, np.arange(256, dtype=np.uint8).reshape(16, 16))  # input intact


# --------------------------------------------------------------------------- normalisation


def _all_values_rgb() -> np.ndarray:
    """HxWx3 uint8 RGB holding every (value, channel) pair plus random pixels."""
    rng = np.random.default_rng(11)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2).reshape(16, 16, 3)
    noise = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    return np.concatenate([ramp, noise, ramp[::-1, ::-1, ::-1]], axis=0)


def _apply(norm, rgb: np.ndarray) -> np.ndarray:
    out = norm.apply(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    assert out.dtype == torch.float32 and out.shape == (1, 3, *rgb.shape[:2])
    return out[0].permute(1, 2, 0).numpy()


def test_imagenet_matches_mmcv_imnormalize_bit_for_bit():
    """mmseg 0.x ``Normalize`` stores mean/std as float32 arrays and calls ``imnormalize``:
    cv2.subtract in float32, then cv2.multiply by ``1 / np.float64(std)`` -- a scalar multiply
    that OpenCV runs in float64 and rounds once to float32."""
    rgb = _all_values_rgb()
    mean32 = np.array(IMAGENET.mean, dtype=np.float32)
    std32 = np.array(IMAGENET.std, dtype=np.float32)
    ref = mmcv_image.imnormalize(rgb.astype(np.float32), mean32, std32, to_rgb=False)
    assert ref.dtype == np.float32
    # what mmcv computes, spelled out (pins down the float64 multiply)
    spelled = ((rgb.astype(np.float32) - mean32).astype(np.float64)
               * (1.0 / std32.astype(np.float64))).astype(np.float32)
    np.testing.assert_array_equal(ref, spelled)
    ours = _apply(IMAGENET, rgb)
    diff = ours != ref
    assert not diff.any(), (
        f"{int(diff.sum())} of {diff.size} values differ from mmcv.imnormalize "
        f"(max {np.abs(ours - ref).max():.3g}); e.g. value {rgb[diff][0]}: {ours[diff][0]!r} vs {ref[diff][0]!r}")


def test_imagenet_matches_mmcv_normalize_transform_on_bgr():
    """The pipeline transform itself: BGR image, to_rgb=True (TCL's img_norm_cfg)."""
    transforms = pytest.importorskip("mmcv.transforms")
    rgb = _all_values_rgb()
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    results = transforms.Normalize(mean=list(IMAGENET.mean), std=list(IMAGENET.std),
                                   to_rgb=True)(dict(img=bgr))
    np.testing.assert_array_equal(_apply(IMAGENET, rgb), results["img"])


def _seg_data_preprocessor_class():
    """mmseg 1.2.2's SegDataPreProcessor, compiled from its source (its package import needs mmcv ops)."""
    pytest.importorskip("mmseg")
    base = pytest.importorskip("mmengine.model")
    import mmseg

    path = Path(mmseg.__file__).parent / "models" / "data_preprocessor.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegDataPreProcessor")
    cls.decorator_list = []
    namespace = {"torch": torch, "BaseDataPreprocessor": base.BaseDataPreprocessor, "Number": Number,
                 "stack_batch": None, **{k: getattr(typing, k) for k in ("Any", "Dict", "List",
                                                                         "Optional", "Sequence")}}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["SegDataPreProcessor"]


def test_clip_matches_mmseg_seg_data_preprocessor():
    rgb = _all_values_rgb()
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).permute(2, 0, 1)
    cls = _seg_data_preprocessor_class()
    # the SCLIP-family config: CLIP statistics x 255, bgr_to_rgb on the BGR-loaded image
    pre = cls(mean=list(CLIP.mean), std=list(CLIP.std), bgr_to_rgb=True)
    ref = pre(dict(inputs=[bgr], data_samples=None), training=False)["inputs"]
    assert ref.dtype == torch.float32 and ref.shape == (1, 3, *rgb.shape[:2])
    ours = CLIP.apply(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    assert torch.equal(ours, ref)
    # and the formula it runs
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    formula = (x - torch.tensor(CLIP.mean).view(1, 3, 1, 1)) / torch.tensor(CLIP.std).view(1, 3, 1, 1)
    assert torch.equal(ours, formula)


def test_mmcv_imnormalize_equals_float32_division():
    """A fact about the reference, not about us: OpenCV runs a multiply by a scalar in float64
    (arithm_op: muldiv scalars keep CV_64F, work type CV_64F), and rounding float32 x times the
    float64 reciprocal of a float32 std to float32 gives the correctly rounded float32 quotient.
    So mmcv's reciprocal multiply equals a plain float32 ``(x - mean) / std``, while a float32
    multiply by ``float32(1 / std)`` does not."""
    rgb = _all_values_rgb()
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    for norm in (IMAGENET, CLIP):
        mean32 = np.array(norm.mean, dtype=np.float32)
        std32 = np.array(norm.std, dtype=np.float32)
        ref = mmcv_image.imnormalize(rgb.astype(np.float32), mean32, std32, to_rgb=False)
        centred = x - torch.from_numpy(mean32).view(1, 3, 1, 1)
        divided = centred / torch.from_numpy(std32).view(1, 3, 1, 1)
        assert torch.equal(divided[0].permute(1, 2, 0), torch.from_numpy(ref))
        multiplied32 = centred * (1.0 / torch.from_numpy(std32).double()).float().view(1, 3, 1, 1)
        assert not torch.equal(multiplied32[0].permute(1, 2, 0), torch.from_numpy(ref))


def test_normalisations_registry():
    assert NORMALISATIONS == {"imagenet": IMAGENET, "clip": CLIP, "imagenet_unit": IMAGENET_UNIT}
    assert IMAGENET_UNIT.unit and IMAGENET_UNIT.mean == (0.485, 0.456, 0.406)
    assert IMAGENET.mean == (123.675, 116.28, 103.53) and IMAGENET.std == (58.395, 57.12, 57.375)
    assert CLIP.mean == (122.771, 116.746, 104.094) and CLIP.std == (68.501, 66.632, 70.323)


def test_normalisation_keeps_batch_and_does_not_touch_input():
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, size=(3, 3, 9, 7), dtype=np.uint8))
    before = images.clone()
    for norm in (IMAGENET, CLIP):
        out = norm.apply(images)
        assert out.shape == images.shape and out.dtype == torch.float32
        for i in range(3):
            assert torch.equal(out[i:i + 1], norm.apply(images[i:i + 1]))
    assert torch.equal(images, before)

