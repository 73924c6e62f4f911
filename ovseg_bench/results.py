"""Result files, schema ``ovseg-bench/result/v1`` (DESIGN.md "Result file").

One indented JSON per (method, dataset, protocol), written to a temporary file and renamed, named
``<method>__<dataset>__<preset>__<fingerprint[:8]>.json``. Key order: schema, identity
(method, dataset, protocol), numbers (metrics, counts, images), circumstances (env, timing) last,
the only part a rerun may change. Per-image counts (for confidence intervals and paired tests)
go to a sidecar ``.per_image.npz`` named in the JSON with its sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import atomic_write
from .errors import DataError

SCHEMA = "ovseg-bench/result/v1"


def result_stem(method: str, dataset: str, preset: str, fingerprint: str) -> str:
    return f"{method}__{dataset}__{preset}__{fingerprint[:8]}"


def image_ids_digest(image_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()


def metrics_block(summary: Any, class_names: tuple[str, ...], per_image: Any = None) -> dict[str, Any]:
    """Percent metrics, per class keyed by name; NaN (class never present nor predicted) -> null.

    ``per_image`` (int64 [images, 4, classes], numpy or CPU tensor, in dataset order) adds
    ``ci95``: the seeded 95% percentile bootstrap interval of mIoU over images
    (:func:`ovseg_bench.stats.ci_block`), omitted with fewer than 2 images.
    """
    per_class = {name: {"iou": _finite(iou), "acc": _finite(acc)}
                 for name, iou, acc in zip(class_names, summary.iou, summary.acc)}
    block: dict[str, Any] = {"mIoU": summary.miou, "aAcc": summary.aacc, "mAcc": summary.macc}
    if per_image is not None:
        from .stats import ci_block  # stats reads result files, so it imports this module

        ci = ci_block(np.asarray(per_image))
        if ci is not None:
            block["ci95"] = ci
    block["per_class"] = per_class
    return block


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def environment(device: str) -> dict[str, Any]:
    import torch

    return {"ovseg_bench": __version__, "git_commit": _git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_result(result: dict[str, Any], out_dir: Path, per_image: np.ndarray, image_ids: list[str]) -> Path:
    """Write the sidecar, then the JSON, each atomically; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result["method"]["name"], result["dataset"]["name"], result["protocol"]["preset"],
                       result["protocol"]["fingerprint"])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, counts=per_image.astype(np.int64), image_ids=np.array(image_ids))
    sidecar = out_dir / f"{stem}.per_image.npz"
    atomic_write(sidecar, buffer.getvalue())
    result["per_image"] = {"file": sidecar.name, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                           "layout": "counts[image, (intersect, union, pred, label), class]"}
    path = out_dir / f"{stem}.json"
    atomic_write(path, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    return path


def read_result(path: Path) -> dict[str, Any]:
    """Load a result file, refusing unknown schemas."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable result file ({exc})") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        found = result.get("schema") if isinstance(result, dict) else None
        raise DataError(f"{path}: schema {found!r} is not {SCHEMA!r}; this ovseg-bench cannot read it")
    return result


def scan_results(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(file path, result) for every result file under ``path``, ordered by relative POSIX path.

    Hidden files and folders (names starting with ".", e.g. the temporary files of atomic
    writes) are skipped, and so are other ovseg-bench documents that may sit beside results
    (a JSON whose ``schema`` is ``ovseg-bench/<kind>/...`` with another kind). Any other JSON is
    read with :func:`~ovseg_bench.results.read_result`, which refuses unknown schemas.
    """
    root = Path(path)
    if root.is_file():
        return [(root, read_result(root))]
    if not root.is_dir():
        raise DataError(f"{root}: no such file or folder; pass the folder `ovseg-bench run --output` wrote")
    files = sorted((p for p in root.rglob("*.json") if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    found = []
    for file in files:
        if any(part.startswith(".") for part in file.relative_to(root).parts) or _other_document(file):
            continue
        found.append((file, read_result(file)))
    return found


def _other_document(path: Path) -> bool:
    """Whether ``path`` is an ovseg-bench JSON of another kind than a result (a baseline, a state)."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8")).get("schema")
    except (OSError, ValueError, AttributeError):
        return False  # read_result will name the problem
    return (isinstance(schema, str) and schema.startswith("ovseg-bench/")
            and schema.split("/")[1] != SCHEMA.split("/")[1])
