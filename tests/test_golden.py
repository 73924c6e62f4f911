"""Golden numbers (issue 6): every registered method's counts on seeded inputs, gated exactly.

The inputs (tiny CLIP weights, a TCL checkpoint, a synthetic voc + ade20k tree, prediction PNGs)
are regenerated from fixed seeds by ``tests/golden/make_golden.py``; every registered method runs
on them and ``ovseg-bench regress --tolerance 0`` compares the counts with the committed
``tests/golden/baseline.json``. Any change of arithmetic fails with regress's table of what moved.
Regenerate the baseline (after reviewing why it moved) with
``.venv/bin/python tests/golden/make_golden.py --update``.
"""
from __future__ import annotations

import json


from tests.golden import make_golden

REGENERATE = ".venv/bin/python tests/golden/make_golden.py --update"


def baseline_entries() -> dict:
    return json.loads(make_golden.BASELINE.read_text(encoding="utf-8"))["entries"]


def test_every_registered_method_has_golden_numbers():
    entries = baseline_entries()
    methods = make_golden.golden_methods()  # method_names() less the methods tests register themselves
    assert {"clip", "predictions", "tcl"} <= set(methods)
    from ovseg_bench.regress import entry_key

    expected = {entry_key(m, d, p, variant=make_golden.GOLDEN_VARIANTS.get(m))
                for m in methods for d, p, _ in make_golden.golden_combos(m)}
    tracks = {entries[k].get("classes") == ["(all items)"] for k in expected if k in entries}
    assert tracks == {True, False}, "the sweep covers the referring track and the image tracks"
    missing = sorted(expected - set(entries))
    assert not missing, (f"registered method(s) without golden numbers: {', '.join(missing)}; "
                         f"add them to the baseline with `{REGENERATE}` and commit its diff")
    stale = sorted({e["method"] for e in entries.values()} - set(methods))
    assert not stale, f"baseline entries for methods no longer registered: {', '.join(stale)}; run `{REGENERATE}`"


def test_golden_numbers_are_unchanged(tmp_path):
    results = make_golden.run_all(tmp_path)
    code, report = make_golden.regress(results)
    assert code == 0, (f"golden numbers moved (ovseg-bench regress --tolerance 0 exit {code}).\n{report}\n"
                       f"If the change is intended, regenerate with `{REGENERATE}` and review the diff of "
                       "tests/golden/baseline.json like code.")
