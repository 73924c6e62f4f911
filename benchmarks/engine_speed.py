#!/usr/bin/env python
"""Engine speed: the batched ovseg-bench engine against a one-image-one-window reference loop.

Both paths run the same method object with the same vocabulary (encoded once) on the same
synthetic VOC-layout images:

(A) ``ovseg_bench.engine.runner.evaluate`` with ``EngineOptions(batch_size, workers, precision)``:
    DataLoader workers decode and resize, windows of several images share a forward pass.
(B) a straightforward loop written here the way mmseg's ``slide_inference`` runs at batch 1:
    for each image in order decode, resize, normalise; for each window of mmseg's grid one
    ``forward_windows(window[None])`` call, added into a zero canvas plus a count matrix; divide,
    bilinear to the GT size (align_corners=False), ``method.postprocess``, ``IoUCounts``.

The script checks that both give the same mIoU (2 dp) and the same label on >= 99.99% of the
pixels of every image, and prints images/s, windows/s, peak memory and the speed ratio A/B,
then a summary block for benchmarks/README.md.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each path); on the CPU
the peak RSS of this process per path, by resetting the kernel's high-water mark
(``/proc/self/clear_refs`` = 5, then ``VmHWM``) before each path. The engine's DataLoader
workers are forked processes and are not included (they decode one image at a time).

Run from the repository root, e.g.
    .venv/bin/python benchmarks/engine_speed.py --images 16
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import platform
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ovseg_bench.datasets.cards import load_card  # noqa: E402
from ovseg_bench.datasets.listing import list_samples  # noqa: E402
from ovseg_bench.engine.metrics import IoUCounts  # noqa: E402
from ovseg_bench.engine.protocol import load_protocol  # noqa: E402
from ovseg_bench.engine.runner import EngineOptions, evaluate  # noqa: E402
from ovseg_bench.tracks.semantic import SEMANTIC  # noqa: E402
from ovseg_bench.imaging import decode_image, decode_label, reduce_zero_label, resize_image  # noqa: E402
from ovseg_bench.methods.base import DatasetInfo, Vocabulary, WeightsOptions  # noqa: E402
from ovseg_bench.registry import get_method  # noqa: E402
from tests.synthetic import write_dataset  # noqa: E402

DATASET = "voc"
MIN_AGREEMENT = 0.9999
CPU_TARGET, GPU_TARGET = 1.3, 5.0


# --------------------------------------------------------------------------- arguments

def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--size must look like WIDTHxHEIGHT (e.g. 500x375), got '{text}'")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError("--size sides must be positive")
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", default="maskclip")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip name or model-config JSON")
    parser.add_argument("--pretrained", default="none", help="'none' = seeded random weights")
    parser.add_argument("--checkpoint", type=Path, default=None, help="method checkpoint (tcl)")
    parser.add_argument("--random-checkpoint", action="store_true",
                        help="tcl: write a random checkpoint in the published key layout for --model and use it")
    parser.add_argument("--images", type=int, default=16, help="number of synthetic images")
    parser.add_argument("--size", type=parse_size, default=(500, 375), metavar="WxH",
                        help="synthetic image size before the protocol's resize")
    parser.add_argument("--protocol", default="tcl")
    parser.add_argument("--batch-size", type=int, default=None, help="engine windows per forward (default: the engine's, 16 on CUDA, 1 on CPU)")
    parser.add_argument("--workers", type=int, default=None, help="engine DataLoader workers (default: the engine's, up to 4 on CUDA, 0 on CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="autocast of the forward pass, for both paths")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up windows per path before timing (default 1 on CPU, 32 on CUDA); the engine "
                             "warms up in whole batches of --batch-size")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--order", default="engine,loop", choices=("engine,loop", "loop,engine"),
                        help="which path runs first (repeats alternate)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path; the best is reported")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=None,
                        help="time stages (forward, postprocess, ... ); default on for CPU, off for CUDA, "
                             "where it adds a synchronisation per stage")
    parser.add_argument("--torch-profile", type=int, default=0, metavar="ROWS",
                        help="also print a torch.profiler table (ROWS ops) per path (slows both paths)")
    parser.add_argument("--vocab-cache", type=Path, default=None,
                        help="file to keep the encoded vocabulary between runs (random weights are not cached by "
                             "ovseg-bench itself); not timed either way")
    args = parser.parse_args(argv)
    if args.images < 1 or (args.workers is not None and args.workers < 0) or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1, --workers >= 0")
    return args


# --------------------------------------------------------------------------- measuring

class StageTimer:
    """Wall time per named stage; synchronises CUDA at each boundary when enabled."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS so one path's leftovers do not raise the next baseline."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of one path: CUDA allocator peak, or this process's peak RSS (VmHWM reset)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated"
        self.per_path = True
        if device.type != "cuda":
            self.kind = "peak RSS of this process (VmHWM, reset per path via /proc/self/clear_refs)"
            if not self._reset_hwm() or _proc_status_kib("VmHWM") is None:
                self.per_path = False
                self.kind = "peak RSS of this process since start (ru_maxrss; NOT per path: clear_refs unavailable)"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        if self.per_path:
            self._reset_hwm()
        self.baseline = (_proc_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.per_path:
            return (_proc_status_kib("VmHWM") or 0) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- the reference loop

def mmseg_slide_grid(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg slide_inference's windows (y1, y2, x1, x2), row-major; the last ones shifted back."""
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def forward_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu" and precision == "fp16":
        raise SystemExit("--precision fp16 needs CUDA; on the CPU use fp32 or bf16")
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def reference_loop(method, vocab: Vocabulary, info: DatasetInfo, card, samples, settings,
                   device: torch.device, precision: str, timer: StageTimer) -> tuple[IoUCounts, int]:
    """One image at a time, one window per forward pass (mmseg slide_inference, batch 1).

    ``forward`` and ``postprocess`` are timed by the method's wrappers (see :class:`Instrumented`).
    """
    counts = IoUCounts(card.num_classes, ignore_index=card.ignore_index, device=device)
    num_windows = 0
    for ref in samples:
        with timer("decode+resize"):
            bgr = decode_image(ref.image_path)
            gt = decode_label(ref.gt_path)
            if card.reduce_zero_label:
                gt = reduce_zero_label(gt)
            resized = resize_image(bgr, settings.short_side, settings.long_side)
        with timer("normalise"):
            rgb = torch.from_numpy(np.ascontiguousarray(resized[:, :, ::-1].transpose(2, 0, 1)))
            image = method.normalisation.apply(rgb[None].to(device))[0]          # [3,h,w] float32
        height, width = image.shape[-2:]
        if settings.mode == "whole":
            with forward_autocast(device, precision):
                scores = method.forward_windows(image[None], vocab)
            scores = scores.float()
            num_windows += 1
        else:
            canvas = None
            count = torch.zeros((1, 1, height, width), dtype=torch.float32, device=device)
            for y1, y2, x1, x2 in mmseg_slide_grid(height, width, settings.crop, settings.stride):
                with forward_autocast(device, precision):
                    logits = method.forward_windows(image[:, y1:y2, x1:x2][None], vocab)
                with timer("stitch"):
                    logits = logits.float()
                    if canvas is None:
                        canvas = torch.zeros((1, logits.shape[1], height, width), dtype=torch.float32, device=device)
                    canvas[:, :, y1:y2, x1:x2] += logits
                    count[:, :, y1:y2, x1:x2] += 1
                num_windows += 1
            with timer("stitch"):
                scores = canvas / count
        with timer("resize to GT"):
            scores = F.interpolate(scores, size=gt.shape, mode="bilinear", align_corners=False)[0]
        labels = method.postprocess(scores, image, vocab, info)
        with timer("metric"):
            counts.update(labels, torch.from_numpy(gt).to(device).long())
    return counts, num_windows


# --------------------------------------------------------------------------- shared method plumbing

class Instrumented:
    """Instance-level wrappers on the shared method object (both paths go through them):

    * ``encode_classes`` returns the vocabulary encoded once (the engine would encode again);
    * ``postprocess`` keeps each label map (int16, on the device, no sync) for the comparison;
    * ``forward_windows`` and ``postprocess`` are timed when stage timing is on.
    """

    def __init__(self, method, vocab: Vocabulary, classes: list[list[str]], timer_ref: list):
        self.labels: list[torch.Tensor] = []
        self.timer_ref = timer_ref
        forward, postprocess = method.forward_windows, method.postprocess

        def encode_classes(asked, info):
            if asked != classes:
                raise RuntimeError("the engine asked for a different class list than the one encoded")
            return vocab

        def forward_windows(windows, voc):
            with self.timer_ref[0]("forward"):
                return forward(windows, voc)

        def postprocess_and_keep(scores, image, voc, info):
            with self.timer_ref[0]("postprocess"):
                labels = postprocess(scores, image, voc, info)
            self.labels.append(labels.to(torch.int16))
            return labels

        self.forward = forward
        method.encode_classes = encode_classes
        method.forward_windows = forward_windows
        method.postprocess = postprocess_and_keep


def encode_vocabulary(method, classes, info, cache: Path | None, device: torch.device) -> Vocabulary:
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["classes"] == classes and saved["weights"] == repr(method.weights()) and saved["method"] == method.name:
            print(f"vocabulary: loaded from {cache}")
            return Vocabulary(saved["embeddings"].to(device), saved["query_class"].to(device), saved["num_classes"])
    start = time.perf_counter()
    vocab = method.encode_classes(classes, info)
    print(f"vocabulary: {vocab.embeddings.shape[0]} queries encoded in {time.perf_counter() - start:.1f} s (not timed)")
    if cache is not None:
        torch.save({"classes": classes, "weights": repr(method.weights()), "method": method.name,
                    "embeddings": vocab.embeddings.cpu(), "query_class": vocab.query_class.cpu(),
                    "num_classes": vocab.num_classes}, cache)
    return vocab


def warm_up(forward, vocab: Vocabulary, device: torch.device, precision: str, windows: int,
            batch_size: int, crop_hw: tuple[int, int]) -> None:
    """Run the forward shapes both paths will use: batch 1 (loop) and batch ``batch_size`` (engine)."""
    if windows <= 0:
        return
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, 3, *crop_hw), generator=generator).to(device)
    with torch.inference_mode(), forward_autocast(device, precision):
        for _ in range(windows):
            forward(x[:1], vocab)
        for _ in range(math.ceil(windows / batch_size)):
            forward(x, vocab)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- reporting

