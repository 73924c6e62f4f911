#!/usr/bin/env bash
# The GPU check, for one CUDA machine (about 5-8 minutes on one H100/H200):
#   1. the tests marked `cuda` (pytest -m cuda),
#   2. benchmarks/engine_speed.py against the one-window loop at fp32, bf16 and fp16,
#   3. benchmarks/full_run.py (five CLIP baselines x eight datasets, sharing vs the harness way),
# then one table of the figures. Every step's full output is kept under $OUT (default: a temp dir).
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device is visible to $PY; run it on a GPU machine" >&2
    exit 2
fi
DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')

echo "== CUDA tests" >&2
"$PY" -m pytest -q -m cuda -p no:cacheprovider >"$OUT/tests.txt" 2>&1 || { tail -30 "$OUT/tests.txt" >&2; exit 1; }
TESTS=$(tail -1 "$OUT/tests.txt")

for precision in fp32 bf16 fp16; do
    echo "== engine_speed.py --precision $precision" >&2
    "$PY" benchmarks/engine_speed.py --device cuda --precision "$precision" --images 200 \
        >"$OUT/engine_$precision.txt" 2>&1 || { tail -30 "$OUT/engine_$precision.txt" >&2; exit 1; }
done

echo "== full_run.py" >&2
# Batched CUDA kernels may move a label where two classes tie to the last bit; the CPU run is exact.
"$PY" benchmarks/full_run.py --device cuda --images 4 --templates 8 --min-agreement 99.99 \
    >"$OUT/full_run.txt" 2>&1 || { tail -30 "$OUT/full_run.txt" >&2; exit 1; }

field() {  # field FILE PREFIX: the rest of the summary line starting with PREFIX
    grep -m1 "^$2" "$1" | sed "s/^$2[^:]*: *//"
}
{
    echo "device: $DEVICE"
    echo "tests (-m cuda): $TESTS"
    echo
    echo "| check | engine / shared | loop / harness | ratio | labels |"
    echo "|---|---|---|---|---|"
    for precision in fp32 bf16 fp16; do
        file="$OUT/engine_$precision.txt"
        echo "| engine_speed maskclip $precision | $(field "$file" "(A) engine") | $(field "$file" "(B) loop") |" \
             "$(field "$file" "speed A/B") | $(field "$file" "agreement") |"
    done
    file="$OUT/full_run.txt"
    echo "| full_run clip-family x 8 | $(field "$file" "(A) shared") | $(field "$file" "(B) harness") |" \
         "$(field "$file" "speed B/A") | $(field "$file" "agreement") |"
    echo
    echo "full outputs: $OUT"
} | tee "$OUT/table.md"
