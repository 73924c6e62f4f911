"""Bootstrap statistics over images, from a result's per-image counts (issue 3, item 2).

Everything here starts from the sidecar's int64 counts ``[images, 4, classes]`` (axis 1 =
intersect, union, pred, label; see :mod:`ovseg_bench.results`). A bootstrap resample draws
``images`` image indices with replacement; its mIoU follows the metric's rule (IoU_c = I_c / U_c
over the resample's summed counts, classes with U_c = 0 left out of the mean, as ``np.nanmean``
leaves mmseg's NaN IoUs out). Ratios are taken in float64 here: the interval is reported to two
decimals and float32 would only add noise below that.

Vectorised: the index matrix ``[resamples, images]`` becomes a weight matrix (how often each
image was drawn in each resample) and one matrix product sums the counts of every resample.
Counts are integers well below 2^53, so the float64 product is exact. Seeded with
``numpy.random.default_rng(seed)``; the same seed, resample count and image count give the same
indices, so two results on the same images can share them (the paired bootstrap).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .datasets.cards import ALL_BENCHMARKS
from .errors import ConfigError, DataError
from .identity import method_variant
from .results import image_ids_digest, read_result, skipped_note

CI_LEVEL = 95.0
CI_METHOD = "percentile bootstrap over images"
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
# Index/weight matrix elements per block (2 MiB each as int64 or float64; a block holds four
# such arrays): the bootstrap's memory stays under ~8 MiB at any number of images, beyond the
# per-image counts themselves. Block boundaries change neither the draws nor the result.
_BLOCK_ELEMENTS = 1 << 18


@dataclasses.dataclass(frozen=True)
class Interval:
    """A percentile interval in percent points, rounded to 2 decimals."""

    low: float
    high: float

    @property
    def half_width(self) -> float:
        return round((self.high - self.low) / 2, 2)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mIoU(B) - mIoU(A) on the same images: point value and bootstrap interval, in points."""

    difference: float
    interval: Interval
    resamples: int
    seed: int

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return self.interval.low > 0 or self.interval.high < 0