def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} (CUDA {torch.version.cuda}), host {cpu_model()}"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine spent busy (user+nice+system+irq+softirq+steal)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]   # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the engine's DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_text() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "n/a"


def pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def run_path(name: str, fn, device: torch.device, timer: StageTimer, memory: PeakMemory,
             torch_profile_rows: int) -> dict:
    memory.reset()
    load_before = load_text()
    profiler = contextlib.nullcontext()
    if torch_profile_rows:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
    cpu_start = time.process_time()
    own_start, busy_start = own_cpu_seconds(), machine_busy_seconds()
    start = time.perf_counter()
    with profiler as prof:
        counts, num_windows = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    busy_end, own_end = machine_busy_seconds(), own_cpu_seconds()
    # CPU time other processes took while this path ran, as a share of the machine: a contended
    # machine (other jobs on the same cores) slows either path by an amount this makes visible.
    others = None
    if busy_start is not None and busy_end is not None:
        others = max(0.0, (busy_end - busy_start) - (own_end - own_start)) / (seconds * (os.cpu_count() or 1))
    result = {"name": name, "seconds": seconds, "cpu_seconds": cpu_seconds, "windows": num_windows,
              "counts": counts, "peak": memory.peak(), "baseline": memory.baseline,
              "stages": dict(timer.seconds), "load": (load_before, load_text()), "others": others}
    if torch_profile_rows:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        result["profile"] = prof.key_averages().table(sort_by=sort, row_limit=torch_profile_rows)
    return result


