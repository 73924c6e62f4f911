#!/usr/bin/env python
"""Memory and scale: time and peak memory of a whole ``ovseg-bench run`` for 10, 100 and 1000 images.

Each size is a fresh synthetic VOC-layout tree (``tests.synthetic.write_dataset``, all images the
same size so every image costs the same) evaluated in this process through
``ovseg_bench.plan.run_plan``, the path ``ovseg-bench run`` takes: method construction,
vocabulary encoding, the engine loop, the bootstrap confidence interval and the result files.
Defaults: ``maskclip`` on the tiny random ViT (``tests/assets/tiny_vit.json``,
``--pretrained none``), protocol ``tcl``, the CPU defaults (batch 1, no DataLoader workers, so the
whole run lives in this process and its RSS is the run's memory).

The claim it checks: time grows linearly with the number of images (constant s/image) and memory
stays flat (nothing per image is kept except int64 counts, 4 x classes per image).

Peak memory: on the CPU, this process's peak RSS per size, by resetting the kernel's high-water
mark (``/proc/self/clear_refs`` = 5, then ``VmHWM``) before each size; on CUDA the allocator
peak. It reuses ``PeakMemory`` from ``engine_speed.py``. A small warm-up run comes first so
one-time allocations (torch, open_clip, the tokenizer) are not charged to the first size.

Run from the repository root, e.g.
    .venv/bin/python benchmarks/memory_scale.py
    .venv/bin/python benchmarks/memory_scale.py --sizes 10,100,1000 --image-size 96x128
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO, Path(__file__).resolve().parent):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from engine_speed import PeakMemory, machine_busy_seconds, machine_line, own_cpu_seconds, parse_size, pct  # noqa: E402
from ovseg_bench.engine.runner import EngineOptions, resolve_device  # noqa: E402
from ovseg_bench.methods.base import WeightsOptions  # noqa: E402
from ovseg_bench.plan import RunRequest, run_plan  # noqa: E402
from tests.synthetic import write_dataset  # noqa: E402

DATASET = "voc"
TINY_MODEL = REPO / "tests" / "assets" / "tiny_vit.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="numbers of images, comma-separated")
    parser.add_argument("--image-size", type=parse_size, default=(128, 96), metavar="WxH",
                        help="synthetic image size, width x height (default 128x96)")
    parser.add_argument("--method", default="maskclip")
    parser.add_argument("--model", default=str(TINY_MODEL))
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--protocol", default="tcl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=3, help="images of the untimed warm-up run")
    return parser.parse_args(argv)


def write_images(args: argparse.Namespace, images: int, work: Path) -> Path:
    """A synthetic voc tree of ``images`` images of one size under ``work``; returns the data root."""
    width, height = args.image_size
    write_dataset(DATASET, work / "data", num_images=images, sizes=[(height, width)])
    return work / "data"


def one_run(args: argparse.Namespace, root: Path, out: Path) -> dict:
    """Evaluate the tree at ``root`` like ``ovseg-bench run``; wall seconds, result, others' CPU share."""
    request = RunRequest(method=args.method, datasets=(DATASET,), protocol=args.protocol, data_root=root, output=out,
                         weights=WeightsOptions(args.model, args.pretrained), device=args.device,
                         engine=EngineOptions(quiet=True))
    own_start, busy_start = own_cpu_seconds(), machine_busy_seconds()
    start = time.perf_counter()
    (result,) = run_plan(request)
    seconds = time.perf_counter() - start
    own_end, busy_end = own_cpu_seconds(), machine_busy_seconds()
    # Share of the machine's CPUs other processes used meanwhile: only rows near 0% time the run alone.
    others = None
    if busy_start is not None and busy_end is not None:
        others = max(0.0, (busy_end - busy_start) - (own_end - own_start)) / (seconds * (os.cpu_count() or 1))
    return {"seconds": seconds, "result": result, "others": others}


def mib(value: float) -> str:
    return f"{value / 2 ** 20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    device = resolve_device(args.device)
    memory = PeakMemory(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ovseg_memory_scale_") as tmp:
        if args.warmup:
            warm = Path(tmp) / "warmup"
            one_run(args, write_images(args, args.warmup, warm), warm / "runs")
        for images in sizes:
            work = Path(tmp) / f"n{images}"
            root = write_images(args, images, work)  # not timed, not in the peak
            memory.reset()
            run = one_run(args, root, work / "runs")
            peak = memory.peak()
            timing, seen = run["result"]["timing"], run["result"]["images"]["seen"]
            if seen != images:
                raise SystemExit(f"{images} images written but {seen} scored")
            rows.append([images, f"{run['seconds']:.1f}", f"{timing['seconds']:.1f}",
                         f"{timing['seconds'] / images:.4f}", mib(peak), f"+{mib(peak - memory.baseline)}",
                         run["result"]["images"]["windows"], pct(run["others"])])
            print(f"{images} images done in {run['seconds']:.1f} s", file=sys.stderr)
    width, height = args.image_size
    print(f"machine : {machine_line(device)}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"python {platform.python_version()}")
    print(f"workload: {args.method} {Path(args.model).name} pretrained={args.pretrained}, synthetic {DATASET} "
          f"{width}x{height}, protocol {args.protocol}, CPU defaults (batch 1, 0 workers)")
    print(f"memory  : {memory.kind}; 'seconds' = whole run_plan (method build, vocabulary, loop, CI, files), "
          "'eval s' = the engine loop (result timing.seconds); "
          "'other load' = share of the CPUs other processes used meanwhile")
    print(tabulate(rows, headers=["images", "seconds", "eval s", "s/image", "peak RSS MiB", "over start MiB",
                                  "windows", "other load"], disable_numparse=True, colalign=("right",) * 8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
