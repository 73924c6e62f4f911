"""``ovseg-bench regress``: a CI gate of result files against a baseline file (issue 3 item 3, issue 6).

The baseline (schema ``ovseg-bench/baseline/v1``) holds one entry per (method, config variant,
dataset, protocol preset), keyed ``method/dataset/preset`` for the shipped config and
``method@variant/dataset/preset`` for a variant (:mod:`ovseg_bench.identity`; a variant entry
also records ``variant``): the protocol fingerprint, the class list, the image set (count and
``ids_sha256``), mIoU/aAcc/mAcc and the full int64 counts (intersect, union, pred, label per
class). ``--update`` merges a results folder into it: entries of the results replace those of
the same key, the other baseline entries stay, and what was replaced or added is listed;
``--update --replace`` rewrites it from the results alone; a baseline that does not exist yet
is created. Written atomically, with sorted keys, so the same entries give the same bytes and
its diff can be reviewed like code.

Two modes, chosen by ``--tolerance``:

* ``--tolerance T`` with T > 0 (default 0.3): a result fails when its mIoU is more than T points
  below the baseline's. Any other change passes (and is shown in the table).
* ``--tolerance 0``: exact-counts mode. A result fails when any of its integer counts (or the
  mIoU/aAcc/mAcc computed from them) differs from the baseline in either direction; a table per
  failing entry names the classes whose counts moved. This gates arithmetic, not quality.

In both modes an entry is not comparable (exit 2) when its fingerprint, class list or image
set differs from the baseline's; a baseline entry with no result fails (exit 1); a result with
no baseline entry is listed as ``new`` and passes. Exit code: 2 if anything is not comparable,
else 1 if anything failed, else 0. JSON files in the results folder that declare no result
schema (a ``notes.json``, the baseline itself) are skipped and named in one warning line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .identity import method_variant
from .results import scan_results_with_skipped, skipped_note
from .atomic import atomic_write

BASELINE_SCHEMA = "ovseg-bench/baseline/v1"
COUNT_NAMES = ("intersect", "union", "pred", "label")
# Gated metrics, those a result has: semantic and label-conditioned (mIoU, aAcc, mAcc, and the
# label-conditioned threshold curve), referring (mIoU, oIoU). Counts: every list a result holds.
METRIC_NAMES = ("mIoU", "aAcc", "mAcc", "oIoU", "curve")
ALL_ITEMS = "(all items)"  # the one "class" of counts totalled over samples (referring: sum I, sum U)
ENTRY_FIELDS = ("method", "dataset", "protocol", "fingerprint", "limit", "classes", "images", "counts", "mIoU")
MAX_MOVED_ROWS = 40  # classes listed per changed entry in exact mode


# ----------------------------------------------------------------------------- reading results

Warn = Callable[[str], None]  # receives the one line about skipped JSON files


def find_results(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, result) for every result file under the folder ``folder``; see :func:`find_results_with_skipped`."""
    return find_results_with_skipped(folder)[0]