def print_path(result: dict, images: int, memory: PeakMemory, device: torch.device) -> None:
    s = result["seconds"]
    print(f"  wall {s:8.2f} s   process CPU {result['cpu_seconds']:8.2f} s   other processes used "
          f"{pct(result['others'])} of the "
          f"machine's CPUs meanwhile   load avg before/after {result['load'][0]} / {result['load'][1]}")
    print(f"  {images / s:8.3f} images/s   {result['windows'] / s:8.3f} windows/s   ({result['windows']} windows)")
    if device.type == "cuda":
        print(f"  peak memory {mib(result['peak'])} allocated (baseline {mib(result['baseline'])}, "
              f"{memory.kind})")
    else:
        print(f"  peak memory {mib(result['peak'])} RSS, {mib(result['peak'] - result['baseline'])} above the "
              f"{mib(result['baseline'])} held before the path ({memory.kind})")
    if result["stages"]:
        parts = sorted(result["stages"].items(), key=lambda kv: -kv[1])
        accounted = sum(v for _, v in parts)
        text = ", ".join(f"{k} {v:.2f} s ({100 * v / s:.1f}%)" for k, v in parts)
        print(f"  stages (main process): {text}; rest {s - accounted:.2f} s ({100 * (s - accounted) / s:.1f}%)")
    if "profile" in result:
        print(result["profile"])


