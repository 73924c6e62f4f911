"""Shared fixtures: a synthetic tree of the eight benchmarks, the tiny model, an in-process CLI.

The CLI is called in-process (``ovseg_bench.cli.main``) so the interpreter, torch and open_clip
start once per session. Runs use ``--workers 0 --quiet --device cpu`` unless a test is about
those options.

Torch is limited to one intra-op thread for the session: on small shared 2-core machines the
two-thread OpenMP pool of the tiny model's text tower was measured 5-10x slower (and very
noisy) than one thread, and the text encoding of 85 templates x ~580 class names dominates
the end-to-end runs.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.synthetic import write_all

TINY_MODEL = str(Path(__file__).parent / "assets" / "tiny_vit.json")

# Landscape (2 tcl windows), portrait (3 windows) and square (1 window): 6 tcl windows per dataset.
SYNTHETIC_SIZES = ((48, 64), (70, 42), (56, 56))
SYNTHETIC_IMAGES = 3

CliResult = tuple[int, str, str]


def call_cli(argv: Sequence[str]) -> CliResult:
    """``ovseg_bench.cli.main(argv)`` with stdout/stderr captured: (exit code, stdout, stderr).

    An argparse exit (``SystemExit``) is turned into its exit code like the console script does.
    """
    from ovseg_bench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return int(code), out.getvalue(), err.getvalue()


def run_argv(method: str, dataset: str, output: Path, *extra: object, data_root: Path | None = None,
             tiny: bool = True, fast: bool = True) -> list[str]:
    """Arguments of one ``ovseg-bench run`` on the tiny random model (fast settings by default)."""
    argv = ["run", "--method", method, "--dataset", dataset, "--output", str(output)]
    if data_root is not None:
        argv += ["--data-root", str(data_root)]
    if tiny:
        argv += ["--model", TINY_MODEL, "--pretrained", "none"]
    if fast:
        argv += ["--workers", "0", "--quiet", "--device", "cpu"]
    return argv + [str(e) for e in extra]


def result_jsons(folder: Path) -> list[Path]:
    """Result files in ``folder`` (temporary files of the atomic writes excluded)."""
    return sorted(p for p in Path(folder).glob("*.json") if not p.name.startswith(".")) if Path(folder).is_dir() else []


def read_gt(path: Path, reduce_zero_label: bool) -> np.ndarray:
    """A GT file decoded independently of ovseg_bench (PIL, no conversion) and reduced like mmseg."""
    gt = np.array(Image.open(path))
    if reduce_zero_label:
        gt = gt.astype(np.int64)
        gt = np.where(gt == 0, 255, np.where(gt == 255, 255, gt - 1)).astype(np.uint8)
    return gt


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """``folder`` made unwritable for real: immutable for root (``chattr +i``), else read-only mode."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.fail("as root an unwritable folder needs `chattr +i` (e2fsprogs) on a file system that supports it")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.fixture(scope="session", autouse=True)
def _text_cache_of_the_session(tmp_path_factory: pytest.TempPathFactory):
    """Tests share one text cache of their own, never the user's ~/.cache."""
    import os

    previous = os.environ.get("OVSEG_TEXT_CACHE")
    os.environ["OVSEG_TEXT_CACHE"] = str(tmp_path_factory.mktemp("text_cache"))
    yield
    if previous is None:
        os.environ.pop("OVSEG_TEXT_CACHE", None)
    else:
        os.environ["OVSEG_TEXT_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Path of the tiny random open_clip ViT config (``--model``; use with ``--pretrained none``)."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """(data root, image ids per dataset): all eight benchmarks, three small images each. Read only."""
    root = tmp_path_factory.mktemp("synthetic_data")
    ids = write_all(root, num_images=SYNTHETIC_IMAGES, sizes=SYNTHETIC_SIZES)
    return root, ids


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli("run", "--method", ...)`` -> (exit code, stdout, stderr), through capsys."""
    from ovseg_bench.cli import main

    def invoke(*argv: object) -> CliResult:
        capsys.readouterr()  # drop anything printed before the call
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        captured = capsys.readouterr()
        return int(code), captured.out, captured.err

    return invoke
