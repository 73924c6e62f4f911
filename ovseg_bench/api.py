"""Python API over result files: ``load_results(path)`` -> one pandas row per run.

Everything that reads many result files (the leaderboard, users' notebooks) goes through
:func:`scan_results` and :func:`results_frame`, so a column means the same thing everywhere.
Rows come in the order of the files' paths (relative to the folder, POSIX form), never in the
order the file system lists them.

``import ovseg_bench`` stays light: ``ovseg_bench.load_results`` imports this module (and
pandas) on first use.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from .errors import DataError
from .identity import method_variant, result_config_digest
from .results import scan_results_with_skipped, skipped_note

# Identity, then numbers, then circumstances; ``setting.<key>`` columns follow, sorted.
COLUMNS = (
    "method", "variant", "config_sha256", "architecture", "weights", "random", "dataset", "track", "protocol",
    "fingerprint", "precision", "limit", "mIoU", "aAcc", "mAcc", "oIoU", "mIoU_ci_low", "mIoU_ci_high", "mIoU_ci_half_width",
    "images_seen", "images_expected", "seconds", "images_per_s", "path",
)
SETTING_PREFIX = "setting."


def load_results(path: str | Path) -> pd.DataFrame:
    """All result files under ``path`` (searched recursively; a single result file also works).

    One row per file, columns :data:`COLUMNS` plus the method's settings flattened as
    ``setting.<key>`` (nested mappings as ``setting.<key>.<subkey>``, lists as tuples).
    Metrics are percentages as in the files; ``mIoU_ci_*`` are NaN for results without a
    confidence interval, ``limit`` is <NA> for full-split runs. ``weights`` is the weights'
    short identity (open_clip tag or file name, plus a method checkpoint's file name and sha256
    prefix), ``path`` the file's path as found under ``path``.

    ``variant`` is ``None`` for a run of the method's shipped config, else the config variant's
    short name (the config file's own name, or ``cfg-<8 hex>``); ``config_sha256`` is the sha256
    of the method's effective config (:func:`ovseg_bench.identity.config_digest`; computed from
    the config for older files, whose variant reads ``None``). Rows of one method that differ in
    either are different runs.

    JSON files under a folder that declare no result schema (a baseline, a ``notes.json``) are
    skipped, with one ``UserWarning`` naming them. Raises :class:`~ovseg_bench.errors.DataError`
    naming the file when a result file is not valid JSON, declares a result schema of an unknown
    version or lacks a required field, and when ``path`` does not exist. An existing folder
    without result files gives an empty frame with the columns above.
    """
    found, skipped = scan_results_with_skipped(path)
    note = skipped_note(path, skipped)
    if note:
        warnings.warn(note, stacklevel=2)
    return results_frame(found)


def results_frame(found: list[tuple[Path, dict[str, Any]]]) -> pd.DataFrame:
    """The frame of :func:`load_results` for already-read results (same order)."""
    rows = [_checked_row(result, path) for path, result in found]
    settings = sorted({key for row in rows for key in row if key.startswith(SETTING_PREFIX)})
    frame = pd.DataFrame(rows, columns=[*COLUMNS, *settings])
    for column in ("limit", "images_seen", "images_expected"):
        frame[column] = frame[column].astype("Int64")
    for column in ("mIoU", "aAcc", "mAcc", "oIoU", "mIoU_ci_low", "mIoU_ci_high", "mIoU_ci_half_width", "seconds",
                   "images_per_s"):
        frame[column] = frame[column].astype("float64")
    frame["random"] = frame["random"].astype(bool)
    return frame


def _checked_row(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """:func:`result_row`, naming the file when a required field is missing (a hand-edited file)."""
    try:
        return result_row(result, path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a complete result file (missing or malformed field {exc}); "
                        "rerun it, or move it out of the results folder") from None


def result_row(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """One result as a flat row (see :func:`load_results` for the columns)."""
    method, weights, protocol = result["method"], result["method"].get("weights", {}), result["protocol"]
    metrics, images, timing = result["metrics"], result.get("images", {}), result.get("timing", {})
    low, high, half = ci95(metrics)
    row = {
        "method": method["name"], "variant": method_variant(result), "config_sha256": result_config_digest(result),
        "architecture": weights.get("architecture", "–"),
        "weights": weights_label(weights), "random": bool(weights.get("random", False)),
        "dataset": result["dataset"]["name"], "track": result["dataset"].get("track", "semantic"),
        "protocol": protocol["preset"], "fingerprint": protocol["fingerprint"],
        "precision": protocol.get("precision"), "limit": protocol.get("limit"),
        "mIoU": metrics["mIoU"], "aAcc": metrics.get("aAcc"), "mAcc": metrics.get("mAcc"), "oIoU": metrics.get("oIoU"),
        "mIoU_ci_low": low, "mIoU_ci_high": high, "mIoU_ci_half_width": half,
        "images_seen": images.get("seen"), "images_expected": images.get("expected"),
        "seconds": timing.get("seconds"), "images_per_s": timing.get("images_per_s"), "path": str(path),
    }
    row.update(_flatten(method.get("config", {}), SETTING_PREFIX))
    return row


def ci95(metrics: dict[str, Any]) -> tuple[float, float, float]:
    """(low, high, half width) of the mIoU's 95% interval; NaN each when the result has none."""
    ci = metrics.get("ci95")
    if not isinstance(ci, dict) or not ci.get("mIoU"):
        return math.nan, math.nan, math.nan
    low, high = ci["mIoU"]
    half = ci.get("half_width")
    return float(low), float(high), float(half) if half is not None else (float(high) - float(low)) / 2


def weights_label(weights: dict[str, Any]) -> str:
    """Short, machine-independent name of the weights: ``openai``, ``model.pt + tcl.pth (1a2b3c4d)``.

    Files and URLs are named by their last path component only, so the same weights read the
    same on every machine; a method checkpoint adds its sha256 prefix when recorded.
    """
    parts = []
    if weights.get("pretrained") is not None:
        parts.append(_short(str(weights["pretrained"])))
    if weights.get("checkpoint"):
        digest = weights.get("checkpoint_sha256")
        parts.append(_short(str(weights["checkpoint"])) + (f" ({digest[:8]})" if digest else ""))
    if weights.get("predictions"):
        parts.append(_short(str(weights["predictions"])))
    return " + ".join(parts) or "–"


def _short(value: str) -> str:
    if "://" in value:
        return PurePosixPath(urlparse(value).path).name or value
    if "/" in value or "\\" in value:
        return PurePosixPath(value.replace("\\", "/")).name or value
    return value


def _flatten(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _freeze(value)
    return flat


def _freeze(value: Any) -> Any:
    """Lists -> tuples (recursively), so setting columns can be grouped and pivoted on."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value