# --------------------------------------------------------------------------- main

def write_random_tcl_checkpoint(model: str, path: Path) -> Path:
    """A TCL checkpoint in the published key layout with freshly initialised masker weights."""
    from ovseg_bench.methods.clip_model import load_clip
    from ovseg_bench.methods.tcl import TclMasker, published_key

    visual = load_clip(model, "none").model.visual
    block = len(visual.transformer.resblocks) - 1
    state = TclMasker(visual).state_dict()
    torch.save({"model": {published_key(name, block): value for name, value in state.items()}}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = EngineOptions(batch_size=args.batch_size, workers=args.workers).for_device(device)
    batch_size, args.workers = defaults.batch_size, defaults.workers
    warmup = args.warmup if args.warmup is not None else (32 if device.type == "cuda" else 1)
    stages = args.stages if args.stages is not None else device.type != "cuda"
    forward_autocast(device, args.precision)  # fail early on CPU fp16

    preset = load_protocol(args.protocol)
    settings = preset.settings_for(DATASET)
    card = load_card(DATASET)
    width, height = args.size

    with tempfile.TemporaryDirectory(prefix="ovseg_engine_speed_") as tmp:
        root = Path(tmp)
        write_dataset(DATASET, root, num_images=args.images, sizes=[(height, width)] * args.images)
        samples = list_samples(card, root)

        checkpoint = args.checkpoint
        if args.random_checkpoint:
            checkpoint = write_random_tcl_checkpoint(args.model, root / "random_tcl.pth")
        method = get_method(args.method)(
            WeightsOptions(model=args.model, pretrained=args.pretrained, checkpoint=checkpoint), device)
        info = DatasetInfo(card.name, card.class_names(), card.background_class)
        classes = card.class_synonyms(settings.classnames)
        vocab = encode_vocabulary(method, classes, info, args.vocab_cache, device)

        timer_ref = [StageTimer(False, device)]
        hooks = Instrumented(method, vocab, classes, timer_ref)
        memory = PeakMemory(device)

        probe = resize_image(np.zeros((height, width, 3), np.uint8), settings.short_side, settings.long_side)
        resized_hw = probe.shape[:2]
        windows_per_image = (1 if settings.mode == "whole" else
                             len(mmseg_slide_grid(*resized_hw, settings.crop, settings.stride)))
        crop_hw = resized_hw if settings.mode == "whole" else (min(settings.crop, resized_hw[0]),
                                                               min(settings.crop, resized_hw[1]))
        print(f"workload: {args.method} {args.model} (pretrained={args.pretrained}), {args.images} images "
              f"{width}x{height} -> {resized_hw[1]}x{resized_hw[0]} under '{args.protocol}' "
              f"({settings.mode}, crop {settings.crop}, stride {settings.stride}), {windows_per_image} windows/image, "
              f"{vocab.embeddings.shape[0]} queries, {args.precision} on {device}, "
              f"{torch.get_num_threads()} torch threads")
        start = time.perf_counter()
        warm_up(hooks.forward, vocab, device, args.precision, warmup, batch_size, crop_hw)
        print(f"warm-up: {warmup} window(s) at batch 1 and {math.ceil(warmup / batch_size) if warmup else 0} "
              f"batch(es) of {batch_size} in {time.perf_counter() - start:.1f} s")

        options = EngineOptions(batch_size=batch_size, workers=args.workers, precision=args.precision, quiet=True)

        def engine():
            resolved = options.for_device(device)
            scorer = SEMANTIC.scorer(method, card, settings, resolved, device)
            evaluation = evaluate(scorer, SEMANTIC.reader(card, samples, settings, root), [s.image_id for s in samples], resolved,
                                  desc=card.name)
            return evaluation.counts, evaluation.num_windows

        def loop():
            with torch.inference_mode():
                return reference_loop(method, vocab, info, card, samples, settings, device, args.precision,
                                      timer_ref[0])

        paths = {"engine": engine, "loop": loop}
        order = args.order.split(",")
        best: dict[str, dict] = {}
        labels: dict[str, list[torch.Tensor]] = {}
        for repeat in range(args.repeats):
            for name in (order if repeat % 2 == 0 else order[::-1]):
                timer_ref[0] = StageTimer(stages, device)
                hooks.labels = []
                result = run_path(name, paths[name], device, timer_ref[0], memory, args.torch_profile)
                title = ("(A) engine: batch %d, workers %d" % (batch_size, args.workers) if name == "engine"
                         else "(B) reference loop: one image, one window per forward")
                print(f"\n{title}  [run {repeat + 1}/{args.repeats}]")
                print_path(result, args.images, memory, device)
                if name not in best or result["seconds"] < best[name]["seconds"]:
                    best[name] = result
                labels.setdefault(name, hooks.labels)  # the first run's maps (every run is deterministic)

        # ---- agreement
        a, b = best["engine"], best["loop"]
        miou_a, miou_b = a["counts"].compute().miou, b["counts"].compute().miou
        if len(labels["engine"]) != args.images or len(labels["loop"]) != args.images:
            raise SystemExit(f"label maps: engine {len(labels['engine'])}, loop {len(labels['loop'])}, "
                             f"expected {args.images}")
        same = total = 0
        worst = 1.0
        for la, lb in zip(labels["engine"], labels["loop"]):
            if la.shape != lb.shape:
                raise SystemExit(f"label map shapes differ: {tuple(la.shape)} vs {tuple(lb.shape)}")
            equal = int((la == lb).sum())
            same, total = same + equal, total + la.numel()
            worst = min(worst, equal / la.numel())
        agreement = same / total

        # ---- summary
        ratio = b["seconds"] / a["seconds"]
        target = CPU_TARGET if device.type == "cpu" else (GPU_TARGET if args.precision != "fp32" else None)
        mem_word = "peak alloc" if device.type == "cuda" else "peak RSS"
        lines = [
            "```",
            f"machine    : {machine_line(device)}",
            f"software   : torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
            f"python {platform.python_version()}",
            f"workload   : {args.method} {args.model} pretrained={args.pretrained}, {args.images} synthetic VOC images "
            f"{width}x{height}, protocol {args.protocol} -> {resized_hw[1]}x{resized_hw[0]}, "
            f"{windows_per_image} windows/image, {args.precision}, warm-up {warmup}, best of {args.repeats}",
            f"(A) engine : batch {batch_size}, workers {args.workers}: {args.images / a['seconds']:.3f} img/s, "
            f"{a['windows'] / a['seconds']:.3f} win/s, {mem_word} {mib(a['peak'])} "
            f"(+{mib(a['peak'] - a['baseline'])})",
            f"(B) loop   : batch 1, in-process decode: {args.images / b['seconds']:.3f} img/s, "
            f"{b['windows'] / b['seconds']:.3f} win/s, {mem_word} {mib(b['peak'])} "
            f"(+{mib(b['peak'] - b['baseline'])})",
            f"speed A/B  : {ratio:.2f}x" + (f" (target {target}x: {'met' if ratio >= target else 'NOT met'})"
                                            if target else ""),
            f"agreement  : mIoU {miou_a:.2f} (A) vs {miou_b:.2f} (B); same label on {100 * agreement:.4f}% of "
            f"{total} pixels (worst image {100 * worst:.4f}%)",
            f"memory     : {memory.kind}",
            f"contention : other processes used {pct(a['others'])} (A) / {pct(b['others'])} (B) of the machine's "
            f"CPUs during the reported runs",
            "```",
        ]
        print("\nsummary\n" + "\n".join(lines))

        failures = []
        if round(miou_a, 2) != round(miou_b, 2):
            failures.append(f"mIoU differs: engine {miou_a:.2f}, loop {miou_b:.2f}")
        if agreement < MIN_AGREEMENT:
            failures.append(f"labels agree on {100 * agreement:.4f}% < {100 * MIN_AGREEMENT:.2f}% of pixels")
        if a["windows"] != b["windows"]:
            failures.append(f"window counts differ: engine {a['windows']}, loop {b['windows']}")
        if failures:
            print("FAILED: " + "; ".join(failures), file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
