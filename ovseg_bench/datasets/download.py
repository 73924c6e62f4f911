"""Fetching and unpacking the published archives: resumable, checksummed, traversal-safe.

The archives each benchmark needs are listed in ``datasets/manifests/<target>.json`` (shipped
with the cards): file name, URL, size and the checksum as published (md5 or sha256, or null
where none could be established). A download goes to ``<name>.part`` and resumes from there
with an HTTP Range request; only a file whose size and checksum match is renamed to its final
name. Archives fetched by hand are passed with ``--from-archive`` and verified the same way.
Extraction refuses members that would land outside the destination (absolute paths, ``..``,
links), and marks an unfinished extraction so that a rerun extracts again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ConfigError, DataError
from ..resources import cards_dir
from ..yamlconf import from_mapping

MANIFEST_SCHEMA = "ovseg-bench/archives/1"
CHUNK = 1 << 20
USER_AGENT = "ovseg-bench (dataset preparation)"


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    """One published file a benchmark is built from."""

    name: str                      # file name, also how --from-archive files are recognised
    url: str | None = None         # None: not downloadable (a login is needed); by hand only
    size: int | None = None        # bytes, when established
    md5: str | None = None         # as published; None = unknown
    sha256: str | None = None
    checksum_source: str = ""      # where the size/checksum were read
    kind: str = "archive"          # "archive" (tar/zip, extracted) or "file" (used as is)
    dest: str = "."                # extraction folder, relative to the data root
    include: tuple[str, ...] = ()  # member-name prefixes to extract (empty = everything)
    provides: tuple[str, ...] = () # paths (relative to the data root) its extraction creates
    approx_size: str = ""          # human-readable size as the publisher states it

    @property
    def manual(self) -> bool:
        return self.url is None


@dataclasses.dataclass(frozen=True)
class ArchiveManifest:
    schema: str
    target: str
    archives: tuple[ArchiveSpec, ...]
    notes: str = ""


def manifest_path(target: str) -> Path:
    return cards_dir() / "manifests" / f"{target}.json"


def load_archive_manifest(target: str) -> ArchiveManifest:
    """The shipped archive manifest of a prepare target; unknown keys fail naming the file."""
    path = manifest_path(target)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: archive manifest not found; reinstall ovseg-bench") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    manifest = from_mapping(ArchiveManifest, data, str(path))
    if manifest.schema != MANIFEST_SCHEMA or manifest.target != target:
        raise ConfigError(f"{path}: expected schema '{MANIFEST_SCHEMA}' and target '{target}', "
                          f"found '{manifest.schema}' and '{manifest.target}'")
    return manifest


# --------------------------------------------------------------------------- checksums

def file_digests(path: Path) -> dict[str, str]:
    """{"md5": ..., "sha256": ...} of a file, read once."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            md5.update(block)
            sha.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def verify_file(path: Path, spec: ArchiveSpec, *, fix: str = "delete it and fetch it again") -> dict[str, str]:
    """Check size and published checksums; returns the digests. Raises DataError on a mismatch."""
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        raise DataError(f"{path}: {size} bytes, expected {spec.size} for {spec.name} (see "
                        f"{_manifests_hint()}); the file is incomplete or a different release: {fix}")
    digests = file_digests(path)
    for algo in ("sha256", "md5"):
        expected = getattr(spec, algo)
        if expected and digests[algo] != expected.lower():
            raise DataError(f"{path}: checksum mismatch for {spec.name}: {algo} {digests[algo]}, expected "
                            f"{expected} (see {_manifests_hint()}); the file is corrupt or a different "
                            f"release: {fix}")
    return digests


def _manifests_hint() -> str:
    return f"the archive manifests in {manifest_path('').parent}"


# --------------------------------------------------------------------------- download

def download(spec: ArchiveSpec, folder: Path, *, quiet: bool = False, retries: int = 3,
             timeout: float = 60.0, retry_wait: float = 2.0) -> tuple[Path, dict[str, str]]:
    """Fetch ``spec.url`` into ``folder / spec.name``; resume a ``.part`` left by an earlier try.

    Interrupted transfers are retried ``retries`` times, each resuming with ``Range``. A
    finished file whose size or checksum is wrong is deleted (so no rerun mistakes it for
    complete) and DataError says so. Returns the verified file and its md5/sha256.
    """
    if spec.manual:
        raise DataError(f"{spec.name} cannot be downloaded automatically; fetch it by hand and pass "
                        f"--from-archive PATH")
    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / spec.name, folder / (spec.name + ".part")
    if final.is_file():
        return final, verify_file(final, spec)
    attempt = 0
    while True:
        try:
            _transfer(spec, part, quiet=quiet, timeout=timeout)
            break
        except (OSError, http.client.HTTPException, _Interrupted) as exc:  # URLError is an OSError
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise DataError(f"{spec.url}: HTTP {exc.code} {exc.reason}; {_manual_hint(spec, folder)}") from None
            attempt += 1
            if attempt > retries:
                have = part.stat().st_size if part.is_file() else 0
                if not have:
                    raise DataError(f"{spec.url}: download failed ({exc}); check the connection and rerun, or "
                                    f"{_manual_hint(spec, folder)}") from None
                raise DataError(f"{spec.url}: download interrupted after {have} bytes ({exc}); rerun the same "
                                f"command to resume from {part}, or {_manual_hint(spec, folder)}") from None
            time.sleep(retry_wait * attempt)
    try:
        digests = verify_file(part, spec, fix="the download was deleted; rerun to fetch it again, or "
                                              + _manual_hint(spec, folder))
    except DataError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, final)
    return final, digests


