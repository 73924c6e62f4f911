"""Golden numbers (issue 6): deterministic inputs, every registered method run on them, and the
baseline that ``ovseg-bench regress --tolerance 0`` gates them with.

Nothing big is committed. From fixed seeds this writes, into a work folder:

- ``weights/tiny_vit.pt``: an open_clip state dict of ``tests/assets/tiny_vit.json``. The keys and
  shapes come from open_clip's model, the values from this script's own generator and fill rule,
  so the golden depends neither on open_clip's init code nor on the ``--pretrained none`` path.
- ``weights/tcl_tiny.pth``: a TCL checkpoint in the published key layout for that backbone.
- ``data/``: a small synthetic voc and ade20k tree (``tests.synthetic.write_dataset``).
- ``predictions/<dataset>/<image_id>.png``: label maps for ``--method predictions``.
- ``data_refer/``, ``data_lc/``: a refer tree (refcoco, converted) and a VOC train tree, with
  binary masks per referring sample and WeakTr-format CAMs per image under ``predictions/``, so
  the sweep covers the referring and label-conditioned tracks too (``TRACK_COMBOS``).

then runs every registered method through the in-process CLI (``--workers 0 --quiet --device
cpu``, one torch thread) into ``results/``: each method on voc under the ``tcl`` protocol and on
ade20k under the ``sclip`` protocol.

Usage::

    .venv/bin/python tests/golden/make_golden.py --update     # rewrite tests/golden/baseline.json
    .venv/bin/python tests/golden/make_golden.py --check      # rerun and gate (what the test does)
    .venv/bin/python tests/golden/make_golden.py --work DIR   # keep the inputs and results in DIR

A method registered later runs with the tiny CLIP weights (``--model``/``--pretrained``) unless
``EXTRA_ARGS`` below says otherwise; it must be added to the baseline with ``--update``
(``tests/test_golden.py`` fails while any registered method has no entry).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent
BASELINE = GOLDEN_DIR / "baseline.json"
TINY_MODEL = REPO / "tests" / "assets" / "tiny_vit.json"

WEIGHTS_SEED, TCL_SEED, DATA_SEED, PREDICTIONS_SEED = 1601, 1602, 1603, 1604
RECO_SEED = 1606
GLCF_SEED = 1607
CAM_SEED = 1608
TINY_VIT16_12 = REPO / "tests" / "assets" / "tiny_vit16_12.json"
# WeakTr's generators run a tiny architecture through a config variant (the network's shape is
# configuration, not readable from the checkpoint): the baseline keys carry the variant's name.
WEAKTR_METHODS = ("weaktr", "semples", "weaktr_crf", "semples_crf")
GOLDEN_VARIANTS = {m: f"{m}_golden" for m in WEAKTR_METHODS}
WEAKTR_TINY = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, img_size=64, reduction=2.0, feat_reduction=8)
TINY_B32 = REPO / "tests" / "assets" / "tiny_vit_b32.json"
TINY_RN = REPO / "tests" / "assets" / "tiny_rn.json"
NUM_IMAGES = 2
SIZES = ((48, 64), (70, 42))          # (h, w): a landscape and a portrait image
# (dataset, protocol preset) every method is run on.
COMBOS = (("voc", "tcl"), ("ade20k", "sclip"))
# The other tracks, served by `predictions` (saved masks and CAMs): (dataset, preset, data key).
# The CLIP family runs the harness's dense referring baseline; glcf serves the referring track only.
REFERRING = (("refcoco_val", "tcl", "data_refer"),)
TRACK_COMBOS = {"predictions": (*REFERRING, ("voc_train", "tcl", "data_lc")), "glcf": REFERRING,
                **{m: REFERRING for m in ("clip", "maskclip", "sclip", "clearclip", "naclip")},
                **{m: (("voc_train", "tcl", "data_lc"),) for m in (*WEAKTR_METHODS, "clip_es", "clip_es_crf")}}
TRACKS_SEED = 1605
NUM_CLASSES = {"voc": 21, "ade20k": 150}  # label values after reduce_zero_label (predictions)


# ----------------------------------------------------------------------------- inputs

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_clip_state(seed: int = WEIGHTS_SEED, model: Path = TINY_MODEL) -> dict[str, torch.Tensor]:
    """An open_clip state dict of a tiny config (ViT or ResNet) with values from our own seeded fill rule."""
    from ovseg_bench.methods.clip_model import _register_model
    import open_clip

    from ovseg_bench.methods.clip_model import _quiet_root_logger

    name = _register_model(str(model))
    with _quiet_root_logger():  # open_clip warns that no weights were loaded
        net = open_clip.create_model(name, pretrained=None)
    gen = _gen(seed)
    state = {}
    reference = net.state_dict()
    for key, ref in reference.items():  # insertion order is fixed by the module tree
        if not ref.is_floating_point():
            state[key] = ref.clone()
            continue
        noise = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        parts = key.split(".")
        leaf, module = parts[-1], (parts[-2] if len(parts) > 1 else "")
        if key == "logit_scale":
            value = torch.full(ref.shape, math.log(1 / 0.07), dtype=torch.float64)
        elif module.startswith("ln"):  # ln_pre, ln_post, ln_final, ln_1, ln_2
            value = (1.0 + 0.1 * noise) if leaf == "weight" else 0.02 * noise
        elif ".".join(parts[:-1] + ["running_var"]) in reference:  # ModifiedResNet's BatchNorms
            value = {"weight": 1.0 + 0.1 * noise, "running_var": 1.0 + 0.1 * noise.abs()}.get(leaf, 0.02 * noise)
        elif leaf == "bias" or ref.ndim <= 1:
            value = 0.02 * noise
        elif "positional_embedding" in key or "token_embedding" in key:
            value = 0.02 * noise
        else:  # weight matrices / conv kernels / projections: unit variance per output
            fan_in = ref.shape[0] if key.endswith(("proj", "text_projection")) else math.prod(ref.shape[1:])
            value = noise / math.sqrt(fan_in)
        state[key] = value.to(ref.dtype)
    return state


def tcl_state(seed: int = TCL_SEED) -> dict[str, torch.Tensor]:
    """Random values in TCL's published checkpoint layout for the tiny backbone (3 blocks, width 64)."""
    from tests.methods.test_tcl import BLOCK, EMBED, WIDTH, published_shapes

    gen = _gen(seed)
    state = {}
    for key, shape in published_shapes(WIDTH, EMBED, BLOCK).items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if key.endswith(("norm.weight", "ln.weight", "ln_1.weight", "ln_2.weight")):
            value = 1.0 + 0.2 * noise
        elif key.endswith("gate.gate"):
            value = 0.8 * noise            # non-zero gates: the decoder is not the identity
        elif len(shape) >= 2:
            value = noise / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.2 * noise
        state[key] = value.float()
    state["masker.sim2mask.w"], state["masker.sim2mask.b"] = torch.tensor(6.0), torch.tensor(-0.5)
    state["tcli_loss.logit_scale"] = torch.tensor(4.6)
    state["tclf_loss.logit_scale"] = torch.tensor(4.6)
    return {"model": state}