def find_results_with_skipped(folder: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """(results, skipped JSON files) under the folder ``folder``.

    See :func:`~ovseg_bench.results.scan_results_with_skipped`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--results {folder} is not a folder; pass the folder the runs wrote (e.g. runs/ci)")
    return scan_results_with_skipped(folder)


def entry_key(method: str, dataset: str, preset: str, *, variant: str | None = None) -> str:
    """``method/dataset/preset``, or ``method@variant/dataset/preset`` for a config variant.

    The shipped config keeps the key without ``@`` so baselines written before variants existed
    (e.g. tests/golden/baseline.json) stay valid.
    """
    return f"{method}@{variant}/{dataset}/{preset}" if variant else f"{method}/{dataset}/{preset}"


def key_of(entry: dict[str, Any]) -> str:
    """The baseline key of an entry (``variant`` absent = the shipped config)."""
    return entry_key(entry["method"], entry["dataset"], entry["protocol"], variant=entry.get("variant"))


def entry_from_result(result: dict[str, Any]) -> dict[str, Any]:
    """The baseline entry of one result: identity, image set, metrics and full counts.

    ``variant`` is recorded only for a config variant, so entries of the shipped config keep
    their bytes.
    """
    variant = method_variant(result)
    return {
        "method": result["method"]["name"], **({"variant": variant} if variant else {}),
        "dataset": result["dataset"]["name"],
        "protocol": result["protocol"]["preset"], "fingerprint": result["protocol"]["fingerprint"],
        "limit": result["protocol"].get("limit"),
        "classes": list(result["dataset"].get("classes", [ALL_ITEMS])),
        "images": {"seen": result["images"]["seen"], "ids_sha256": result["images"]["ids_sha256"]},
        **{name: _gated(result["metrics"][name]) for name in METRIC_NAMES if name in result["metrics"]},
        "counts": {name: [int(v) for v in values] for name, values in result["counts"].items()},
    }


def _gated(value: Any) -> Any:
    """A metric as the baseline keeps it: the curve as its mIoU per threshold."""
    return {row["bg_threshold"]: row["mIoU"] for row in value} if isinstance(value, list) else value


def current_entries(folder: Path, *, warn: Warn | None = None) -> dict[str, tuple[Path, dict[str, Any]]]:
    """key -> (result file, entry); two results with one key are refused.

    ``warn`` gets the one line naming JSON files that are not result files (default:
    ``warnings.warn``).
    """
    found, skipped = find_results_with_skipped(folder)
    note = skipped_note(folder, skipped)
    if note:
        (warn or _warn)(note)
    entries: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path, result in found:
        entry = _entry_or_fail(result, path)
        key = key_of(entry)
        if key in entries:
            raise DataError(f"{key}: two results under {folder}: {entries[key][0]} and {path}; "
                            "keep one result per (method, variant, dataset, protocol) in the folder regress reads")
        entries[key] = (path, entry)
    if not entries:
        raise DataError(f"no result files under {folder}; run `ovseg-bench run ... --output {folder}` first")
    return entries


def _entry_or_fail(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """:func:`entry_from_result`, naming the file when a required field is missing."""
    try:
        return entry_from_result(result)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a complete result file (missing or malformed field {exc}); "
                        "rerun it, or move it out of the results folder") from None


def _warn(note: str) -> None:
    warnings.warn(note, stacklevel=3)


# ----------------------------------------------------------------------------- baseline file

def read_baseline(path: Path) -> dict[str, dict[str, Any]]:
    """key -> entry, refusing an unknown schema or an entry with missing fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"baseline {path} not found; create it from a trusted run with "
                        f"`ovseg-bench regress --results DIR --baseline {path} --update`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"baseline {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != BASELINE_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise DataError(f"baseline {path}: schema {found!r} is not {BASELINE_SCHEMA!r}; "
                        "regenerate it with --update --replace")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise DataError(f"baseline {path}: 'entries' must be a mapping of method/dataset/preset to entries")
    for key, entry in entries.items():
        missing = [f for f in ENTRY_FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise DataError(f"baseline {path}: entry '{key}' lacks {', '.join(missing)}; "
                            "regenerate it with --update --replace")
    return entries


def write_baseline(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Atomic write, sorted keys, two-space indent, trailing newline: same entries, same bytes."""
    text = json.dumps({"schema": BASELINE_SCHEMA, "entries": entries}, indent=2, sort_keys=True, allow_nan=False)
    atomic_write(Path(path), text + "\n")


# ----------------------------------------------------------------------------- comparison

@dataclasses.dataclass(frozen=True)
class Verdict:
    """One table row: baseline vs now for one key."""

    key: str
    baseline: dict[str, Any] | None
    now: dict[str, Any] | None
    source: Path | None
    status: str           # ok | improved | same | new | REGRESSED | CHANGED | MISSING | NOT COMPARABLE
    level: int            # 0 pass, 1 fail, 2 not comparable
    detail: str = ""


def _incomparable(base: dict[str, Any], now: dict[str, Any], source: Path) -> str:
    """Why two entries cannot be compared, or '' when they can."""
    if base["fingerprint"] != now["fingerprint"]:
        return (f"protocol fingerprint {base['fingerprint'][:8]} in the baseline, {now['fingerprint'][:8]} in {source} "
                f"(limit {base['limit']} vs {now['limit']}; preset settings or precision may differ)")
    if base["classes"] != now["classes"]:
        return f"class list differs ({len(base['classes'])} classes in the baseline, {len(now['classes'])} in {source})"
    if base["images"] != now["images"]:
        return (f"image set differs ({base['images']['seen']} images, ids {base['images']['ids_sha256'][:8]} in the "
                f"baseline; {now['images']['seen']}, ids {now['images']['ids_sha256'][:8]} in {source})")
    return ""


def compare_entry(key: str, base: dict[str, Any] | None, *, found: tuple[Path, dict[str, Any]] | None,
                  tolerance: float) -> Verdict:
    """The verdict for one key; ``tolerance == 0`` is exact-counts mode."""
    if found is None:
        return Verdict(key, base, None, None, "MISSING", 1, "in the baseline but no result was found")
    source, now = found
    if base is None:
        return Verdict(key, None, now, source, "new", 0)
    why = _incomparable(base, now, source)
    if why:
        return Verdict(key, base, now, source, "NOT COMPARABLE", 2, why)
    if tolerance == 0:
        same = base["counts"] == now["counts"] and all(base.get(m) == now.get(m) for m in METRIC_NAMES)
        return Verdict(key, base, now, source, "same" if same else "CHANGED", 0 if same else 1)
    drop = round(base["mIoU"] - now["mIoU"], 2)
    if drop > tolerance:
        return Verdict(key, base, now, source, "REGRESSED", 1, f"mIoU dropped {drop:.2f} > tolerance {tolerance:g}")
    return Verdict(key, base, now, source, "improved" if drop < 0 else "ok", 0)


def moved_classes(base: dict[str, Any], now: dict[str, Any]) -> list[list[Any]]:
    """Rows (class, per-count change, IoU before/after in percent) for classes whose counts moved."""
    rows = []
    for c, name in enumerate(base["classes"]):
        deltas = [now["counts"][k][c] - base["counts"][k][c] for k in _count_names(base)]
        if any(deltas):
            rows.append([c, name, *(f"{d:+d}" if d else "" for d in deltas),
                         _iou(base["counts"], c), _iou(now["counts"], c)])
    return rows


def _count_names(entry: dict[str, Any]) -> list[str]:
    return [name for name in COUNT_NAMES if name in entry["counts"]] or sorted(entry["counts"])


def _iou(counts: dict[str, list[int]], c: int) -> str:
    union = counts["union"][c]
    return f"{100 * counts['intersect'][c] / union:.2f}" if union else "-"


# ----------------------------------------------------------------------------- output

def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def verdict_table(verdicts: list[Verdict]) -> str:
    from tabulate import tabulate

    rows = []
    for v in verdicts:
        entry = v.now or v.baseline
        before = v.baseline["mIoU"] if v.baseline else None
        after = v.now["mIoU"] if v.now else None
        delta = f"{after - before:+.2f}" if before is not None and after is not None else ""
        method = entry["method"] + (f"@{entry['variant']}" if entry.get("variant") else "")
        rows.append([method, entry["dataset"], entry["protocol"], _fmt(before), _fmt(after), delta, v.status])
    return tabulate(rows, headers=["method", "dataset", "protocol", "baseline mIoU", "now mIoU", "delta", "status"],
                    disable_numparse=True)


def _changes_report(v: Verdict) -> str:
    from tabulate import tabulate

    rows = moved_classes(v.baseline, v.now)
    lines = [f"\n{v.key}: counts moved in {len(rows)} class(es) ({v.source})"]
    metrics = [f"{m} {v.baseline.get(m)} -> {v.now.get(m)}" for m in METRIC_NAMES if v.baseline.get(m) != v.now.get(m)]
    if metrics:
        lines.append("  " + ", ".join(metrics))
    if rows:
        shown = rows[:MAX_MOVED_ROWS]
        lines.append(tabulate(shown, headers=["#", "class", *_count_names(v.baseline), "IoU before", "IoU now"],
                              disable_numparse=True))
        if len(rows) > len(shown):
            lines.append(f"... and {len(rows) - len(shown)} more class(es)")
    return "\n".join(lines)


def _check_tolerance(tolerance: float) -> float:
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(f"--tolerance must be a finite number of mIoU points >= 0, got {tolerance!r} "
                          "(0 = exact-counts mode)")
    return float(tolerance)


def regress(results: Path, baseline: Path, *, tolerance: float, warn: Warn | None = None) -> tuple[int, str]:
    """Compare a results folder with a baseline file: (exit code, report text).

    ``warn`` gets the line about skipped JSON files (:func:`current_entries`).
    """
    tolerance = _check_tolerance(tolerance)
    base = read_baseline(baseline)
    now = current_entries(results, warn=warn)
    verdicts = [compare_entry(key, base.get(key), found=now.get(key), tolerance=tolerance) for key in sorted(set(base) | set(now))]
    mode = ("exact-counts mode (--tolerance 0): any change of the counts fails" if tolerance == 0
            else f"tolerance {tolerance:g} mIoU points")
    parts = [f"regress {results} against {baseline}: {mode}", verdict_table(verdicts)]
    parts += [_changes_report(v) for v in verdicts if v.status == "CHANGED"]
    notes = [f"{v.key}: {v.status}: {v.detail}" for v in verdicts if v.detail]
    if notes:
        parts.append("\n" + "\n".join(notes))
    code = max((v.level for v in verdicts), default=0)
    parts.append("\n" + {0: "PASSED", 1: "FAILED: see the rows above",
                         2: "NOT COMPARABLE: results and baseline were made under different protocols, classes "
                            "or images; rerun with the baseline's settings or regenerate it with --update"}[code])
    return code, "\n".join(parts)


def update(results: Path, baseline: Path, *, replace: bool = False, warn: Warn | None = None) -> str:
    """Write ``baseline`` from the results under ``results``; returns the report text.

    Merges by default: an entry of the results replaces the baseline's entry of the same key,
    the baseline's other entries stay (a CI job that reran two datasets must not drop the
    others). ``replace=True`` writes the results' entries alone. A missing baseline is created;
    an unreadable one is refused (:func:`read_baseline`) unless ``replace`` is set, since
    merging into it would keep what cannot be checked.
    """
    now = {key: entry for key, (_, entry) in current_entries(results, warn=warn).items()}
    old = {} if replace or not Path(baseline).exists() else read_baseline(baseline)
    merged = {**old, **now}
    write_baseline(baseline, merged)
    verdicts = [Verdict(k, old.get(k), e, None, _update_status(old.get(k), e, replace), 0)
                for k, e in sorted(now.items())]
    kept = len(merged) - len(now)
    how = ("rewritten from the results alone (--replace)" if replace
           else f"{kept} other entr{'y' if kept == 1 else 'ies'} kept" if old else "created")
    return (f"{verdict_table(verdicts)}\n"
            f"wrote {len(merged)} entr{'y' if len(merged) == 1 else 'ies'} to {baseline}: {_tally(verdicts)}; {how}")


def _update_status(old: dict[str, Any] | None, new: dict[str, Any], replace: bool) -> str:
    if replace:
        return "written"
    if old is None:
        return "added"
    return "unchanged" if old == new else "replaced"


def _tally(verdicts: list[Verdict]) -> str:
    """``1 replaced, 1 added`` in the order statuses first appear."""
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())
