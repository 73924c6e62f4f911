"""Sliding windows exactly as mmseg's ``slide_inference``, batched across images.

Grid (``EncoderDecoder.slide_inference`` in open-mmlab/mmsegmentation@v1.2.2:
mmseg/models/segmentors/encoder_decoder.py; 0.x has the same grid): h_grids =
max(H - crop + stride - 1, 0) // stride + 1; the last row/column is shifted back to end at the
border; windows are only smaller than the crop when the image is. Stitching adds window scores
into a float32 canvas from zeros in row-major window order (rows outer, columns inner) and
divides by the per-pixel count, as ``slide_inference`` does, so the average equals the reference's.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


class Window(NamedTuple):
    y1: int
    y2: int
    x1: int
    x2: int

    @property
    def size(self) -> tuple[int, int]:
        return self.y2 - self.y1, self.x2 - self.x1


def window_grid(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """mmseg's slide grid for an image of ``height`` x ``width``, row-major."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            windows.append(Window(max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


def image_windows(height: int, width: int, mode: str, crop: int, stride: int) -> list[Window]:
    """Windows for one image: the slide grid, or the whole image (``mode == "whole"``)."""
    if mode == "whole":
        return [Window(0, height, 0, width)]
    return window_grid(height, width, crop, stride)


@dataclasses.dataclass
class Canvas:
    """Count-averaged stitching of one image's window scores."""

    windows: list[Window]
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None
    filled: int = 0

    def add(self, window: Window, scores: torch.Tensor, image_size: tuple[int, int]) -> None:
        """Add ``scores`` [Q,h,w] (float) of ``window``; windows must arrive in grid order."""
        if self.total is None:
            self.total = scores.new_zeros((scores.shape[0], *image_size), dtype=torch.float32)
            self.count = scores.new_zeros(image_size, dtype=torch.float32)
        self.total[:, window.y1:window.y2, window.x1:window.x2] += scores.float()
        self.count[window.y1:window.y2, window.x1:window.x2] += 1
        self.filled += 1

    @property
    def complete(self) -> bool:
        return self.filled == len(self.windows)

    def average(self) -> torch.Tensor:
        """[Q,H,W] float32 average; every pixel is covered by the grid's construction."""
        return self.total / self.count