def prediction_map(rng: np.random.Generator, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """A label map that agrees with ``gt`` (already reduced) on some blocks and is random elsewhere,
    with an out-of-range value and 255 among the random ones (what real predictions may hold)."""
    h, w = gt.shape
    values = np.concatenate([np.arange(num_classes), [num_classes, 255]])
    gh, gw = rng.integers(2, 6, size=2)
    rows, cols = (np.arange(h) * gh // h)[:, None], (np.arange(w) * gw // w)[None, :]
    keep = (rng.random((gh, gw)) < 0.6)[rows, cols]
    noise = rng.choice(values, size=(gh, gw)).astype(np.uint8)[rows, cols]
    return np.where(keep & (gt != 255), gt, noise).astype(np.uint8)


def reduced_gt(data_root: Path, dataset: str, image_id: str) -> np.ndarray:
    """The GT of ``image_id`` as class indices (voc: as stored; ade20k: reduce_zero_label)."""
    (path,) = [p for p in data_root.rglob(f"{image_id}.png")]
    gt = np.array(Image.open(path))
    if dataset == "ade20k":
        gt = np.where((gt == 0) | (gt == 255), 255, gt.astype(np.int64) - 1).astype(np.uint8)
    return gt


def write_inputs(work: Path) -> dict[str, Path]:
    """Write weights, TCL checkpoint, data tree and prediction PNGs under ``work``; their paths."""
    from tests.synthetic import write_dataset

    work = Path(work)
    paths = {"weights": work / "weights" / "tiny_vit.pt", "checkpoint": work / "weights" / "tcl_tiny.pth",
             "data": work / "data", "predictions": work / "predictions", "data_refer": work / "data_refer",
             "data_lc": work / "data_lc"}
    paths["weights"].parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_clip_state(), paths["weights"])
    torch.save(tcl_state(), paths["checkpoint"])
    for k, (dataset, _) in enumerate(COMBOS):
        ids = write_dataset(dataset, paths["data"], num_images=NUM_IMAGES, seed=DATA_SEED + k, sizes=SIZES)
        rng = np.random.default_rng(PREDICTIONS_SEED + k)
        for image_id in ids:
            out = paths["predictions"] / dataset / f"{image_id}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            gt = reduced_gt(paths["data"], dataset, image_id)
            Image.fromarray(prediction_map(rng, gt, NUM_CLASSES[dataset])).save(out)
    write_track_inputs(paths)
    write_reco_inputs(paths)
    write_glcf_inputs(paths)
    write_cam_inputs(paths)
    return paths


def write_cam_inputs(paths: dict[str, Path]) -> None:
    """A tiny WeakTr checkpoint with one config variant per WeakTr method, tiny 12-layer CLIP
    weights for clip_es."""
    import dataclasses

    from ovseg_bench.methods.weaktr import WeakTrNet, load_weaktr_config
    from tests.methods.test_weaktr import write_variant

    base = paths["weights"].parent
    config = dataclasses.replace(load_weaktr_config("weaktr"), **WEAKTR_TINY)
    net = WeakTrNet(config)
    gen = _gen(CAM_SEED)
    state = {k: torch.randn(v.shape, generator=gen) * (0.3 if k.endswith("weight") else 0.1)
             + (1.0 if "norm" in k and k.endswith("weight") else 0.0) for k, v in net.state_dict().items()}
    paths["weaktr_ckpt"] = base / "weaktr_tiny.pth"
    torch.save({"model": state}, paths["weaktr_ckpt"])
    for method in WEAKTR_METHODS:
        tiny = dataclasses.replace(load_weaktr_config(method), **WEAKTR_TINY)
        paths[f"config_{method}"] = write_variant(base, tiny, method, GOLDEN_VARIANTS[method])
    paths["vit16_12_weights"] = base / "tiny_vit16_12.pt"
    torch.save(tiny_clip_state(CAM_SEED, TINY_VIT16_12), paths["vit16_12_weights"])


def write_glcf_inputs(paths: dict[str, Path]) -> None:
    """Tiny ViT-B/32-shaped CLIP weights and a proposals file of rectangles for the refer tree."""
    import json

    from ovseg_bench.methods.proposals import encode_mask, write_proposals

    paths["b32_weights"] = paths["weights"].parent / "tiny_vit_b32.pt"
    torch.save(tiny_clip_state(GLCF_SEED, TINY_B32), paths["b32_weights"])
    rng = np.random.default_rng(GLCF_SEED)
    images = {}
    sizes = [(str(image["id"]), image["height"], image["width"])
             for image in json.loads((paths["data_refer"] / "refcoco" / "instances.json").read_text())["images"]]
    for dataset, _ in COMBOS:  # the semantic extension runs on the same images as every method
        for gt in sorted((paths["data"]).rglob("*.png")):
            image_id = gt.stem
            if (paths["predictions"] / dataset / f"{image_id}.png").is_file():
                h, w = np.array(Image.open(gt)).shape[:2]
                sizes.append((image_id, h, w))
    for image_id, h, w in sizes:
        entries = []
        for k in range(4):
            mask = np.zeros((h, w), dtype=bool)
            y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            mask[y:y + int(rng.integers(3, h // 2)), x:x + int(rng.integers(3, w // 2))] = True
            entries.append({"rle": encode_mask(mask), "score": 1.0 - k / 8})
        images[image_id] = entries
    paths["proposals"] = paths["weights"].parent / "proposals.json"
    write_proposals(paths["proposals"], "golden rectangles", {"seed": GLCF_SEED}, images)


def write_reco_inputs(paths: dict[str, Path]) -> None:
    """ReCo's three inputs in their published layouts: DenseCLIP weights of the tiny ResNet, a
    distilled DeiT checkpoint ({"model": ...}), and a reference pickle per dataset."""
    import pickle

    from ovseg_bench.datasets.cards import load_card
    from tests.methods.test_reco import write_tiny_deit

    paths["rn_weights"] = paths["weights"].parent / "tiny_rn.pt"
    torch.save(tiny_clip_state(RECO_SEED, TINY_RN), paths["rn_weights"])
    paths["deit"] = write_tiny_deit(paths["weights"].parent / "deit_tiny.pth", seed=RECO_SEED)
    gen = _gen(RECO_SEED)
    for dataset, _ in COMBOS:  # a reference for every name either naming scheme uses
        card = load_card(dataset)
        names = dict.fromkeys(n for scheme in ("mmseg", "sclip") for c in card.class_synonyms(scheme) for n in c)
        refs = {name: torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0) for name in names}
        paths[f"refs_{dataset}"] = paths["weights"].parent / f"refs_{dataset}.pkl"
        paths[f"refs_{dataset}"].write_bytes(pickle.dumps(refs, protocol=4))


def write_track_inputs(paths: dict[str, Path]) -> None:
    """A refer tree with binary masks per sample, a VOC train tree with WeakTr-format CAMs."""
    from ovseg_bench.datasets.cards import load_card
    from ovseg_bench.datasets.label_conditioned import list_label_conditioned
    from ovseg_bench.datasets.refer import convert_refs, gt_mask, read_referring
    from tests.label_synthetic import write_voc_label_tree, write_weaktr_cams
    from tests.referring_synthetic import write_refer_tree

    rng = np.random.default_rng(TRACKS_SEED)
    write_refer_tree(paths["data_refer"])
    convert_refs(paths["data_refer"], "refcoco", "unc")
    card = load_card("refcoco_val")
    refs, index = read_referring(card, paths["data_refer"])
    for ref in refs:
        info = index.image(ref.image_id)
        gt = gt_mask(index, ref.ann_id, info.height, info.width, card.gt_rule)
        mask = (gt & (rng.random(gt.shape) < 0.7)) | (rng.random(gt.shape) < 0.1)
        out = paths["predictions"] / "refcoco_val" / f"{ref.sample_id}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(out)
    write_voc_label_tree(paths["data_lc"], num_train=3, seed=TRACKS_SEED)
    for ref in list_label_conditioned(load_card("voc_train"), paths["data_lc"]):
        gt = np.array(Image.open(ref.gt_path))
        labels = [int(v) for v in np.unique(gt) if 0 < v < 255]
        maps = {c - 1: np.where(gt == c, 0.8, rng.random(gt.shape) * 0.6).astype(np.float32) for c in labels}
        write_weaktr_cams(paths["predictions"] / "voc_train" / f"{ref.image_id}.npy", maps)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (bit-identity checks of the inputs)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- runs

def extra_args(method: str, paths: dict[str, Path], dataset: str) -> list[str]:
    """Method-specific arguments; anything not listed runs on the tiny CLIP weights."""
    tiny = ["--model", str(TINY_MODEL), "--pretrained", str(paths["weights"])]
    if method in ("tcl", "tcl_nopamr"):
        return tiny + ["--checkpoint", str(paths["checkpoint"])]
    if method in ("reco", "reco_nocrf"):
        return ["--model", str(TINY_RN), "--pretrained", str(paths["rn_weights"]), "--checkpoint", str(paths["deit"]),
                "--references", str(paths[f"refs_{dataset}"])]
    if method in WEAKTR_METHODS:
        return ["--checkpoint", str(paths["weaktr_ckpt"]), "--config", str(paths[f"config_{method}"])]
    if method in ("clip_es", "clip_es_crf"):
        return ["--model", str(TINY_VIT16_12), "--pretrained", str(paths["vit16_12_weights"])]
    if method == "glcf":
        return ["--model", str(TINY_B32), "--pretrained", str(paths["b32_weights"]), "--proposals", str(paths["proposals"])]
    if method == "predictions":
        # The maps hold an out-of-range value on purpose: the golden counts pin mmseg's drop rule.
        return ["--predictions", str(paths["predictions"] / dataset), "--predictions-out-of-range", "ignore"]
    return tiny


def call_cli(argv: Sequence[str]) -> tuple[int, str]:
    """``ovseg_bench.cli.main(argv)`` in-process: (exit code, stdout + stderr)."""
    from ovseg_bench.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return int(code or 0), buf.getvalue()


@contextlib.contextmanager
def golden_environment(work: Path):
    """One torch thread and a private text cache (no hits from outside this run)."""
    threads, cache = torch.get_num_threads(), os.environ.get("OVSEG_TEXT_CACHE")
    torch.set_num_threads(1)
    os.environ["OVSEG_TEXT_CACHE"] = str(Path(work) / "text_cache")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if cache is None:
            os.environ.pop("OVSEG_TEXT_CACHE", None)
        else:
            os.environ["OVSEG_TEXT_CACHE"] = cache


def golden_methods() -> list[str]:
    """``method_names()`` without methods that tests register for themselves (classes defined in the
    ``tests`` package, e.g. tests/test_bad_input.py's NaN/inf scorers): every shipped method, built-in
    or from an installed plug-in, must have golden numbers."""
    from ovseg_bench.registry import METHODS, method_names

    return [name for name in method_names()
            if not METHODS.module_dict[name].__module__.split(".")[0] == "tests"]


def golden_combos(method: str) -> list[tuple[str, str, str]]:
    """(dataset, preset, data key) runs of ``method``: COMBOS if it serves the semantic track, plus its TRACK_COMBOS."""
    from ovseg_bench.registry import get_method

    semantic = "semantic" in get_method(method).tracks
    return [(d, p, "data") for d, p in COMBOS if semantic] + list(TRACK_COMBOS.get(method, ()))


def run_all(work: Path, *, methods: Sequence[str] | None = None, log=None) -> Path:
    """Write the inputs and run every (method, dataset, protocol); the results folder."""
    work = Path(work)
    results = work / "results"
    with golden_environment(work):
        paths = write_inputs(work)
        for method in methods or golden_methods():
            for dataset, protocol, data in golden_combos(method):
                start = time.perf_counter()
                argv = ["run", "--method", method, "--dataset", dataset, "--protocol", protocol,
                        "--data-root", paths[data], "--output", results / f"{method}_{dataset}_{protocol}",
                        "--workers", "0", "--quiet", "--device", "cpu", *extra_args(method, paths, dataset)]
                code, output = call_cli(argv)
                if code != 0:
                    raise RuntimeError(f"golden run failed (exit {code}): ovseg-bench "
                                       f"{' '.join(map(str, argv))}\n{output}")
                if log:
                    log(f"{method:12s} {dataset:8s} {protocol:6s} {time.perf_counter() - start:6.1f} s")
    return results


def regress(results: Path, baseline: Path = BASELINE, *, update: bool = False) -> tuple[int, str]:
    """``ovseg-bench regress --tolerance 0`` (or ``--update``): (exit code, its output)."""
    argv = ["regress", "--results", results, "--baseline", baseline]
    return call_cli(argv + (["--update", "--replace"] if update else ["--tolerance", "0"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true", help=f"rewrite {BASELINE.relative_to(REPO)} from the runs")
    mode.add_argument("--check", action="store_true", help="gate the runs with regress --tolerance 0 (default)")
    parser.add_argument("--work", type=Path, help="keep inputs and results here (default: a temporary folder)")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ovseg_golden_")))
        start = time.perf_counter()
        results = run_all(work, log=print)
        print(f"all runs: {time.perf_counter() - start:.1f} s")
        code, report = regress(results, args.baseline, update=args.update)
        print(report)
        return code


if __name__ == "__main__":
    sys.exit(main())