def _check_counts(counts: Any, what: str = "per-image counts") -> np.ndarray:
    array = np.asarray(counts)
    if array.ndim != 3 or array.shape[1] != 4:
        raise DataError(f"{what} must have shape [images, 4, classes], got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{what} must be integer counts, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_resamples(resamples: int) -> int:
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ConfigError(f"--resamples must be a positive integer, got {resamples!r}")
    return int(resamples)


def _block_rows(num_images: int) -> int:
    """Resamples handled at once, so a block's index and weight matrices stay small."""
    return max(1, _BLOCK_ELEMENTS // max(num_images, 1))


def _index_blocks(num_images: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """int64 [k, num_images] blocks of resample indices, in order, from one seeded generator."""
    rng = np.random.default_rng(seed)
    block = _block_rows(num_images)
    for start in range(0, _check_resamples(resamples), block):
        yield rng.integers(0, num_images, size=(min(block, resamples - start), num_images), dtype=np.int64)


def resample_indices(num_images: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """int64 [resamples, num_images]: image indices drawn with replacement, row r = resample r.

    The same draws, block by block, drive :func:`bootstrap_ci` and :func:`paired_bootstrap`.
    """
    return np.concatenate(list(_index_blocks(num_images, resamples, seed)))


def miou_from_totals(intersect: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Fractional mIoU over the last axis: mean of I/U over classes with U > 0 (NaN if none).

    Args:
        intersect, union: [..., classes] totals (any real dtype, non-negative).
    """
    present = union > 0
    iou = np.divide(intersect, union, out=np.zeros(np.broadcast(intersect, union).shape), where=present)
    num = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num > 0, iou.sum(-1) / np.maximum(num, 1), np.nan)


def bootstrap_mious(counts: Any, indices: np.ndarray) -> np.ndarray:
    """float64 [resamples]: the fractional mIoU of each resample (row of ``indices``).

    Args:
        counts: int [images, 4, classes] per-image counts.
        indices: int [resamples, images], e.g. from :func:`resample_indices`.
    """
    iu = _intersect_union(_check_counts(counts))
    block = _block_rows(iu.shape[0])
    return np.concatenate([_block_mious(iu, indices[start:start + block])
                           for start in range(0, indices.shape[0], block)] or [np.empty(0)])


def _intersect_union(counts: np.ndarray) -> np.ndarray:
    """float64 [images, 2 * classes]: intersect then union, the only counts the mIoU needs."""
    return counts[:, :2, :].reshape(counts.shape[0], 2 * counts.shape[2]).astype(np.float64)


def _block_mious(iu: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """mIoU of each row of ``rows`` (int [k, images]) by one weight matrix and one matrix product."""
    num_images, num_classes = iu.shape[0], iu.shape[1] // 2
    offsets = np.arange(rows.shape[0])[:, None] * num_images
    # weights[r, i] = how often image i was drawn in resample r.
    weights = np.bincount((rows + offsets).ravel(), minlength=rows.size).reshape(rows.shape)
    totals = weights.astype(np.float64) @ iu
    return miou_from_totals(totals[:, :num_classes], totals[:, num_classes:])


def _bootstrap(counts: list[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    """Per-resample mIoU of each counts array, all on the same resampled images."""
    ius = [_intersect_union(c) for c in counts]
    per_block = [[_block_mious(iu, rows) for iu in ius] for rows in _index_blocks(ius[0].shape[0], resamples, seed)]
    return [np.concatenate([block[k] for block in per_block]) for k in range(len(ius))]


def _percentile_interval(values: np.ndarray, scale: float = 100.0) -> Interval:
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise DataError("no bootstrap resample had a class with a non-empty union; nothing to estimate")
    tail = (100.0 - CI_LEVEL) / 2
    low, high = np.percentile(values * scale, [tail, 100.0 - tail])
    return Interval(round(float(low), 2), round(float(high), 2))


def bootstrap_ci(counts: Any, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Interval | None:
    """95% percentile bootstrap interval of mIoU (percent, 2 dp); None with fewer than 2 images."""
    counts = _check_counts(counts)
    if counts.shape[0] < 2:
        return None
    return _percentile_interval(_bootstrap([counts], resamples, seed)[0])


def ci_block(counts: Any, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, Any] | None:
    """The result file's ``metrics.ci95`` entry, or None when it cannot be estimated (< 2 images)."""
    interval = bootstrap_ci(counts, resamples=resamples, seed=seed)
    if interval is None:
        return None
    return {"mIoU": [interval.low, interval.high], "half_width": interval.half_width,
            "resamples": int(resamples), "seed": int(seed), "method": CI_METHOD}


def _referring_resamples(rows: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mIoU, oIoU) fractions of each resample of referring rows (int [samples, (I, U)])."""
    rows = np.asarray(rows, dtype=np.float64)
    n = rows.shape[0]
    # GLCF's rule (Seonghoon-Yu/Zero-shot-RIS@75ff6ed utils.py Compute_IoU): U = 0 scores 0.
    iou = np.divide(rows[:, 0], rows[:, 1], out=np.zeros(n), where=rows[:, 1] > 0)
    mious, oious = [], []
    for block in _index_blocks(n, resamples, seed):
        offsets = np.arange(block.shape[0])[:, None] * n
        weights = np.bincount((block + offsets).ravel(), minlength=block.size).reshape(block.shape).astype(np.float64)
        totals = weights @ rows
        mious.append(weights @ iou / n)
        with np.errstate(invalid="ignore", divide="ignore"):
            oious.append(np.where(totals[:, 1] > 0, totals[:, 0] / totals[:, 1], np.nan))
    return np.concatenate(mious), np.concatenate(oious)


def referring_ci_block(rows: Any, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, Any] | None:
    """The referring result's ``metrics.ci95``: 95% percentile intervals of mIoU and oIoU over
    samples (the same resampled samples for both); None with fewer than 2 samples."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != 2:
        raise ValueError(f"referring rows must be [samples, 2], got {rows.shape}")
    if rows.shape[0] < 2:
        return None
    mious, oious = _referring_resamples(rows, resamples, seed)
    miou, oiou = _percentile_interval(mious), _percentile_interval(oious)
    return {"mIoU": [miou.low, miou.high], "half_width": miou.half_width, "oIoU": [oiou.low, oiou.high],
            "resamples": int(resamples), "seed": int(seed), "method": "percentile bootstrap over samples"}


def paired_bootstrap(a_counts: Any, b_counts: Any, *, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> PairedDifference:
    """mIoU(B) - mIoU(A) with a 95% interval, resampling the SAME images for both.

    Args:
        a_counts, b_counts: int [images, 4, classes] of two results on the same images in the
            same order (the caller checks the image ids).
    """
    a, b = _check_counts(a_counts, "counts of A"), _check_counts(b_counts, "counts of B")
    if a.shape != b.shape:
        raise DataError(f"paired bootstrap needs counts of the same shape, got A {a.shape} and B {b.shape}")
    if a.shape[0] < 2:
        raise DataError(f"a paired bootstrap needs at least 2 images, these results have {a.shape[0]}")
    mious_a, mious_b = _bootstrap([a, b], resamples, seed)
    diffs = mious_b - mious_a
    a_sum, b_sum = a.sum(0).astype(np.float64), b.sum(0).astype(np.float64)
    point = (miou_from_totals(b_sum[0], b_sum[1]) - miou_from_totals(a_sum[0], a_sum[1])) * 100
    return PairedDifference(round(float(point), 2), _percentile_interval(diffs), int(resamples), int(seed))


# ----------------------------------------------------------------------------- result blocks

def metrics_block(summary: Any, class_names: tuple[str, ...], per_image: Any = None) -> dict[str, Any]:
    """Percent metrics, per class keyed by name; NaN (class never present nor predicted) -> null.

    ``per_image`` (int64 [images, 4, classes], numpy or CPU tensor, in dataset order) adds
    ``ci95``: the seeded 95% percentile bootstrap interval of mIoU over images
    (:func:`ci_block`), omitted with fewer than 2 images.
    """
    per_class = {name: {"iou": _finite(iou), "acc": _finite(acc)}
                 for name, iou, acc in zip(class_names, summary.iou, summary.acc)}
    block: dict[str, Any] = {"mIoU": summary.miou, "aAcc": summary.aacc, "mAcc": summary.macc}
    if per_image is not None:
        ci = ci_block(np.asarray(per_image))
        if ci is not None:
            block["ci95"] = ci
    block["per_class"] = per_class
    return block


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


# ----------------------------------------------------------------------------- result files

@dataclasses.dataclass(frozen=True)
class LoadedResult:
    path: Path
    result: dict[str, Any]
    counts: np.ndarray        # int64 [images, 4, classes]
    image_ids: tuple[str, ...]


def load_with_per_image(path: Path) -> LoadedResult:
    """A result file and its verified sidecar (sha256, ids digest, shape, totals)."""
    path = Path(path)
    result = read_result(path)
    info = result.get("per_image")
    if not isinstance(info, dict) or "file" not in info or "sha256" not in info:
        raise DataError(f"{path}: no per-image counts recorded; rerun it with this ovseg-bench to get them")
    sidecar = path.parent / info["file"]
    try:
        blob = sidecar.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: its per-image counts {sidecar} cannot be read ({exc.strerror}); "
                        "keep the .per_image.npz next to its result file") from None
    found = hashlib.sha256(blob).hexdigest()
    if found != info["sha256"]:
        raise DataError(f"{sidecar}: sha256 {found[:12]}... does not match {info['sha256'][:12]}... recorded in "
                        f"{path.name}; the sidecar was changed or belongs to another run")
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        rows, ids = np.asarray(npz["counts"]), tuple(str(i) for i in npz["image_ids"])
    if _is_referring(result):
        counts = _check_referring_rows(rows, f"{sidecar} counts")
        _check_referring_sidecar(path, result, counts, ids)
    else:
        counts = _check_counts(rows, f"{sidecar} counts")
        _check_sidecar(path, result, counts, ids)
    return LoadedResult(path, result, counts, ids)


def _is_referring(result: dict[str, Any]) -> bool:
    return result["dataset"].get("track") == "referring"


def _check_referring_rows(rows: np.ndarray, what: str) -> np.ndarray:
    if rows.ndim != 2 or rows.shape[1] != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise DataError(f"{what} must be integer (intersect, union) rows [samples, 2], got {rows.dtype} {rows.shape}")
    return rows.astype(np.int64, copy=False)


def _check_referring_sidecar(path: Path, result: dict[str, Any], rows: np.ndarray, ids: tuple[str, ...]) -> None:
    if rows.shape[0] != result["images"]["seen"] or len(ids) != rows.shape[0]:
        raise DataError(f"{path}: per-sample counts have {rows.shape[0]} rows for {len(ids)} ids, "
                        f"expected {result['images']['seen']}")
    if image_ids_digest(list(ids)) != result["images"]["ids_sha256"]:
        raise DataError(f"{path}: the sidecar's sample ids do not match images.ids_sha256")
    totals = rows.sum(0).tolist()
    if totals != [result["counts"]["intersect"][0], result["counts"]["union"][0]]:
        raise DataError(f"{path}: per-sample counts do not add up to the result's counts")


def _check_sidecar(path: Path, result: dict[str, Any], counts: np.ndarray, ids: tuple[str, ...]) -> None:
    expected = (result["images"]["seen"], 4, len(result["dataset"]["classes"]))
    if counts.shape != expected or len(ids) != counts.shape[0]:
        raise DataError(f"{path}: per-image counts have shape {counts.shape} for {len(ids)} ids, "
                        f"expected {expected}")
    if image_ids_digest(list(ids)) != result["images"]["ids_sha256"]:
        raise DataError(f"{path}: the sidecar's image ids do not match images.ids_sha256")
    totals = counts.sum(0)
    for row, key in enumerate(("intersect", "union", "pred", "label")):
        if not np.array_equal(totals[row], np.asarray(result["counts"][key], dtype=np.int64)):
            raise DataError(f"{path}: per-image '{key}' counts do not add up to the result's counts")


def paired_referring_bootstrap(a_rows: Any, b_rows: Any, *, resamples: int = DEFAULT_RESAMPLES,
                               seed: int = DEFAULT_SEED) -> PairedDifference:
    """mIoU(B) - mIoU(A) of two referring results on the same samples, resampling the SAME
    samples for both (the draws of :func:`paired_bootstrap`)."""
    a, b = (_check_referring_rows(np.asarray(r), what) for r, what in ((a_rows, "rows of A"), (b_rows, "rows of B")))
    if a.shape != b.shape:
        raise DataError(f"a paired bootstrap needs rows of the same shape, got A {a.shape} and B {b.shape}")
    if a.shape[0] < 2:
        raise DataError(f"a paired bootstrap needs at least 2 samples, these results have {a.shape[0]}")
    (mious_a, _), (mious_b, _) = (_referring_resamples(r, resamples, seed) for r in (a, b))
    point = (_referring_miou(b) - _referring_miou(a)) * 100
    return PairedDifference(round(float(point), 2), _percentile_interval(mious_b - mious_a), int(resamples), int(seed))


def _referring_miou(rows: np.ndarray) -> float:
    rows = rows.astype(np.float64)
    return float(np.mean(np.divide(rows[:, 0], rows[:, 1], out=np.zeros(len(rows)), where=rows[:, 1] > 0)))


def check_pairable(a: LoadedResult, b: LoadedResult) -> None:
    """Refuse (DataError, exit 2) two results that are not on the same protocol, classes and images."""
    ra, rb = a.result, b.result
    names = f"{a.path} and {b.path}"
    fa, fb = ra["protocol"]["fingerprint"], rb["protocol"]["fingerprint"]
    if fa != fb:
        raise DataError(f"{names} have different protocol fingerprints ({fa[:8]} vs {fb[:8]}: preset "
                        f"{ra['protocol']['preset']} vs {rb['protocol']['preset']}, limit {ra['protocol'].get('limit')} "
                        f"vs {rb['protocol'].get('limit')}); compare only runs made under the same protocol")
    if ra["dataset"]["name"] != rb["dataset"]["name"] or ra["dataset"].get("classes") != rb["dataset"].get("classes"):
        raise DataError(f"{names} are on different datasets or class lists ({ra['dataset']['name']} vs "
                        f"{rb['dataset']['name']}); a paired comparison needs the same benchmark")
    if ra["images"]["ids_sha256"] != rb["images"]["ids_sha256"] or a.image_ids != b.image_ids:
        raise DataError(f"{names} were scored on different image sets ({len(a.image_ids)} vs {len(b.image_ids)} images, "
                        "or another order or skipped images); rerun both on the same images")


# ----------------------------------------------------------------------------- CLI

def _collect(path: Path) -> dict[str, Path]:
    """dataset name -> result file: the file itself, or every result file under a folder.

    Folders are paired dataset by dataset, so each may hold one run per dataset; two (say the
    shipped config and a variant) are refused, naming both. JSON files that are not result files
    are skipped with one line on stderr.
    """
    if path.is_dir():
        from .regress import find_results_with_skipped

        found: dict[str, tuple[Path, dict[str, Any]]] = {}
        results, skipped = find_results_with_skipped(path)
        note = skipped_note(path, skipped)
        if note:
            print(f"note: {note}", file=sys.stderr)
        for file, result in results:
            name = result["dataset"]["name"]
            if name in found:
                other, first = found[name]
                raise DataError(f"{path}: two results for dataset '{name}' ({other}: {_label(first)}; {file}: "
                                f"{_label(result)}); compare folders with one run per dataset, "
                                "or compare the two files")
            found[name] = (file, result)
        if not found:
            raise DataError(f"{path}: no result files found (searched recursively for *.json)")
        return {name: file for name, (file, _) in found.items()}
    if not path.is_file():
        raise DataError(f"{path}: no such result file or folder")
    return {read_result(path)["dataset"]["name"]: path}


def dataset_order(names: list[str]) -> list[str]:
    """``names`` in the benchmarks' order (``ALL_BENCHMARKS``), other datasets after, sorted."""
    return [n for n in ALL_BENCHMARKS if n in names] + sorted(set(names) - set(ALL_BENCHMARKS))


def _pairs(a_path: Path, b_path: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    a, b = _collect(a_path), _collect(b_path)
    if a_path.is_file() and b_path.is_file():
        return [(next(iter(a.values())), next(iter(b.values())))], []
    common = dataset_order([name for name in a if name in b])
    if not common:
        raise DataError(f"{a_path} ({', '.join(dataset_order(list(a)))}) and {b_path} "
                        f"({', '.join(dataset_order(list(b)))}) share no dataset")
    notes = ([f"only in A: {name}" for name in dataset_order([n for n in a if n not in b])]
             + [f"only in B: {name}" for name in dataset_order([n for n in b if n not in a])])
    return [(a[name], b[name]) for name in common], notes


def _label(result: dict[str, Any]) -> str:
    """``clip``, ``clip@my_thresh`` (a config variant), plus a RANDOM WEIGHTS flag."""
    weights = result["method"].get("weights") or {}
    variant = method_variant(result)
    random = " RANDOM WEIGHTS" if weights.get("random") else ""
    return f"{result['method']['name']}{f'@{variant}' if variant else ''}{random}"


def _labels(results: list[dict[str, Any]]) -> str:
    """The distinct runs of one side, in row order (a folder may mix methods or variants)."""
    return ", ".join(dict.fromkeys(_label(r) for r in results))


def _verdict(diff: PairedDifference) -> str:
    if not diff.significant:
        return "no"
    return "yes, B better" if diff.interval.low > 0 else "yes, B worse"


def _row(a: LoadedResult, b: LoadedResult, d: PairedDifference) -> list[Any]:
    miou_a, miou_b = a.result["metrics"]["mIoU"], b.result["metrics"]["mIoU"]
    # B-A from the reported (rounded) mIoUs, so the column is what a reader gets by subtracting.
    return [a.result["dataset"]["name"], len(a.image_ids), f"{miou_a:.2f}", f"{miou_b:.2f}", f"{miou_b - miou_a:+.2f}",
            f"[{d.interval.low:+.2f}, {d.interval.high:+.2f}]", _verdict(d)]


def compare_report(a_path: Path, b_path: Path, *, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED) -> str:
    """``ovseg-bench compare A B``: paired bootstrap of mIoU(B) - mIoU(A) per dataset, as text."""
    from tabulate import tabulate

    resamples, seed = _check_resamples(resamples), int(seed)
    pairs, notes = _pairs(Path(a_path), Path(b_path))
    loaded = []
    for pa, pb in pairs:
        a, b = load_with_per_image(pa), load_with_per_image(pb)
        check_pairable(a, b)
        paired = paired_referring_bootstrap if _is_referring(a.result) else paired_bootstrap
        loaded.append((a, b, paired(a.counts, b.counts, resamples=resamples, seed=seed)))
    rows = [_row(a, b, d) for a, b, d in loaded]
    first_a = loaded[0][0].result
    lines = [f"A: {_labels([a.result for a, _, _ in loaded])} ({a_path})",
             f"B: {_labels([b.result for _, b, _ in loaded])} ({b_path})",
             f"protocol {first_a['protocol']['preset']}; paired {CI_METHOD}, {resamples} resamples, seed {seed}",
             tabulate(rows, headers=["dataset", "images", "mIoU A", "mIoU B", "B-A", "95% CI of B-A", "significant"],
                      floatfmt=".2f", disable_numparse=True), *notes]
    return "\n".join(lines)
