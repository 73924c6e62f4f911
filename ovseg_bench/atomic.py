"""Atomic file writes (every file ovseg-bench writes appears whole or not at all), the
writability check and file digests.

A temporary file beside the target (same folder, so the rename stays on one file system; a
leading "." so folder scans skip it) is written and then renamed over the target.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write bytes (or UTF-8 text) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def check_writable(target: Path, *, option: str) -> None:
    """Refuse, before any slow work, a folder ``target`` that cannot take a file.

    A file is created and removed in ``target``, or in its nearest existing parent when it does
    not exist yet (the writers create missing folders). A real write, not ``os.access``: an
    immutable folder (``chattr +i``) or a read-only mount refuses root too. ``option`` names the
    command-line option in the message (``--output runs``).
    """
    folder = Path(target)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{option}: {folder} is not a folder; pass a folder to write into")
    try:
        handle, probe = tempfile.mkstemp(prefix=".ovseg-write-check-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{option}: cannot write in {folder} ({exc.strerror or exc}); "
                          "pass a folder you can write to") from None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints, refs pickles)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