class _Interrupted(Exception):
    """The server closed the connection before sending every byte it announced."""


def _transfer(spec: ArchiveSpec, part: Path, *, quiet: bool, timeout: float) -> None:
    """One HTTP(S)/file request, appending to ``part`` when the server honours the Range."""
    have = part.stat().st_size if part.is_file() else 0
    if spec.size is not None and have == spec.size:
        return  # a complete .part from an earlier run: only the verification is left
    request = urllib.request.Request(spec.url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part is whole (or too long)
            return
        raise
    with response:
        resumed = have and getattr(response, "status", 200) == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        total = have + expected if expected is not None else spec.size
        received = 0
        with open(part, "ab" if resumed else "wb") as out, _progress(spec.name, total, have, quiet) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                received += len(block)
                bar.update(len(block))
    if expected is not None and received < expected:
        raise _Interrupted(f"received {received} of {expected} bytes")


def _progress(name: str, total: int | None, initial: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, disable=quiet, file=sys.stderr, leave=False)


def _manual_hint(spec: ArchiveSpec, folder: Path) -> str:
    where = f"from {spec.url} " if spec.url else ""
    return f"download {spec.name} {where}by hand into {folder} (or anywhere, passing --from-archive PATH)"


# --------------------------------------------------------------------------- locating archives

def find_archive(spec: ArchiveSpec, from_archives: Sequence[Path], download_dir: Path) -> Path | None:
    """A file for ``spec``: a --from-archive path with its name, else one in the download dir."""
    for path in from_archives:
        if Path(path).name == spec.name:
            if not Path(path).is_file():
                raise DataError(f"--from-archive {path}: file not found")
            return Path(path)
    candidate = Path(download_dir) / spec.name
    return candidate if candidate.is_file() else None


def unmatched_archives(from_archives: Sequence[Path], specs: Iterable[ArchiveSpec]) -> list[Path]:
    """--from-archive paths whose name is none of the expected archive names."""
    names = {s.name for s in specs}
    return [Path(p) for p in from_archives if Path(p).name not in names]


# --------------------------------------------------------------------------- extraction

def extraction_marker(dest: Path, archive_name: str) -> Path:
    """Present while an archive is being extracted into ``dest``: a rerun must extract again."""
    return dest / f".ovseg_extracting_{archive_name}"


def extract(archive: Path, dest: Path, *, include: Sequence[str] = (), quiet: bool = False) -> int:
    """Unpack a tar (any compression) or zip archive into ``dest``; returns the files written.

    Only members whose names start with one of ``include`` are extracted (all if empty). A
    member with an absolute name, a ``..`` component, or a link is refused with DataError
    before anything is written, so a hostile archive cannot write outside ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    marker = extraction_marker(dest, archive.name)
    marker.write_text("extraction started; a rerun extracts again\n", encoding="utf-8")
    if zipfile.is_zipfile(archive):
        count = _extract_zip(archive, dest, include, quiet)
    elif tarfile.is_tarfile(archive):
        count = _extract_tar(archive, dest, include, quiet)
    else:
        raise DataError(f"{archive}: neither a tar nor a zip archive; delete it and fetch it again")
    marker.unlink(missing_ok=True)
    return count


def _selected(name: str, include: Sequence[str]) -> bool:
    clean = name
    while clean.startswith("./"):
        clean = clean[2:]
    return not include or any(clean.startswith(prefix) for prefix in include)


def _safe_target(dest: Path, name: str, archive: Path) -> Path:
    """Where member ``name`` goes; DataError if it would leave ``dest``."""
    parts = Path(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and (":" in parts[0])) or ".." in parts:
        raise DataError(f"{archive}: member '{name}' would be written outside {dest}; the archive is not "
                        "the published one (refusing to extract it)")
    target = (dest / name).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DataError(f"{archive}: member '{name}' resolves outside {dest}; refusing to extract it")
    return target


def _extract_zip(archive: Path, dest: Path, include: Sequence[str], quiet: bool) -> int:
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if _selected(m.filename, include)]
        for member in members:
            _safe_target(dest, member.filename, archive)
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"{archive}: member '{member.filename}' is a symbolic link; refusing to extract it")
        count = 0
        with _progress(archive.name + " (extract)", sum(m.file_size for m in members), 0, quiet) as bar:
            for member in members:
                target = _safe_target(dest, member.filename, archive)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                count += 1
                bar.update(member.file_size)
    return count


def _extract_tar(archive: Path, dest: Path, include: Sequence[str], quiet: bool) -> int:
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if _selected(m.name, include)]
        for member in members:
            _safe_target(dest, member.name, archive)
            if member.issym() or member.islnk() or member.isdev():
                raise DataError(f"{archive}: member '{member.name}' is a link or device; refusing to extract it")
        count = 0
        with _progress(archive.name + " (extract)", sum(m.size for m in members), 0, quiet) as bar:
            for member in members:
                _tar_extract(tf, member, dest)
                count += member.isfile()
                bar.update(member.size)
    return count


def _tar_extract(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # a second guard where tarfile has it (3.10.12+, 3.11.4+)
        tf.extract(member, dest, filter="data")
    else:
        tf.extract(member, dest)
