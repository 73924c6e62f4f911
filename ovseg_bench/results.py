"""Result files, schema ``ovseg-bench/result/v2`` (DESIGN.md "Result file"); v1 files read as v2.

One indented JSON per run, written to a temporary file and renamed, named by :class:`ResultKey`:
``<method>[@<variant>]__<dataset>__<preset>__<fingerprint[:8]>__<run[:8]>.json``, where ``run``
digests the weights identity and the effective method config, so runs with other weights, another
backbone or another ``--config`` never share a file, and rerunning the same run replaces its own
file. Key order: schema, identity
(method, dataset, protocol), numbers (metrics, counts, images), circumstances (env, timing) last,
the only part a rerun may change. Per-image counts (for confidence intervals and paired tests)
go to a sidecar ``.per_image.npz`` named in the JSON with its sha256.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import atomic_write
from .errors import DataError

SCHEMA = "ovseg-bench/result/v2"
SCHEMA_V1 = "ovseg-bench/result/v1"  # read and upgraded in memory (read_result)
V1_METRIC = "mmseg-iou/int64"        # v1 knew the semantic track only


@dataclasses.dataclass(frozen=True)
class ResultKey:
    """What names a result file: one file per distinct run of a method on a dataset under a protocol."""

    method: str
    variant: str | None
    dataset: str
    preset: str
    fingerprint: str
    run: str  # run_digest(weights, config)

    @property
    def stem(self) -> str:
        method = self.method + (f"@{_file_safe(self.variant)}" if self.variant else "")
        return f"{method}__{self.dataset}__{self.preset}__{self.fingerprint[:8]}__{self.run[:8]}"

    @classmethod
    def of(cls, result: dict[str, Any]) -> "ResultKey":
        method = result["method"]
        return cls(method["name"], method.get("variant"), result["dataset"]["name"], result["protocol"]["preset"],
                   result["protocol"]["fingerprint"], run_digest(method.get("weights", {}), method.get("config", {})))


def run_digest(weights: dict[str, Any], config: dict[str, Any]) -> str:
    """sha256 of the weights identity and the effective method config (canonical JSON)."""
    from .identity import config_digest

    return config_digest({"weights": weights, "config": config})


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "variant"


def image_ids_digest(image_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()


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


def write_result(result: dict[str, Any], out_dir: Path, per_image: np.ndarray, image_ids: list[str], *,
                 layout: str = "counts[image, (intersect, union, pred, label), class]") -> Path:
    """Write the sidecar (per-item rows, described by ``layout``), then the JSON, each atomically;
    returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ResultKey.of(result).stem
    buffer = io.BytesIO()
    np.savez_compressed(buffer, counts=per_image.astype(np.int64), image_ids=np.array(image_ids))
    sidecar = out_dir / f"{stem}.per_image.npz"
    atomic_write(sidecar, buffer.getvalue())
    result["per_image"] = {"file": sidecar.name, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                           "layout": layout}
    path = out_dir / f"{stem}.json"
    atomic_write(path, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    return path


def read_result(path: Path) -> dict[str, Any]:
    """Load a result file, refusing unknown schemas; a v1 file comes back upgraded to v2."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable result file ({exc})") from None
    found = result.get("schema") if isinstance(result, dict) else None
    if found == SCHEMA_V1:
        return upgrade_v1(result, path)
    if found != SCHEMA:
        raise DataError(f"{path}: schema {found!r} is not {SCHEMA!r} (or {SCHEMA_V1!r}); this ovseg-bench "
                        "cannot read it")
    return result


def upgrade_v1(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """A v1 result as v2: its fingerprint recomputed per dataset from the settings it recorded.

    v1 hashed the whole preset, so its fingerprints moved whenever any card's override did; v2
    hashes the dataset's own effective settings, the metric, the precision and the image subset,
    all of which v1 files record. The old value is kept as ``protocol.fingerprint_v1``.
    """
    from .engine.protocol import DatasetSettings, fingerprint
    from .yamlconf import from_mapping

    try:
        protocol = result["protocol"]
        settings = from_mapping(DatasetSettings, protocol["settings"], f"{path}: protocol.settings")
        new = fingerprint(settings, metric=V1_METRIC, precision=protocol.get("precision", "fp32"),
                          limit=protocol.get("limit"))
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: a v1 result without its protocol settings ({exc!r}); rerun it") from None
    upgraded = {**result, "schema": SCHEMA,
                "protocol": {**protocol, "fingerprint": new, "fingerprint_v1": protocol.get("fingerprint"),
                             "requested": protocol.get("requested", protocol.get("preset"))}}
    return upgraded


def scan_results(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(file path, result) for every result file under ``path``; see :func:`scan_results_with_skipped`."""
    return scan_results_with_skipped(path)[0]


def scan_results_with_skipped(path: str | Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """(results, skipped): every result file under ``path`` and every other JSON passed over.

    ``results`` holds (file path, result) ordered by relative POSIX path. Hidden files and folders
    (names starting with ".", e.g. the temporary files of atomic writes) are ignored silently.
    A readable JSON that does not declare a result schema (``schema`` missing, or not
    ``ovseg-bench/result/...``: a baseline, someone's ``notes.json``) is not ours to read: it
    goes to ``skipped`` (same order) for the caller to report, see :func:`skipped_note`. Every
    other ``*.json`` is read with :func:`read_result`, which fails naming the file when it is not
    valid JSON or declares a result schema of another version. A ``path`` that is a file is
    always read as a result.
    """
    root = Path(path)
    if root.is_file():
        return [(root, read_result(root))], []
    if not root.is_dir():
        raise DataError(f"{root}: no such file or folder; pass the folder `ovseg-bench run --output` wrote")
    files = sorted((p for p in root.rglob("*.json") if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    found, skipped = [], []
    for file in files:
        if any(part.startswith(".") for part in file.relative_to(root).parts):
            continue
        if _other_document(file):
            skipped.append(file)
        else:
            found.append((file, read_result(file)))
    return found, skipped


def skipped_note(root: str | Path, skipped: list[Path], *, shown: int = 5) -> str | None:
    """The one line readers print about JSON files they passed over; ``None`` when there are none.

    ``skipped N JSON file(s) that are not result files under DIR: a.json, b.json`` (paths
    relative to ``root``, the first ``shown`` of them).
    """
    if not skipped:
        return None
    root = Path(root)
    names = [p.relative_to(root).as_posix() if root.is_dir() else p.name for p in skipped]
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"skipped {len(names)} JSON file(s) that are not result files under {root}: {listed}"


def _other_document(path: Path) -> bool:
    """Whether ``path`` is valid JSON that declares no result schema (another document kind).

    Invalid JSON is not "another document": :func:`read_result` names the file and fails, since
    a half-written or damaged result must never vanish from a table silently.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # read_result will name the problem
    schema = data.get("schema") if isinstance(data, dict) else None
    result_kind = SCHEMA.rsplit("/", 1)[0] + "/"  # any version: read_result refuses unknown ones, naming the file
    return not (isinstance(schema, str) and schema.startswith(result_kind))
