"""The counts of every track, together (DESIGN.md "Tracks as first-class parts").

- :mod:`.base`: the :class:`Counts` protocol every track's counts follow, and the kind registry
  saved states are read back through;
- :mod:`.semantic`: mmseg's IoUMetric (mIoU, aAcc, mAcc) with exact int64 confusion counts;
- :mod:`.referring`: per-sample int64 intersection and union (oIoU, mIoU, precision@IoU);
- :mod:`.curve`: one confusion matrix per background threshold of a grid (pseudo-mask mIoU curve).
"""
from __future__ import annotations

from .base import COUNTS_KINDS, Counts, counts_from_state, register_counts
from .curve import CurveSummary, ThresholdCurveCounts, threshold_grid, threshold_label
from .referring import PRECISION_THRESHOLDS, ReferringCounts, ReferringSummary, summary_of_rows
from .semantic import COUNT_NAMES, IoUCounts, MetricSummary, mmseg_float32_totals, summarize

__all__ = ["COUNTS_KINDS", "COUNT_NAMES", "Counts", "CurveSummary", "IoUCounts", "MetricSummary",
           "PRECISION_THRESHOLDS", "ReferringCounts", "ReferringSummary", "ThresholdCurveCounts",
           "counts_from_state", "mmseg_float32_totals", "register_counts", "summarize", "summary_of_rows",
           "threshold_grid", "threshold_label"]
