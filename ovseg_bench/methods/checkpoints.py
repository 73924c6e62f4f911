"""Checkpoint files for every method adapter: read safely, fetch once, check before loading.

The one place where a weights file becomes tensors. ``read_checkpoint`` loads PyTorch (zip or
legacy pickle) files with ``weights_only=True`` and safetensors files, recognised by their first
bytes rather than their suffix, and turns every way a file can be wrong (a web page saved
instead of the file, a Git LFS pointer, a truncated download, pickled Python objects) into one
sentence. ``check_state_dict`` and ``load_strict`` compare names and shapes before
``load_state_dict`` runs, so a file for another model lists every key that does not fit instead
of stopping at torch's first size error. ``fetch_checkpoint`` downloads a release once into the
cache and pins its sha256 on first use.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ..atomic import atomic_write, sha256_file
from ..errors import WeightsError
from ..resources import cache_dir

MAX_LISTED = 5  # key names shown per kind of mismatch; the counts tell the rest
_HEAD_BYTES = 64
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2 opcode: torch's legacy format and plain pickles
_HTML = re.compile(r"\s*<(!doctype\s+html|html|head|body|!--|\?xml)", re.IGNORECASE)
_LFS_POINTER = "version https://git-lfs.github.com/spec/"
_WEB_PAGE_FIX = "download the file itself, not its web page (on Hugging Face the /resolve/ link, not /blob/)"
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


# ----------------------------------------------------------------------------- reading
def checkpoint_format(head: bytes) -> str | None:
    """``"zip"``, ``"pickle"`` or ``"safetensors"`` from a file's first bytes; None for anything else.

    safetensors: an 8-byte little-endian header length, then the JSON header, which opens with ``{``.
    """
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(PICKLE_MAGIC):
        return "pickle"
    if len(head) >= 9 and struct.unpack("<Q", head[:8])[0] > 0 and head[8:9] == b"{":
        return "safetensors"
    return None


def read_checkpoint(path: Path, *, hint: str = "") -> Any:
    """What ``path`` holds, loaded on the CPU without running code from the file.

    PyTorch files go through ``torch.load(weights_only=True)``; safetensors files through
    ``safetensors.torch.load_file`` (a dict of tensors), whatever their suffix.

    Args:
        path: the checkpoint file.
        hint: what to pass instead, appended to every error (e.g. the release URL).

    Raises:
        WeightsError: one sentence saying what the file is instead (web page, text, truncated
            archive, pickled Python objects, TorchScript program), never torch's advice to load
            it with ``weights_only=False``.
    """
    path = Path(path)
    head = _read_head(path, hint)
    kind = checkpoint_format(head)
    if kind is None:
        raise WeightsError(_with_hint(_not_a_checkpoint(path, head), hint))
    if kind == "safetensors":
        return _load_safetensors(path, hint)
    return _torch_load(path, kind, hint)


def _with_hint(message: str, hint: str) -> str:
    return f"{message}; {hint}" if hint else message


def _read_head(path: Path, hint: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(_HEAD_BYTES)
    except OSError as exc:
        raise WeightsError(_with_hint(f"{path}: cannot read the checkpoint ({exc.strerror or exc})", hint)) from None


def _not_a_checkpoint(path: Path, head: bytes) -> str:
    """The sentence for a file with no checkpoint header: say what it looks like and what to do."""
    if not head:
        return f"{path}: not a PyTorch checkpoint (the file is empty); download it again"
    text = _as_text(head)
    if text is None:
        shown = " ".join(f"{byte:02x}" for byte in head[:8])
        return (f"{path}: not a PyTorch checkpoint (it starts with bytes {shown}, not a zip, pickle or safetensors "
                "header); pass a .pth, .bin or .safetensors checkpoint")
    start = text.strip().splitlines()[0][:24] if text.strip() else ""
    if _HTML.match(text):
        return (f"{path}: not a PyTorch checkpoint (it starts with '{start}'... it looks like a web page saved "
                f"instead of the file); {_WEB_PAGE_FIX}")
    if text.startswith(_LFS_POINTER):
        return (f"{path}: not a PyTorch checkpoint (it is a Git LFS pointer, a text stub standing for the file); "
                "run git lfs pull in its repository, or download the file itself")
    return (f"{path}: not a PyTorch checkpoint (it starts with '{start}'... it is a text file); "
            "pass a .pth, .bin or .safetensors checkpoint")


def _as_text(head: bytes) -> str | None:
    """``head`` as text if it is printable UTF-8 (the last character may be cut), else None."""
    for cut in range(4):  # a multi-byte character may straddle the end of the head
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        text = text.lstrip("\ufeff")
        return text if all(char.isprintable() or char.isspace() for char in text) else None
    return None


def _load_safetensors(path: Path, hint: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = _first_sentence(exc)
        raise WeightsError(_with_hint(f"{path}: a damaged or truncated safetensors file ({reason}); "
                                      "download it again", hint)) from None


def _torch_load(path: Path, kind: str, hint: str) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive; we say it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise WeightsError(_with_hint(_objects_refused(path, str(exc)), hint)) from None
        raise WeightsError(_with_hint(_damaged(path, kind, exc), hint)) from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise WeightsError(_with_hint(
                f"{path}: a TorchScript program, not a state dict of tensors, refused for safety (loading it runs "
                "code from the file); pass the same weights saved as a state dict", hint)) from None
        raise WeightsError(_with_hint(_damaged(path, kind, exc), hint)) from None
    except (EOFError, OSError, ValueError, KeyError, struct.error) as exc:
        raise WeightsError(_with_hint(_damaged(path, kind, exc), hint)) from None


def _objects_refused(path: Path, torch_message: str) -> str:
    # torch's message goes on to advise weights_only=False, which would run the file's code: left out.
    found = _REFUSED_GLOBAL.search(torch_message)
    what = f" (first: {found.group(1)})" if found else ""
    return (f"{path}: the checkpoint holds Python objects other than tensors{what}, refused for safety (loading "
            "them runs code from the file); pass a file that holds only tensors, e.g. one written by "
            "torch.save(model.state_dict(), path)")


def _damaged(path: Path, kind: str, exc: BaseException) -> str:
    container = "zip archive" if kind == "zip" else "pickle"
    reason = _first_sentence(exc) or "the data ends early"
    return (f"{path}: a damaged or truncated PyTorch checkpoint ({container}: {reason}); download it again, "
            "or pass a file written by torch.save")


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's first line, without torch's weights_only advice."""
    line = (str(exc).strip().splitlines() or [""])[0]
    sentence = line.split(". ")[0].rstrip(".")
    return "" if "weights_only" in sentence else sentence[:200]


# ----------------------------------------------------------------------------- checking
@dataclasses.dataclass(frozen=True)
class Mismatch:
    """Keys of a state dict that do not fit a model: each list keeps the order it was found in.

    ``misshaped`` entries read ``key (expected [..], found [..])``.
    """

    missing: list[str]
    unexpected: list[str]
    misshaped: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def describe(self, max_listed: int = MAX_LISTED) -> str:
        """``missing (N): a, b, ... and K more; unexpected (..): ..; mis-shaped (..): ..`` (empty kinds left out)."""
        def listing(label: str, keys: list[str]) -> str:
            more = f", ... and {len(keys) - max_listed} more" if len(keys) > max_listed else ""
            return f"{label} ({len(keys)}): {', '.join(keys[:max_listed])}{more}"

        kinds = (("missing", self.missing), ("unexpected", self.unexpected), ("mis-shaped", self.misshaped))
        return "; ".join(listing(label, keys) for label, keys in kinds if keys)


def compare_state_dict(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> Mismatch:
    """Names and shapes of ``state`` against ``expected`` (name -> shape, ``()`` for 0-dim)."""
    unexpected, misshaped = [], []
    for key, value in state.items():
        if key not in expected:
            unexpected.append(str(key))
            continue
        shape = tuple(value.shape) if isinstance(value, Tensor) else None
        if shape != tuple(expected[key]):
            found = list(shape) if shape is not None else type(value).__name__
            misshaped.append(f"{key} (expected {list(expected[key])}, found {found})")
    missing = [key for key in expected if key not in state]
    return Mismatch(missing, unexpected, misshaped)


def check_state_dict(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *, source: str,
                     hint: str = "") -> None:
    """Refuse ``state`` unless its names and shapes are exactly ``expected``'s.

    Args:
        state: name -> tensor, as it would be passed to ``load_state_dict``.
        expected: name -> shape the model wants.
        source: the file (or other origin) named first in the message.
        hint: what the file seems to be and what to pass instead, ending the message.

    Raises:
        WeightsError: one line with the counts and first names of every missing, unexpected and
            mis-shaped key.
    """
    mismatch = compare_state_dict(state, expected)
    if mismatch:
        message = (f"{source}: the tensors do not fit the model ({len(expected)} expected, {len(state)} in the "
                   f"file): {mismatch.describe()}")
        raise WeightsError(_with_hint(message, hint))


def load_strict(module: nn.Module, state: Mapping[str, Any], *, source: str, hint: str = "") -> None:
    """``module.load_state_dict(state, strict=True)`` after ``check_state_dict`` against its own state dict."""
    expected = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    check_state_dict(state, expected, source=source, hint=hint)
    module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- download and cache
def checkpoint_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ovseg_bench/checkpoints``, else ``~/.cache/ovseg_bench/checkpoints``."""
    return cache_dir("checkpoints")


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` to ``target`` (torch.hub writes a temporary file and renames it)."""
    torch.hub.download_url_to_file(url, str(target), progress=True)


def fetch_checkpoint(url: str, cache_dir: Path | None = None, *, what: str = "checkpoint") -> tuple[Path, str]:
    """The cached copy of ``url``, downloaded on first use; returns (path, sha256).

    Trust on first use: releases publish no checksum, so the sha256 of the first download is
    recorded in ``<file>.sha256.json`` beside it and every later use must match it. Offline, or on
    any download failure, raises WeightsError saying what to fetch by hand; ``what`` names the
    file in that message (e.g. ``"TCL checkpoint"``).
    """
    cache_dir = cache_dir or checkpoint_cache_dir()
    path = cache_dir / (Path(urlparse(url).path).name or "checkpoint.pth")
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            _download(url, path)
        except Exception as exc:  # urllib/http/socket errors all mean the same to the user
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise WeightsError(f"cannot download the {what} {url} ({reason}); download it on a machine with "
                               f"network access and pass --checkpoint PATH_TO/{path.name}") from None
    digest = sha256_file(path)
    _check_recorded_digest(path, url, digest)
    return path, digest


def _check_recorded_digest(path: Path, url: str, digest: str) -> None:
    record = path.with_name(path.name + ".sha256.json")
    if not record.is_file():
        entry = {"url": url, "sha256": digest, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(record, json.dumps(entry, indent=2) + "\n")
        return
    recorded = json.loads(record.read_text(encoding="utf-8")).get("sha256")
    if recorded != digest:
        raise WeightsError(f"{path}: sha256 {digest} differs from {recorded} recorded at its first download in "
                           f"{record}; delete both files to download it again, or pass --checkpoint PATH")
