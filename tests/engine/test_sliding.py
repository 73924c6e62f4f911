"""Sliding windows and stitching against mmseg 1.2.2's own ``EncoderDecoder.slide_inference``.

The method is compiled from the installed mmseg source (its module cannot be imported without
mmcv's compiled ops) and run with a stand-in ``self`` that records the crops it is given
(mmseg/models/segmentors/encoder_decoder.py).
"""
from __future__ import annotations

import ast
import itertools
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_bench.engine.sliding import Canvas, Window, image_windows, window_grid


def _mmseg_slide_inference():
    mmseg = pytest.importorskip("mmseg")
    path = Path(mmseg.__file__).parent / "models" / "segmentors" / "encoder_decoder.py"
    tree = ast.parse(path.read_text())
    func = next(node for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.name == "slide_inference")
    namespace = {"torch": torch, "F": F, "Tensor": torch.Tensor, "List": typing.List,
                 "resize": None}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["slide_inference"]


@pytest.fixture(scope="module")
def slide_inference():
    return _mmseg_slide_inference()


class Recorder:
    """Stand-in EncoderDecoder: records crop boxes, returns given or zero scores of crop size."""

    def __init__(self, crop: int, stride: int, out_channels: int, scores=None):
        self.test_cfg = SimpleNamespace(crop_size=(crop, crop), stride=(stride, stride))
        self.out_channels = out_channels
        self.boxes: list[Window] = []
        self.scores = scores  # callable(index, box) -> [1, C, h, w] float32

    def encode_decode(self, crop_img: torch.Tensor, batch_img_metas: list[dict]) -> torch.Tensor:
        rows, cols = crop_img[0, 0], crop_img[0, 1]
        y1, x1 = int(rows[0, 0]), int(cols[0, 0])
        y2, x2 = int(rows[-1, 0]) + 1, int(cols[0, -1]) + 1
        box = Window(y1, y2, x1, x2)
        # the crop is exactly the coordinate block [y1:y2, x1:x2]
        assert crop_img.shape[-2:] == (y2 - y1, x2 - x1)
        assert torch.equal(rows, torch.arange(y1, y2, dtype=torch.float32)[:, None].expand_as(rows))
        assert torch.equal(cols, torch.arange(x1, x2, dtype=torch.float32)[None].expand_as(cols))
        assert tuple(batch_img_metas[0]["img_shape"]) == (y2 - y1, x2 - x1)
        index = len(self.boxes)
        self.boxes.append(box)
        if self.scores is None:
            return crop_img.new_zeros((1, self.out_channels, y2 - y1, x2 - x1))
        return self.scores(index, box)


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """[1, 3, H, W]: channel 0 = row index, channel 1 = column index."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None].expand(height, width)
    return torch.stack([rows, cols, torch.zeros(height, width)])[None].contiguous()


def mmseg_boxes(slide_inference, height: int, width: int, crop: int, stride: int) -> list[Window]:
    recorder = Recorder(crop, stride, out_channels=1)
    slide_inference(recorder, coordinate_image(height, width), [{}])
    return recorder.boxes


def _grid_cases() -> list[tuple[int, int, int, int]]:
    cases = set()
    # small crops: every interesting side length, both sides independently
    for crop, stride in ((8, 3), (8, 5), (8, 8), (5, 1), (7, 6), (6, 4), (1, 1), (2, 1), (3, 2)):
        sides = {1, 2, crop - 1, crop, crop + 1, crop + stride - 1, crop + stride, crop + stride + 1,
                 2 * crop, 2 * crop + 1, 3 * stride + crop - 1, 3 * stride + crop, 4 * crop + 3}
        sides = sorted(v for v in sides if v >= 1)
        cases |= {(h, w, crop, stride) for h in sides for w in sides}
    # the benchmark's crops: smaller than, equal to, one off and just past one stride; rows and
    # columns are computed independently, so each side is swept against a thin/short other side
    for crop, stride in ((224, 112), (336, 112), (336, 224), (448, 224), (448, 448), (512, 341)):
        sides = (1, crop - 1, crop, crop + 1, crop + stride - 1, crop + stride, crop + stride + 1,
                 2 * crop + 1)
        cases |= {(h, w, crop, stride) for h in sides for w in (1, crop - 1)}
        cases |= {(h, w, crop, stride) for w in sides for h in (2, crop + 1)}
    # dataset-like sizes after the resize (landscape, portrait, Cityscapes, extreme aspect, 645x480 at 336)
    cases |= {(448, 597, 448, 224), (597, 448, 448, 224), (448, 896, 448, 224), (20, 2048, 448, 224),
              (2048, 20, 448, 224), (341, 2048, 448, 224), (336, 451, 336, 112), (336, 451, 224, 112)}
    return sorted(cases)


GRID_CASES = _grid_cases()


def test_window_grid_equals_mmseg_slide_inference(slide_inference):
    assert len(GRID_CASES) > 1000
    for height, width, crop, stride in GRID_CASES:
        expected = mmseg_boxes(slide_inference, height, width, crop, stride)
        ours = window_grid(height, width, crop, stride)
        assert ours == expected, (height, width, crop, stride)
        assert image_windows(height, width, "slide", crop, stride) == expected


def test_window_grid_known_layout():
    # 448x597 at crop 448 / stride 224: one row, two columns, the last shifted back to the border
    assert window_grid(448, 597, 448, 224) == [Window(0, 448, 0, 448), Window(0, 448, 149, 597)]
    # smaller than the crop in one side: windows shrink to the image in that side only
    assert window_grid(20, 700, 448, 224) == [Window(0, 20, 0, 448), Window(0, 20, 224, 672),
                                              Window(0, 20, 252, 700)]
    # smaller than the crop in both sides: a single whole-image window
    assert window_grid(100, 300, 448, 224) == [Window(0, 100, 0, 300)]
    # row-major: row index outer, column inner
    grid = window_grid(20, 20, 8, 6)
    assert [(w.y1, w.x1) for w in grid] == [(y, x) for y in (0, 6, 12) for x in (0, 6, 12)]


@pytest.mark.parametrize("height,width,crop,stride,channels", [
    (448, 597, 448, 224, 3),     # overlapping columns
    (37, 53, 16, 5, 4),          # many overlaps, uneven counts
    (21, 40, 16, 16, 2),         # stride == crop, last row/column overlaps
    (9, 30, 16, 5, 3),           # smaller than the crop in height
    (10, 12, 16, 8, 5),          # smaller than the crop in both sides
    (64, 64, 16, 3, 1),          # counts up to 36
])
def test_canvas_average_equals_mmseg_bit_for_bit(slide_inference, height, width, crop, stride, channels):
    generator = torch.Generator().manual_seed(height * 1000 + width)
    windows = window_grid(height, width, crop, stride)
    scores = [torch.randn((channels, *w.size), generator=generator) * 7 for w in windows]
    assert all(s.dtype == torch.float32 for s in scores)

    def give(index: int, box: Window) -> torch.Tensor:
        assert box == windows[index]
        return scores[index][None].clone()

    recorder = Recorder(crop, stride, channels, scores=give)
    ref = slide_inference(recorder, coordinate_image(height, width), [{}])
    assert ref.shape == (1, channels, height, width) and ref.dtype == torch.float32
    assert len(recorder.boxes) == len(windows)

    canvas = Canvas(windows)
    assert not canvas.complete
    for window, window_scores in zip(windows, scores):
        canvas.add(window, window_scores, (height, width))
    assert canvas.complete
    ours = canvas.average()
    assert ours.shape == (channels, height, width) and ours.dtype == torch.float32
    assert torch.equal(ours, ref[0])
    # the count matrix is mmseg's too
    count = torch.zeros(height, width)
    for w in windows:
        count[w.y1:w.y2, w.x1:w.x2] += 1
    assert torch.equal(canvas.count, count)


def test_canvas_accumulates_half_precision_scores_in_float32():
    windows = window_grid(10, 30, 16, 7)
    generator = torch.Generator().manual_seed(0)
    scores32 = [torch.randn((2, *w.size), generator=generator) for w in windows]
    canvas16, canvas32 = Canvas(windows), Canvas(windows)
    for window, s in zip(windows, scores32):
        canvas16.add(window, s.half(), (10, 30))
        canvas32.add(window, s.half().float(), (10, 30))
    assert canvas16.total.dtype == torch.float32
    assert torch.equal(canvas16.average(), canvas32.average())


def test_image_windows_whole_mode():
    for height, width in ((1, 1), (448, 597), (2048, 20), (20, 2048), (1000, 1000)):
        assert image_windows(height, width, "whole", 448, 224) == [Window(0, height, 0, width)]
        assert image_windows(height, width, "whole", 448, 224)[0].size == (height, width)


def _coverage_sizes(crop: int, stride: int) -> set[tuple[int, int]]:
    sides = (1, 2, stride, crop - 1, crop, crop + 1, crop + stride - 1, crop + stride, 2 * crop + 3,
             5 * crop - 1)
    sides = [v for v in sides if v >= 1]
    if crop <= 16:
        return set(itertools.product(sides, repeat=2))
    # large crops: each side swept against a short other side (keeps the test fast)
    return {(h, w) for h in sides for w in (1, crop - 1, crop + 1)} | \
           {(h, w) for w in sides for h in (2, crop, crop + stride + 1)}


def test_every_pixel_covered():
    for crop, stride in ((448, 224), (336, 112), (224, 224), (16, 5), (16, 16), (9, 4), (4, 3)):
        for height, width in sorted(_coverage_sizes(crop, stride)):
            count = np.zeros((height, width), dtype=np.int32)
            for w in window_grid(height, width, crop, stride):
                assert 0 <= w.y1 < w.y2 <= height and 0 <= w.x1 < w.x2 <= width
                count[w.y1:w.y2, w.x1:w.x2] += 1
            assert int(count.min()) >= 1, (height, width, crop, stride)


def test_all_windows_of_an_image_share_the_clipped_crop_size():
    rng = np.random.default_rng(7)
    cases = [(h, w, c, s) for h, w, c, s in GRID_CASES]
    for _ in range(300):
        crop = int(rng.integers(1, 64))
        stride = int(rng.integers(1, crop + 1))
        cases.append((int(rng.integers(1, 200)), int(rng.integers(1, 200)), crop, stride))
    for height, width, crop, stride in cases:
        windows = window_grid(height, width, crop, stride)
        expected = (min(crop, height), min(crop, width))
        assert {w.size for w in windows} == {expected}, (height, width, crop, stride)
        rows = max(height - crop + stride - 1, 0) // stride + 1
        cols = max(width - crop + stride - 1, 0) // stride + 1
        assert len(windows) == rows * cols
