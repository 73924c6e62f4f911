#!/usr/bin/env python
"""A full leaderboard run: the five CLIP baselines on the eight benchmarks, with sharing and
the reference-harness way.

On a synthetic tree in the eight layouts at the benchmarks' real image sizes (a few images
each), with ViT-B-16 random weights on the ``tcl`` preset:

(A) the engine with sharing, as one command: ``run --method clip-family --dataset all``
    (``plan.run_plan``). Paired datasets read one stream of images, clip/sclip/clearclip/naclip
    compute CLIP's first eleven blocks once per window, each name is text-encoded once per
    template set. The text cache starts empty (a fresh folder), so the text side is paid once.
(B) the reference-harness way: one method, one dataset, one image and one window at a time
    (mmseg's ``slide_inference`` at batch 1), the text side encoded anew for every (method,
    dataset), as each reference run builds its segmentor. Each method's weights are built once.

The script fails (exit 1) unless both give the same label on every pixel of every image
(``--min-agreement`` relaxes that for batched CUDA kernels), and prints both times, the ratio,
the forward passes of each side (windows through a trunk, through a last part, full passes),
the texts encoded and the peak memory.

``--templates N`` keeps the first N templates of each set on both sides (default 1): the full
sets (80 and 85 templates) make the reference side's text encoding alone take hours on a CPU.

    .venv/bin/python benchmarks/full_run.py                     # 2 images a dataset, 1 template
    .venv/bin/python benchmarks/full_run.py --device cuda --templates 0 --min-agreement 99.99
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from engine_speed import PeakMemory, machine_line, mib, mmseg_slide_grid  # noqa: E402
from ovseg_bench.datasets.cards import ALL_BENCHMARKS, load_card  # noqa: E402
from ovseg_bench.datasets.listing import list_samples  # noqa: E402
from ovseg_bench.engine.protocol import load_protocol  # noqa: E402
from ovseg_bench.engine.runner import EngineOptions, autocast_context  # noqa: E402
from ovseg_bench.imaging import decode_image, model_input  # noqa: E402
from ovseg_bench.methods import prompts  # noqa: E402
from ovseg_bench.methods.base import WeightsOptions  # noqa: E402
from ovseg_bench.plan import RunRequest, run_plan  # noqa: E402
from ovseg_bench.registry import METHOD_GROUPS, get_method  # noqa: E402
from ovseg_bench.tracks.semantic import dataset_info  # noqa: E402
from tests.synthetic import write_dataset  # noqa: E402

METHODS = METHOD_GROUPS["clip-family"]
PRESET = "tcl"
TARGET = 4.0
# (height, width) per tree, the benchmarks' own: VOC and Context 500x375 both ways, COCO 640x480
# and 640x427, Cityscapes 2048x1024, ADE20K 683x512 and 512x512.
REAL_SIZES = {"voc": [(375, 500), (500, 375)], "context": [(375, 500), (333, 500)],
              "coco_stuff": [(480, 640), (427, 640)], "cityscapes": [(1024, 2048)],
              "ade20k": [(512, 683), (512, 512)]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="images per dataset (default 2)")
    parser.add_argument("--templates", type=int, default=1, help="first N templates of each set, both sides; 0 = all")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch-size", type=int, default=None, help="engine windows per pass (default: the device's)")
    parser.add_argument("--min-agreement", type=float, default=100.0,
                        help="%% of pixels that must carry the same label (default 100: identical)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=None, help="keep the tree and outputs here (default: a temp dir)")
    return parser.parse_args(argv)


def write_tree(root: Path, images: int) -> None:
    for tree, sizes in REAL_SIZES.items():
        write_dataset(tree, root, num_images=images, sizes=sizes)


class TextCount:
    """Wraps ``prompts.encode_names``: texts encoded (names x templates) while it is installed."""

    def __init__(self, templates: int):
        self.texts, self.original, self.templates = 0, prompts.encode_names, templates
        self.load_templates = prompts.load_templates

    def __enter__(self) -> "TextCount":
        def counting(model, tokenizer, names, templates, *args):
            self.texts += len(names) * len(templates)
            return self.original(model, tokenizer, names, templates, *args)

        def first_templates(name):
            found = self.load_templates(name)
            return found[: self.templates] if self.templates else found

        prompts.encode_names, prompts.load_templates = counting, first_templates
        return self

    def __exit__(self, *exc) -> None:
        prompts.encode_names, prompts.load_templates = self.original, self.load_templates


def shared_run(args: argparse.Namespace, root: Path, out: Path, device: torch.device) -> dict:
    """(A): one ``run_plan`` call; its label PNGs, results and passes."""
    os.environ["OVSEG_TEXT_CACHE"] = str(out / "text-cache")  # empty: the text side is paid once
    prompts.ENCODED.clear()
    request = RunRequest(method="clip-family", datasets=ALL_BENCHMARKS, protocol=PRESET, data_root=root, output=out,
                         weights=WeightsOptions(args.model, "none"), device=str(device), limit=args.images,
                         save_predictions=True,
                         engine=EngineOptions(batch_size=args.batch_size, workers=0, precision=args.precision, quiet=True))
    notes: list[str] = []
    start = time.perf_counter()
    results = run_plan(request, on_note=notes.append)
    seconds = time.perf_counter() - start
    streams = {tuple(r["timing"]["shared"]["stream"]): r["timing"]["shared"] for r in results if "shared" in r["timing"]}
    passes = {key: sum(s[key] for s in streams.values()) for key in ("trunk_windows", "branch_windows", "separate_windows")}
    return {"seconds": seconds, "results": results, "passes": passes, "notes": notes}


def reference_run(args: argparse.Namespace, root: Path, device: torch.device) -> dict:
    """(B): method by method, dataset by dataset, image by image, window by window."""
    os.environ["OVSEG_TEXT_CACHE"] = prompts.NO_CACHE
    preset = load_protocol(PRESET)
    labels: dict[tuple[str, str, str], np.ndarray] = {}
    windows = 0
    start = time.perf_counter()
    for name in METHODS:
        method = get_method(name)(WeightsOptions(args.model, "none"), device)
        for dataset in ALL_BENCHMARKS:
            card, settings = load_card(dataset), preset.settings_for(dataset)
            info = dataset_info(card)
            prompts.ENCODED.clear()  # each reference run encodes its text side anew
            vocab = method.encode_classes(card.prediction_synonyms(settings.classnames), info)
            for ref in list_samples(card, root)[: args.images]:
                bgr = decode_image(ref.image_path)
                rgb = model_input(bgr, settings.short_side, settings.long_side, rule=settings.resize,
                                  interpolation=settings.interpolation)
                image = method.normalisation.apply(rgb[None].to(device))[0]
                height, width = image.shape[-2:]
                canvas, count = None, torch.zeros((1, 1, height, width), device=device)
                with torch.inference_mode():
                    for y1, y2, x1, x2 in mmseg_slide_grid(height, width, settings.crop, settings.stride):
                        with autocast_context(device, args.precision):
                            logits = method.forward_windows(image[:, y1:y2, x1:x2][None], vocab).float()
                        if canvas is None:
                            canvas = torch.zeros((1, logits.shape[1], height, width), device=device)
                        canvas[:, :, y1:y2, x1:x2] += logits
                        count[:, :, y1:y2, x1:x2] += 1
                        windows += 1
                    scores = F.interpolate(canvas / count, size=bgr.shape[:2], mode="bilinear", align_corners=False)[0]
                    labels[(name, dataset, ref.image_id)] = method.postprocess(scores, image, vocab, info).cpu().numpy()
        del method
    return {"seconds": time.perf_counter() - start, "labels": labels, "windows": windows}


def agreement(out: Path, reference: dict[tuple[str, str, str], np.ndarray]) -> tuple[int, int, int]:
    """(images compared, pixels compared, pixels that differ) between (A)'s PNGs and (B)'s labels."""
    pixels = differ = 0
    for (method, dataset, image_id), labels in reference.items():
        png = out / "predictions" / method / dataset / f"{image_id}.png"
        saved = np.asarray(Image.open(png))
        if saved.shape != labels.shape:
            raise SystemExit(f"{png}: shape {saved.shape}, the reference loop's labels are {labels.shape}")
        pixels += labels.size
        differ += int((saved != labels).sum())
    return len(reference), pixels, differ


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        root = work / "data"
        write_tree(root, args.images)
        memory = PeakMemory(device)
        with TextCount(args.templates) as texts:
            memory.reset()
            shared = shared_run(args, root, work / "shared", device)
            shared_peak, shared_texts = memory.peak() - memory.baseline, texts.texts
            memory.reset()
            reference = reference_run(args, root, device)
            reference_peak, reference_texts = memory.peak() - memory.baseline, texts.texts - shared_texts
        images, pixels, differ = agreement(work / "shared", reference["labels"])
    same = 100.0 * (pixels - differ) / pixels
    passes = shared["passes"]
    ratio = reference["seconds"] / shared["seconds"]
    templates = "all templates" if not args.templates else f"first {args.templates} template(s) of each set"
    print("\n".join(shared["notes"]))
    print(f"""
machine    : {machine_line(device)}
software   : torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, python {sys.version.split()[0]}
workload   : {', '.join(METHODS)} x {len(ALL_BENCHMARKS)} datasets, {args.images} images each at real sizes, {args.model} random weights, preset {PRESET}, {args.precision}, {templates}
(A) shared : {shared['seconds']:.1f} s; {passes['trunk_windows']} window passes through trunks + {passes['branch_windows']} through last parts; {shared_texts} texts encoded; {"peak alloc" if device.type == "cuda" else "peak RSS"} +{mib(shared_peak)}
(B) harness: {reference['seconds']:.1f} s; {reference['windows']} full window passes; {reference_texts} texts encoded; {"peak alloc" if device.type == "cuda" else "peak RSS"} +{mib(reference_peak)}
speed B/A  : {ratio:.2f}x (target {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'})
agreement  : {images} images, same label on {same:.4f}% of {pixels} pixels""")
    if same < args.min_agreement:
        print(f"FAIL: labels differ on {differ} pixels (required: {args.min_agreement}% the same)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
