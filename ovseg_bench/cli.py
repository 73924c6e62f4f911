"""``ovseg-bench``: parse, build a frozen request, call the library, print (house style rule 5).

Every user-fixable problem is an :class:`OvsegError`: printed as one ``error:`` line, exit 2,
no traceback and no result file.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, OvsegError

RUN_EXAMPLES = """examples:
  ovseg-bench run --method maskclip --dataset demo
  ovseg-bench run --method sclip --dataset all --protocol sclip --data-root ~/data
  ovseg-bench run --method clip-family --dataset all --model ViT-B-16 --pretrained none
  ovseg-bench run --method clip --dataset voc --model tests/assets/tiny_vit.json --pretrained none
  ovseg-bench run --method predictions --predictions my_masks/ --dataset ade20k
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ovseg-bench", description="Exact, reproducible zero-shot semantic segmentation benchmarks.")
    parser.add_argument("--version", action="version", version=f"ovseg-bench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_predict(sub)
    listing = sub.add_parser("list", help="list methods, datasets or protocols")
    listing.add_argument("what", choices=("methods", "datasets", "protocols"))
    _add_results_commands(sub)
    _add_data(sub)
    _add_reco(sub)
    _add_proposals(sub)
    return parser


def _add_proposals(sub: Any) -> None:
    proposals = sub.add_parser(
        "proposals", help="precompute mask proposals per image (for --method glcf), resumable",
        epilog="example:\n  ovseg-bench proposals --source sam --dataset refcoco_val --out proposals/refcoco_sam.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    proposals.add_argument("--source", required=True, choices=("sam",), help="proposal generator: sam (Segment Anything)")
    proposals.add_argument("--dataset", required=True, help="a referring (or semantic) dataset whose images to cover")
    proposals.add_argument("--out", type=Path, required=True,
                           help="proposals JSON to write; an existing file of the same source and settings is continued")
    proposals.add_argument("--model-type", default=None, choices=("vit_b", "vit_l", "vit_h"),
                           help="SAM backbone (default: the config's, vit_h)")
    proposals.add_argument("--checkpoint", type=Path, default=None,
                           help="SAM checkpoint file (default: the published one, downloaded and cached)")
    proposals.add_argument("--config", type=Path, default=None,
                           help="generator settings YAML (default: configs/proposals/sam.yaml, SAM's own defaults)")
    proposals.add_argument("--data-root", type=Path, default=None, help="default: $OVSEG_DATA, else ./data")
    proposals.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    proposals.add_argument("--save-every", type=int, default=50, help="images between saves (default: 50)")
    proposals.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_reco(sub: Any) -> None:
    reco = sub.add_parser("reco", help="ReCo tools: build reference embeddings from an image archive")
    reco_sub = reco.add_subparsers(dest="reco_command", required=True)
    build = reco_sub.add_parser(
        "build-references", help="retrieve and co-segment: one reference embedding per class (ReCo, NeurIPS 2022)",
        epilog="example:\n  ovseg-bench reco build-references --archive imagenet/train --dataset coco_stuff27 "
               "--out refs/coco_stuff27.pkl", formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--archive", type=Path, required=True,
                       help="folder of archive images, searched recursively (ReCo: ImageNet-1k train)")
    names = build.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", type=Path, help="class-name file, one name per line")
    names.add_argument("--dataset", help="dataset name(s), comma-separated or `all`: the classes their methods predict")
    build.add_argument("--out", type=Path, required=True,
                       help="reference file to write (ReCo's pickle format; its record goes to OUT.json)")
    build.add_argument("--archive-embeddings", type=Path, default=None,
                       help="ReCo's published filename_to_ViT_L_14_336px_train_img_embedding.pkl instead of computing")
    build.add_argument("--retrieval-model", default=None,
                       help="open_clip model name or config JSON for retrieval (default: the config's, ViT-L-14-336)")
    build.add_argument("--retrieval-pretrained", default=None,
                       help="open_clip tag or weights file for retrieval (default: the config's, openai)")
    build.add_argument("--k", type=int, default=None, help="images retrieved per class (default: the config's, 50)")
    _add_weights_options(build)
    build.add_argument("--config", type=Path, default=None,
                       help="reco config YAML, e.g. a variant with `seed_slicing: fixed` (default: configs/methods/reco.yaml)")
    build.add_argument("--cache", type=Path, default=None,
                       help="archive-embedding cache file, resumed when it exists (default: under ~/.cache/ovseg_bench/reco)")
    build.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    build.add_argument("--batch-size", type=int, default=32, help="archive images per batch when embedding (default: 32)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_data(sub: Any) -> None:
    data = sub.add_parser("data", help="dataset tools: prepare (download and convert), check")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="report what is found and missing per dataset")
    check.add_argument("names", nargs="*", help="dataset names (default: the eight benchmarks)")
    check.add_argument("--data-root", type=Path, default=None, help="default: $OVSEG_DATA, else ./data")
    check.add_argument("--deep", action="store_true",
                       help="also read every file: GT vs image size (EXIF applied), label values per card, "
                            "EXIF-rotated images, GT sha256 against the ovseg_gt_sha256.json that data prepare writes")
    prepare = data_sub.add_parser("prepare", help="download, extract and convert a benchmark into the MMSegmentation layout")
    prepare.add_argument("names", nargs="+",
                         help="voc | context | coco_stuff | coco_object | cityscapes | ade20k | all (downloads); "
                              "refcoco | refcoco+ | refcocog | referring | coco2014 (converted in place); coco_stuff27 | cityscapes27")
    prepare.add_argument("--data-root", type=Path, default=None, help="default: $OVSEG_DATA, else ./data")
    prepare.add_argument("--download-dir", type=Path, default=None, help="where archives are kept (default: DATA_ROOT/downloads)")
    prepare.add_argument("--from-archive", type=Path, action="append", default=[],
                         help="an archive fetched by hand (repeatable; the only way for Cityscapes)")
    prepare.add_argument("--workers", type=int, default=None, help="parallel conversion processes (default: CPU count)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_results_commands(sub: Any) -> None:
    board = sub.add_parser("leaderboard", help="render the markdown leaderboard from result files")
    board.add_argument("--results", type=Path, required=True, help="folder of result files (searched recursively)")
    board.add_argument("--out", type=Path, default=None,
                       help="markdown file to write, details/ beside it (default: runs/leaderboard/README.md; "
                            "the repository's leaderboard/README.md only when named)")
    board.add_argument("--reported", type=Path, default=None,
                       help="reported paper numbers (default: the shipped leaderboard/reported.yaml)")
    compare = sub.add_parser("compare", help="paired bootstrap between two results on the same images")
    compare.add_argument("a", type=Path, help="result JSON A")
    compare.add_argument("b", type=Path, help="result JSON B")
    compare.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    regress = sub.add_parser("regress", help="CI gate: fail when mIoU drops beyond a tolerance against a baseline")
    regress.add_argument("--results", type=Path, required=True, help="folder of result files")
    regress.add_argument("--baseline", type=Path, required=True, help="baseline file (written by --update)")
    regress.add_argument("--tolerance", type=float, default=0.3, help="allowed mIoU drop in points (default 0.3)")
    regress.add_argument("--update", action="store_true",
                         help="merge the results into the baseline (entries of the same key are replaced and listed)")
    regress.add_argument("--replace", action="store_true", help="with --update: rewrite the baseline from the results alone")


def _add_predict(sub: Any) -> None:
    predict = sub.add_parser("predict", help="segment one image with a free vocabulary and write a colour overlay",
                             epilog='example:\n  ovseg-bench predict --method sclip --image photo.jpg --classes "cat|kitten,sofa,floor"',
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("--method", required=True)
    predict.add_argument("--image", type=Path, required=True)
    predict.add_argument("--classes", required=True,
                         help='comma-separated class names, | between synonyms, e.g. "cat|kitten,sofa,floor"; '
                              'a first class named background gets the method\'s background rule')
    predict.add_argument("--out", type=Path, default=Path("overlay.png"), help="overlay PNG (default: overlay.png)")
    predict.add_argument("--protocol", default="tcl", help="resize and window settings (default: tcl)")
    _add_weights_options(predict)
    predict.add_argument("--config", type=Path, default=None,
                         help="method config YAML (default: configs/methods/<method>.yaml)")
    predict.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    predict.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 (default: fp32)")


def _add_weights_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="open_clip model name or model-config JSON path (default: the method config's)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip tag, weights file, or `none` for random weights (default: the method config's)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="method checkpoint file (default: the published one, downloaded and cached)")


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="evaluate a method on datasets", epilog=RUN_EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--method", required=True,
                     help="a registered method (`ovseg-bench list methods`), a comma list, or `clip-family` (clip, "
                          "maskclip, sclip, clearclip, naclip); methods sharing a trunk compute it once per window")
    run.add_argument("--dataset", action="append", required=True,
                     help="dataset name(s), comma-separated or repeated; `all` = the eight semantic benchmarks, "
                          "`referring` = the eight RefCOCO/+/g splits")
    run.add_argument("--protocol", default="tcl",
                     help="protocol preset, or `native` for the method's own (default: tcl; `ovseg-bench list protocols`)")
    run.add_argument("--data-root", type=Path, default=None, help="default: $OVSEG_DATA, else ./data")
    run.add_argument("--output", type=Path, default=Path("runs"), help="result folder (default: runs/)")
    _add_weights_options(run)
    run.add_argument("--config", type=Path, default=None,
                     help="method config YAML (default: configs/methods/<method>.yaml); its `name` must be the "
                          "method's, or the file declares `variant_of: <method>` and a name of its own")
    run.add_argument("--predictions", action="append", default=[], metavar="DIR|NAME=DIR",
                     help="label PNG folder for --method predictions; several datasets: DIR/<dataset>/ or "
                          "NAME=DIR per dataset (repeatable)")
    run.add_argument("--predictions-out-of-range", default="error", choices=("error", "ignore"),
                     help="prediction values outside the classes (not 255): error (default) or ignore, "
                          "mmseg's drop, recorded in the result")
    run.add_argument("--references", type=Path, default=None,
                     help="ReCo's reference embeddings: a published pickle of {class name: embedding} or a "
                          "`reco build-references` file (methods reco, reco_nocrf)")
    run.add_argument("--proposals", type=Path, default=None,
                     help="mask proposals per image, the JSON of `ovseg-bench proposals` or your own FreeSOLO "
                          "masks in that format (method glcf)")
    run.add_argument("--labels-from", default=None, choices=("gt", "xml"),
                     help="label-conditioned track: image labels from the GT or the VOC XML annotations "
                          "(default: the card's first, gt; part of the fingerprint)")
    run.add_argument("--bg-threshold", type=float, default=None,
                     help="saved CAMs (label-conditioned track, --method predictions): the fixed background threshold "
                          "on the 0.30..0.60 grid (default: 0.45)")
    run.add_argument("--batch-size", type=int, default=None,
                     help="windows per forward pass, across images (default: 16 on CUDA, 1 on CPU)")
    run.add_argument("--workers", type=int, default=None,
                     help="DataLoader workers for decode and resize (default: up to 4 on CUDA, 0 on CPU)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto, which picks CUDA when present)")
    run.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 (default: fp32; autocast; part of the fingerprint)")
    run.add_argument("--limit", type=int, default=None,
                     help="first N images in listing order (default: all; quick CI mode; N and the rule are in the fingerprint)")
    run.add_argument("--on-error", default="fail", choices=("fail", "skip"),
                     help="fail (default) or skip unreadable images; skipped ones are counted and listed")
    run.add_argument("--quiet", action="store_true", help="no progress bars (where results go is still printed)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its saved state; skip datasets already done")
    run.add_argument("--no-cache", action="store_true",
                     help="do not read or write the on-disk text-embedding cache ($OVSEG_TEXT_CACHE, default "
                          "~/.cache/ovseg_bench/text)")
    run.add_argument("--save-cams", action="store_true",
                     help="label-conditioned track: write each image's CAMs to OUTPUT/cams/<method>/<dataset>/<image_id>.npy "
                          "in its method's format (WeakTr's {0-based class: float32 HxW}; CLIP-ES's {keys, attn_highres})")
    run.add_argument("--save-predictions", action="store_true",
                     help="write label PNGs under OUTPUT/predictions/<method>/<dataset>/ (readable by --method predictions)")
    run.add_argument("--visualize", type=int, default=0, metavar="N",
                     help="write image | ground truth | prediction panels for the first N images (default: 0)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "list":
            return _list(args.what)
        if args.command == "data" and args.data_command == "check":
            return _data_check(args)
        return _delegate(args)
    except OvsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


SKIPPED_SHOWN = 5  # skipped image ids printed on the console; the result file lists all


# Commands other than run, list and data check: (function of this module taking the parsed args).
def _delegate(args: argparse.Namespace) -> int:
    key = args.data_command if args.command == "data" else args.command
    return {"leaderboard": _leaderboard, "compare": _compare, "regress": _regress, "predict": _predict,
            "prepare": _prepare, "reco": _reco_build, "proposals": _proposals}[key](args)


def _proposals(args: argparse.Namespace) -> int:
    from .proposals import ProposalsRequest, precompute_proposals

    request = ProposalsRequest(source=args.source, dataset=args.dataset, out=args.out, model_type=args.model_type,
                               checkpoint=args.checkpoint, data_root=args.data_root, config=args.config,
                               device=args.device, save_every=args.save_every, quiet=args.quiet)
    summary = precompute_proposals(request, log=lambda line: print(line, file=sys.stderr))
    print(summary.line())
    return 0


def _reco_build(args: argparse.Namespace) -> int:
    from .methods.base import WeightsOptions
    from .methods.reco import BuildRequest, build_reference_file
    from .plan import reference_classes

    classes, source = reference_classes(classes_file=args.classes, datasets=args.dataset)
    request = BuildRequest(
        archive=args.archive, out=args.out, classes=tuple(classes), class_source=source,
        weights=WeightsOptions(args.model, args.pretrained, args.checkpoint),
        retrieval_model=args.retrieval_model, retrieval_pretrained=args.retrieval_pretrained,
        archive_embeddings=args.archive_embeddings, k=args.k, config=args.config, cache=args.cache,
        device=args.device, batch_size=args.batch_size, quiet=args.quiet)
    build_reference_file(request, log=lambda line: print(line, file=sys.stderr))
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import render_leaderboard

    notes, summary = render_leaderboard(args.results, args.out, args.reported)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .stats import compare_report

    print(compare_report(args.a, args.b, resamples=args.resamples, seed=args.seed))
    return 0


def _regress(args: argparse.Namespace) -> int:
    """Exit 0 pass, 1 regression/change/missing, 2 not comparable or bad input."""
    from .regress import regress, update

    def warn(line: str) -> None:
        print(f"note: {line}", file=sys.stderr)

    if args.replace and not args.update:
        raise ConfigError("--replace only goes with --update (it rewrites the baseline from the results alone)")
    if args.update:
        print(update(args.results, args.baseline, replace=args.replace, warn=warn))
        return 0
    code, report = regress(args.results, args.baseline, tolerance=args.tolerance, warn=warn)
    print(report)
    return code


def _predict(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .methods.base import WeightsOptions
    from .pictures import PredictRequest, format_share, parse_classes, predict

    request = PredictRequest(
        method=args.method, image=args.image, classes=parse_classes(args.classes), out=args.out,
        protocol=args.protocol, weights=WeightsOptions(args.model, args.pretrained, args.checkpoint),
        method_config=args.config, device=args.device, precision=args.precision)
    result = predict(request)
    if result.weights.get("random"):
        from .methods.clip_model import RANDOM_WEIGHTS_NOTE

        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    height, width = result.labels.shape
    print(f"{result.path} ({width}x{height} image, overlay with legend)")
    rows = [[name, format_share(share)] for name, share in zip(result.names, result.shares)]
    print(tabulate(rows, headers=["class", "pixels"], colalign=("left", "right")))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .datasets.prepare import prepare, prepare_options
    from .plan import default_data_root

    data_root = Path(args.data_root or default_data_root())
    run = prepare(args.names, prepare_options(data_root, download_dir=args.download_dir,
                                              from_archives=args.from_archive, workers=args.workers, quiet=args.quiet))
    for line in run.lines:
        print(line)
    for line in run.errors:
        print(line, file=sys.stderr)
    return run.code


def _text_cache_note() -> None:
    """One line saying whether the class texts came from the on-disk cache."""
    from .methods.prompts import TextCache

    if TextCache.hits:
        print(f"text embeddings: {TextCache.hits} of {TextCache.hits + TextCache.misses} encodings read from the "
              f"cache ({TextCache().root}; --no-cache to recompute)", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from .engine.runner import EngineOptions
    from .methods.base import MethodInputs, WeightsOptions
    from .plan import RunRequest, default_data_root, expand_datasets, run_plan

    request = RunRequest(
        method=args.method, datasets=expand_datasets(args.dataset), protocol=args.protocol,
        data_root=args.data_root or default_data_root(), output=args.output,
        weights=WeightsOptions(args.model, args.pretrained, args.checkpoint),
        inputs=MethodInputs(tuple(args.predictions), args.predictions_out_of_range, args.bg_threshold, args.references,
                            args.proposals),
        method_config=args.config, device=args.device, limit=args.limit, resume=args.resume,
        save_predictions=args.save_predictions, visualize=args.visualize, labels_from=args.labels_from,
        save_cams=args.save_cams,
        engine=EngineOptions(args.batch_size, args.workers, args.precision, args.on_error, args.quiet))

    def report(result: dict[str, Any], path: Path, replaced: bool) -> None:
        # Printed under --quiet too: where the results went is never a progress bar.
        note = " (replaced the earlier result of this same run)" if replaced else ""
        print(f"{result['dataset']['name']}: mIoU {result['metrics']['mIoU']:.2f} -> {path}{note}", file=sys.stderr)
        skipped = result["images"]["skipped"]
        if skipped:
            shown = ", ".join(s["image_id"] for s in skipped[:SKIPPED_SHOWN]) + (", ..." if len(skipped) > SKIPPED_SHOWN else "")
            print(f"{result['dataset']['name']}: {len(skipped)} image(s) skipped as unreadable (--on-error skip), "
                  f"not scored: {shown}; all are listed under images.skipped in {path.name}", file=sys.stderr)

    if args.no_cache:
        os.environ["OVSEG_TEXT_CACHE"] = "off"  # read by every TextCache of this process
    results = run_plan(request, on_result=report, on_note=lambda line: print(line, file=sys.stderr))
    _text_cache_note()
    # Under torchrun only rank 0 gets results; the other ranks stay quiet. One table per method.
    for method in dict.fromkeys(r["method"]["name"] for r in results):
        print(summary_table([r for r in results if r["method"]["name"] == method]))
    return 0


def summary_table(results: list[dict[str, Any]]) -> str:
    """One table per track: datasets x (mIoU ± CI half-width, the track's own columns, the
    fingerprint, items) plus the Avg row; random weights flagged."""
    from tabulate import tabulate

    from .tracks import get_track

    first = results[0]
    title = (f"{first['method']['name']} | protocol {first['protocol']['preset']} | {first['protocol']['precision']} "
             "| mIoU ± half-width of its 95% bootstrap interval")
    if first["method"]["weights"].get("random"):
        from .methods.clip_model import RANDOM_WEIGHTS_NOTE

        title += "\n" + RANDOM_WEIGHTS_NOTE
    parts = [title]
    for track_name in dict.fromkeys(r["dataset"]["track"] for r in results):
        group = [r for r in results if r["dataset"]["track"] == track_name]
        columns = get_track(track_name).console_columns
        rows = [[r["dataset"]["name"], _miou_cell(r["metrics"]), *(_cell(r["metrics"], c) for c in columns),
                 r["protocol"]["fingerprint"][:8], f"{r['images']['seen']}/{r['images']['expected']}"] for r in group]
        if len(group) > 1:
            avg = round(sum(r["metrics"]["mIoU"] for r in group) / len(group), 2)
            rows.append(["Avg", f"{avg:.2f}", *([""] * len(columns)), "", ""])
        headers = ["dataset", "mIoU", *columns, "fingerprint", "items"]
        parts.append(f"[{track_name}]" if len(results) != len(group) or track_name != "semantic" else "")
        parts.append(tabulate(rows, headers=headers, floatfmt=".2f", colalign=("left", "right")))
    return "\n".join(p for p in parts if p)


def _cell(metrics: dict[str, Any], column: str) -> Any:
    """A console cell: a metric (``best`` = the best background threshold and its mIoU)."""
    value = metrics.get(column)
    if isinstance(value, dict):
        return f"{value['bg_threshold']}: {value['mIoU']:.2f}"
    return "–" if value is None else value


def _miou_cell(metrics: dict[str, Any]) -> str:
    ci = metrics.get("ci95")
    return f"{metrics['mIoU']:.2f}" + (f" ± {ci['half_width']:.2f}" if ci else "")


def _list(what: str) -> int:
    from tabulate import tabulate

    if what == "methods":
        from .registry import get_method, method_names

        rows = [[n, ", ".join(get_method(n).tracks)] for n in method_names()]
        print(tabulate(rows, headers=["method", "tracks"]))
    elif what == "datasets":
        from .datasets.cards import DATASET_GROUPS, card_names, load_card

        rows = [[c.name, c.track, getattr(c, "num_classes", "–"), c.num_images, c.title]
                for c in map(load_card, card_names())]
        print(tabulate(rows, headers=["dataset", "track", "classes", "images", "title"]))
        print("groups: " + "; ".join(f"{group} = {', '.join(names)}" for group, names in DATASET_GROUPS.items()))
    else:
        from .engine.protocol import NATIVE, load_protocol, protocol_names

        rows = [[n, load_protocol(n).description] for n in protocol_names()]
        rows.append([NATIVE, "each method's own published settings: resolves per method to the preset its config "
                             "names (tcl -> tcl, sclip -> sclip, ...); the result records both names"])
        print(tabulate(rows, headers=["protocol", "description"], maxcolwidths=[None, 90]))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from .datasets.cards import ALL_BENCHMARKS, load_card
    from .datasets.check import format_checks
    from .plan import default_data_root, expand_datasets
    from .tracks import get_track

    root = args.data_root or default_data_root()
    cards = [load_card(name) for name in expand_datasets(args.names or list(ALL_BENCHMARKS))]
    checks = [get_track(card.track).check(card, root, deep=args.deep) for card in cards]
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
